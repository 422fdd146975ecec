"""The tfds source: any image classification dataset of TensorFlow Datasets.

A split spec may slice and sum splits ('train[:90%]', 'train+unlabelled'). The
split is read as records, without random access: host p of P reads the
contiguous range of every part that tfds.even_splits would give it (the first
n % P hosts hold one extra example), in file order (interleave_cycle_length=1)
so 'index' is the absolute position. Images are decoded by the dataset's image
feature; 1-channel images become RGB, alpha is dropped.
"""

import dataclasses
import difflib
import functools

import ml_collections as mlc
import numpy as np
import tensorflow as tf

from simclr_jax.config_checks import ConfigError, MissingPathError
from simclr_jax.data.sources import base


@dataclasses.dataclass(frozen=True)
class _TfdsSplit:
    """A base.RecordStream over a tfds split."""

    builder: object
    split: str
    ranges: tuple[tuple[str, int, int], ...]  # (tfds split name, start, end), absolute
    image_key: str
    label_key: str

    def shard_indices(self, process_index: int, process_count: int) -> np.ndarray:
        """Split indices of a host's tfds shard: its even part of every range, in order."""
        parts, offset = [np.zeros([0], np.int64)], 0
        for _, start, end in self.ranges:
            lo, hi = _even_range(end - start, process_index, process_count)
            parts.append(np.arange(offset + lo, offset + hi, dtype=np.int64))
            offset += end - start
        return np.concatenate(parts)

    def records(self, process_index: int, process_count: int) -> tf.data.Dataset:
        """Undecoded records {'index', 'label', 'key', 'codec'} of a host's shard."""
        import tensorflow_datasets as tfds

        instructions = []
        for splitname, start, end in self.ranges:
            lo, hi = _even_range(end - start, process_index, process_count)
            if hi > lo:
                instructions.append(
                    tfds.core.ReadInstruction(splitname, start + lo, start + hi, "abs")
                )
        # Cycle length 1 reads the files in order, so 'index' is the absolute position.
        read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
        if instructions:
            split = functools.reduce(lambda a, b: a + b, instructions)
        else:
            split, start = self.ranges[0][0], self.ranges[0][1]  # An empty shard: read nothing.
            split = tfds.core.ReadInstruction(split, start, start + 1, "abs")
        ds = self.builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        if not instructions:
            ds = ds.take(0)
        # The shard's indices are known arithmetically; zip them in rather than trust
        # a per-record id.
        indices = tf.data.Dataset.from_tensor_slices(
            self.shard_indices(process_index, process_count)
        )
        return tf.data.Dataset.zip(ds, indices).map(
            lambda ex, i: {
                "index": i,
                "label": tf.cast(ex[self.label_key], tf.int32),
                "key": ex[self.image_key],
                "codec": tf.constant(-1, tf.int8),
            }
        )

    def decode(self, key: tf.Tensor) -> tf.Tensor:
        """Decodes a record's encoded image to uint8 [H, W, 3] RGB (graph-safe)."""
        feature = self.builder.info.features[self.image_key]
        return _to_rgb(feature.decode_example(key))


def load_tfds(data_cfg: mlc.ConfigDict, split: str) -> base.DataSource:
    """Opens `split` of the tfds dataset data_cfg.name (see sources.load_source)."""
    import tensorflow_datasets as tfds  # Deferred: slow to import, only needed here.

    name, data_dir = data_cfg.name, data_cfg.get("data_dir")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        base_name = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base_name, tfds.list_builders(), n=5)
        raise ConfigError(
            f"data.name={name!r} is not a tfds dataset{f'; did you mean {close}' if close else ''}."
            " List the names with `tfds.list_builders()` or see "
            "https://www.tensorflow.org/datasets/catalog"
        ) from None
    except ValueError as e:  # E.g. an unknown config such as 'imagenet2012_subset/2pct'.
        raise ConfigError(f"data.name={name!r}: {e}") from None
    if not builder.is_prepared():
        if not data_cfg.get("download", False):
            raise MissingPathError(_not_prepared_message(builder, name))
        builder.download_and_prepare()
    available = list(builder.info.splits.keys())
    try:
        absolute = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    except (ValueError, KeyError, AssertionError) as e:
        raise base.UnknownSplitError(
            f"split={split!r} of tfds dataset {name!r}: available splits are {available} "
            f"(slices and sums like 'train[:90%]' or 'train+unlabelled' work too). ({e})"
        ) from None
    ranges = []
    for inst in absolute:
        total = builder.info.splits[inst.splitname].num_examples
        start = 0 if inst.from_ is None else inst.from_
        ranges.append((inst.splitname, start, total if inst.to is None else inst.to))
    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    if image_key not in features or label_key not in features:
        raise ConfigError(
            f"tfds dataset {name!r} has features {list(features.keys())}; expected an "
            "'image' and a 'label' feature (an image classification dataset)"
        )
    label_feature = features[label_key]
    num = sum(end - start for _, start, end in ranges)
    height, width = features[image_key].shape[:2]
    return base.DataSource(
        name=name,
        split=split,
        num_examples=num,
        num_classes=label_feature.num_classes,
        class_names=tuple(label_feature.names),
        decoded_bytes=num * height * width * 3 if height and width else None,
        stream=_TfdsSplit(builder, split, tuple(ranges), image_key, label_key),
    )


def _not_prepared_message(builder, name: str) -> str:
    msg = (
        f"tfds dataset {name!r} is not prepared in data_dir={str(builder.data_dir_root)!r} "
        f"(looked for {builder.data_dir}). Prepare it once with `tfds build {name.split(':')[0]} "
        f"--data_dir={builder.data_dir_root}` or set data.download=True on a machine with "
        "network access"
    )
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        msg += (
            f"; {name!r} needs a manual download: place the files in a manual_dir and run "
            f"`tfds build {name.split(':')[0]} --data_dir={builder.data_dir_root} "
            "--manual_dir=<dir with the downloaded files>`"
        )
    return msg + "."


def _even_range(n: int, index: int, count: int) -> tuple[int, int]:
    """The [lo, hi) part of range(n) for `index`, the rule of tfds.even_splits."""
    per, extra = divmod(n, count)
    return per * index + min(index, extra), per * (index + 1) + min(index + 1, extra)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"images with {channels} channels are not supported (expected 1, 3, 4)")
    return tf.ensure_shape(image, [None, None, 3])
