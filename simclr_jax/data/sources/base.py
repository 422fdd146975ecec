"""What every data source shares: the DataSource type, image decoding, host checks.

A DataSource is read one of two ways. Indexable splits (embedded sample, image
folders) are a `Table`, one row per example, so any example can be read by its
index. Splits without random access (tfds) are a `RecordStream`, read as
per-host ranges of records. See simclr_jax/data/sources/__init__.py for the
contract (record format, fixed order, sharding over hosts).
"""

import dataclasses
import io
from typing import Protocol

import ml_collections as mlc
import numpy as np
import tensorflow as tf
from PIL import Image

from simclr_jax.config_checks import ConfigError

# Decoders, chosen per file: TensorFlow's JPEG and PNG decoders handle every
# colour mode of those formats; anything else goes through PIL.
CODEC_JPEG, CODEC_PNG, CODEC_PIL = 0, 1, 2


class UnknownSplitError(ConfigError):
    """A split spec names no split of the dataset (the message lists the available ones)."""


@dataclasses.dataclass(frozen=True)
class Table:
    """An indexable split: one row per example, in the split's fixed order."""

    keys: np.ndarray  # object: encoded bytes (embedded) or file paths (folder)
    codecs: np.ndarray  # int8, CODEC_*
    labels: np.ndarray  # int32
    keys_are_paths: bool


class RecordStream(Protocol):
    """A split without random access (tfds), read as per-host ranges of records."""

    def shard_indices(self, process_index: int, process_count: int) -> np.ndarray:
        """The split indices of a host's shard, in the shard's fixed order."""

    def records(self, process_index: int, process_count: int) -> tf.data.Dataset:
        """Undecoded records {'index', 'label', 'key', 'codec'} of a host's shard."""

    def decode(self, key: tf.Tensor) -> tf.Tensor:
        """Decodes a record's 'key' to uint8 [H, W, 3] RGB (graph-safe)."""


@dataclasses.dataclass(frozen=True, eq=False)
class DataSource:
    """One split of a dataset, in a fixed order, shardable over hosts.

    Attributes:
      name: dataset name (tfds name, folder path or 'cifar10_sample').
      split: the split this source reads.
      num_examples: examples in the split (unreadable files excluded).
      num_classes: number of classes.
      class_names: class names; label i is class_names[i].
      decoded_bytes: size of the whole split decoded as uint8, when known
        without decoding it (None for tfds datasets with variable image sizes).
      table: the rows of an indexable split (embedded, folder), else None.
      stream: the reader of a split without random access (tfds), else None.
    """

    name: str
    split: str
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...]
    decoded_bytes: int | None = None
    table: Table | None = dataclasses.field(default=None, repr=False)
    stream: RecordStream | None = dataclasses.field(default=None, repr=False)

    @property
    def indexable(self) -> bool:
        """Whether any example can be read by index (embedded and folder sources)."""
        return self.table is not None

    def shard_indices(self, process_index: int, process_count: int) -> np.ndarray:
        """Returns the split indices of a host's shard, in the shard's fixed order."""
        check_process(process_index, process_count)
        if self.table is not None:
            return np.arange(process_index, self.num_examples, process_count, dtype=np.int64)
        return self.stream.shard_indices(process_index, process_count)

    def records(self, process_index: int, process_count: int) -> tf.data.Dataset:
        """Undecoded examples of a host's shard: {'index', 'label', 'key', 'codec'}.

        Args:
          process_index: this host, in [0, process_count).
          process_count: number of hosts.

        Returns:
          A dataset in the order of shard_indices(); decode elements with decode().
        """
        if self.table is not None:
            return self.records_at(self.shard_indices(process_index, process_count))
        return self.stream.records(process_index, process_count)

    def records_at(self, indices: np.ndarray) -> tf.data.Dataset:
        """Undecoded examples at the given split indices (indexable sources only)."""
        return tf.data.Dataset.from_tensor_slices(self.table_rows(indices))

    def table_rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at `indices` as NumPy columns (indexable sources only)."""
        if self.table is None:
            raise ValueError(f"{self.name!r} (tfds) has no random access; use records()")
        indices = np.asarray(indices, np.int64)
        return {
            "index": indices,
            "label": self.table.labels[indices],
            "key": self.table.keys[indices],
            "codec": self.table.codecs[indices],
        }

    def decode(self, record: dict[str, tf.Tensor]) -> tf.Tensor:
        """Decodes one record's image to uint8 [H, W, 3] RGB (graph-safe)."""
        if self.table is not None:
            key = record["key"]
            data = tf.io.read_file(key) if self.table.keys_are_paths else key
            return decode_image_bytes(data, record["codec"])
        return self.stream.decode(record["key"])

    def shard(self, process_index: int, process_count: int) -> tf.data.Dataset:
        """Decoded examples {'image', 'label', 'index'} of one host, in fixed order.

        Args:
          process_index: this host, in [0, process_count).
          process_count: number of hosts.

        Returns:
          A finite tf.data.Dataset; see simclr_jax/data/sources/__init__.py for
          the split rule.
        """
        return self.records(process_index, process_count).map(
            lambda r: {"image": self.decode(r), "label": r["label"], "index": r["index"]},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )


def decode_image_bytes(data: tf.Tensor, codec: tf.Tensor) -> tf.Tensor:
    """Decodes encoded image bytes to uint8 [H, W, 3] RGB with the given CODEC_*."""

    def decode_pil():
        image = tf.numpy_function(_decode_with_pil, [data], tf.uint8, stateful=False)
        return tf.ensure_shape(image, [None, None, 3])

    image = tf.switch_case(
        tf.cast(codec, tf.int32),
        [
            # INTEGER_ACCURATE is libjpeg's ISLOW, the method PIL uses too.
            lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_png(data, channels=3),
            decode_pil,
        ],
    )
    return tf.ensure_shape(image, [None, None, 3])


def _decode_with_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), np.uint8)


def check_process(process_index: int, process_count: int) -> None:
    """Raises ValueError unless 0 <= process_index < process_count."""
    if not isinstance(process_count, int | np.integer) or process_count < 1:
        raise ValueError(f"process_count={process_count!r}: must be an int >= 1")
    if not isinstance(process_index, int | np.integer) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r}: must be in [0, {process_count})")


def data_field(data_cfg: mlc.ConfigDict, field: str, default=None):
    """data_cfg.<field>, or `default` when the field is absent or None."""
    value = data_cfg.get(field, default)
    return default if value is None else value
