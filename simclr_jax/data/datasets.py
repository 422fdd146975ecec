"""Data sources: the embedded CIFAR-10 sample, TFDS datasets and image folders.

`load_source(data_cfg, split)` returns a `DataSource`: the split's size, its
classes, and `shard(process_index, process_count)`, a tf.data.Dataset of
{'image': uint8 [H, W, 3] RGB, 'label': int32, 'index': int64} in a fixed order
(no shuffling here; the pipeline shuffles). 'index' is the example's position in
the split's fixed order, so any example can be identified across hosts.

Sharding over hosts (process p of P; the shards are disjoint, their union is the
split, and sizes differ by at most one):
- embedded and folder sources are indexable: host p gets indices p, p + P,
  p + 2P, ..., so each host sees every class even though the fixed order is
  sorted by class. Hosts p < n % P hold one extra example.
- tfds: host p reads the contiguous range tfds.even_splits would give it (the
  first n % P hosts hold one extra example), read in file order
  (interleave_cycle_length=1) so 'index' is the absolute position.
Who uses these shards: the pipeline's tfds record streams (training without a
cache, and evaluation of tfds splits). Indexable and cached sources are instead
read by global index in an order that does not depend on the process count
(see pipeline.py), so there a host may read any example.

Image folders: root/<split>/<class>/<image> or root/<class>/<image> (then
`val_fraction` holds out a seeded, class-stratified eval split), or a .tar /
.tar.gz / .tgz archive holding such a tree, extracted once into
`data_cfg.extract_dir` (default: <tmp>/simclr_jax_archives/<name>-<hash of
path, size, mtime>) and reused afterwards. Every file is checked before the
count is fixed (see `_inspect_image`); unreadable files are skipped and named in
one warning, or raise with `strict=True`. JPEG and PNG are decoded by
TensorFlow; other formats (BMP, WebP, GIF, ...) with PIL. Any mode (grayscale,
CMYK, palette, RGBA) becomes RGB; alpha is dropped.
"""

import concurrent.futures
import dataclasses
import difflib
import functools
import hashlib
import io
import os
import tarfile
import tempfile
import warnings

import ml_collections as mlc
import numpy as np
import tensorflow as tf
from PIL import Image

SOURCES = ("embedded", "tfds", "folder")
EMBEDDED_NAMES = ("cifar10_sample", "cifar10")
EMBEDDED_SPLITS = {"train": 0, "test": 1}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Folders up to this many files are fully decoded once up front (CIFAR-sized:
# a few seconds); larger ones get the header/trailer checks only, and a file
# that passes them but fails to decode later stops the pipeline.
FULL_VERIFY_MAX_FILES = 100_000
# Decoders, chosen per file: TensorFlow's JPEG and PNG decoders handle every
# colour mode of those formats; anything else goes through PIL.
CODEC_JPEG, CODEC_PNG, CODEC_PIL = 0, 1, 2
_PIL_CODECS = {"JPEG": CODEC_JPEG, "MPO": CODEC_JPEG, "PNG": CODEC_PNG}
_EXTRACTED_MARKER = ".simclr_jax_extracted"


class UnreadableImageWarning(UserWarning):
    """Some files of an image folder could not be read and were skipped."""


@dataclasses.dataclass(frozen=True)
class _Table:
    """An indexable split: one row per example, in the split's fixed order."""

    keys: np.ndarray  # object: encoded bytes (embedded) or file paths (folder)
    codecs: np.ndarray  # int8, CODEC_*
    labels: np.ndarray  # int32
    keys_are_paths: bool


@dataclasses.dataclass(frozen=True)
class _TfdsSplit:
    builder: object
    split: str
    ranges: tuple[tuple[str, int, int], ...]  # (tfds split name, start, end), absolute
    image_key: str
    label_key: str


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
    """

    name: str
    split: str
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...]
    decoded_bytes: int | None = None
    _table: _Table | None = dataclasses.field(default=None, repr=False)
    _tfds: _TfdsSplit | None = dataclasses.field(default=None, repr=False)

    @property
    def indexable(self) -> bool:
        """Whether any example can be read by index (embedded and folder sources)."""
        return self._table is not None

    def shard_indices(self, process_index: int, process_count: int) -> np.ndarray:
        """Returns the split indices of a host's shard, in the shard's fixed order."""
        check_process(process_index, process_count)
        if self._table is not None:
            return np.arange(process_index, self.num_examples, process_count, dtype=np.int64)
        return _tfds_shard_indices(self._tfds.ranges, process_index, process_count)

    def records(self, process_index: int, process_count: int) -> tf.data.Dataset:
        """Undecoded examples of a host's shard: {'index', 'label', 'key', 'codec'}.

        Args:
          process_index: this host, in [0, process_count).
          process_count: number of hosts.

        Returns:
          A dataset in the order of shard_indices(); decode elements with decode().
        """
        if self._table is not None:
            return self.records_at(self.shard_indices(process_index, process_count))
        return _tfds_records(self._tfds, process_index, process_count)

    def records_at(self, indices: np.ndarray) -> tf.data.Dataset:
        """Undecoded examples at the given split indices (indexable sources only)."""
        return tf.data.Dataset.from_tensor_slices(self.table_rows(indices))

    def table_rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at `indices` as NumPy columns (indexable sources only)."""
        if self._table is None:
            raise ValueError(f"{self.name!r} (tfds) has no random access; use records()")
        indices = np.asarray(indices, np.int64)
        return {
            "index": indices,
            "label": self._table.labels[indices],
            "key": self._table.keys[indices],
            "codec": self._table.codecs[indices],
        }

    def decode(self, record: dict[str, tf.Tensor]) -> tf.Tensor:
        """Decodes one record's image to uint8 [H, W, 3] RGB (graph-safe)."""
        if self._table is not None:
            key = record["key"]
            data = tf.io.read_file(key) if self._table.keys_are_paths else key
            return decode_image_bytes(data, record["codec"])
        feature = self._tfds.builder.info.features[self._tfds.image_key]
        return _to_rgb(feature.decode_example(record["key"]))

    def shard(self, process_index: int, process_count: int) -> tf.data.Dataset:
        """Decoded examples {'image', 'label', 'index'} of one host, in fixed order.

        Args:
          process_index: this host, in [0, process_count).
          process_count: number of hosts.

        Returns:
          A finite tf.data.Dataset; see the module docstring for the split rule.
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


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"images with {channels} channels are not supported (expected 1, 3, 4)")
    return tf.ensure_shape(image, [None, None, 3])


def check_process(process_index: int, process_count: int) -> None:
    """Raises ValueError unless 0 <= process_index < process_count."""
    if not isinstance(process_count, int | np.integer) or process_count < 1:
        raise ValueError(f"process_count={process_count!r}: must be an int >= 1")
    if not isinstance(process_index, int | np.integer) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r}: must be in [0, {process_count})")


def _even_range(n: int, index: int, count: int) -> tuple[int, int]:
    """The [lo, hi) part of range(n) for `index`, the rule of tfds.even_splits."""
    per, extra = divmod(n, count)
    return per * index + min(index, extra), per * (index + 1) + min(index + 1, extra)


def _cfg(data_cfg: mlc.ConfigDict, field: str, default=None):
    value = data_cfg.get(field, default)
    return default if value is None else value


def validate_data_config(data_cfg: mlc.ConfigDict) -> None:
    """Raises ValueError naming the field, its value and what is allowed.

    Args:
      data_cfg: the data section of a config (fields listed in load_source).
    """
    source = data_cfg.get("source")
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: allowed values are {SOURCES}")
    val_fraction = _cfg(data_cfg, "val_fraction", 0.0)
    if isinstance(val_fraction, bool) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction!r}: must be in [0, 1)")
    if val_fraction > 0 and source != "folder":
        raise ValueError(
            f"data.val_fraction={val_fraction!r} applies to data.source='folder' only; for "
            "tfds hold out with split slicing, e.g. train_split='train[:90%]', "
            "eval_split='train[90%:]'"
        )
    name = data_cfg.get("name")
    if source == "embedded" and name not in (None, "", *EMBEDDED_NAMES):
        raise ValueError(
            f"data.name={name!r} with data.source='embedded': the embedded sample is "
            f"CIFAR-10 (name one of {EMBEDDED_NAMES}); use source='tfds' for other datasets"
        )
    if source in ("tfds", "folder") and not name:
        raise ValueError(f"data.name={name!r}: name the tfds dataset or the image folder")


def load_source(data_cfg: mlc.ConfigDict, split: str, *, seed: int = 0) -> DataSource:
    """Opens one split of the configured data source.

    Args:
      data_cfg: ConfigDict with source ('embedded' | 'tfds' | 'folder'), name,
        data_dir, download, train_split, eval_split, val_fraction, strict and,
        optionally, extract_dir (where archives are unpacked).
      split: split to read, e.g. data_cfg.train_split or data_cfg.eval_split.
      seed: seed of the folder hold-out split (val_fraction); keep it fixed
        across runs that must share the same validation set.

    Returns:
      A DataSource.
    """
    validate_data_config(data_cfg)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split={split!r}: expected a split name such as 'train'")
    if data_cfg.source == "embedded":
        return _load_embedded(split)
    if data_cfg.source == "tfds":
        return _load_tfds(data_cfg, split)
    return _load_folder(data_cfg, split, seed)


# ----------------------------------------------------------------------------
# Embedded sample.


def embedded_sample_path() -> str:
    """Path of the CIFAR-10 sample shipped with the package (4000 train + 1000 test)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "cifar10_sample.npz")


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> dict[str, np.ndarray]:
    with np.load(embedded_sample_path()) as f:
        return {k: f[k] for k in f.files}


def _load_embedded(split: str) -> DataSource:
    if split not in EMBEDDED_SPLITS:
        raise ValueError(
            f"split={split!r} of the embedded sample: available {list(EMBEDDED_SPLITS)}"
        )
    arrays = _embedded_arrays()
    rows = np.flatnonzero(arrays["split"] == EMBEDDED_SPLITS[split])
    offsets, blob = arrays["offsets"], arrays["jpeg"]
    keys = np.array([blob[offsets[i] : offsets[i + 1]].tobytes() for i in rows], dtype=object)
    class_names = tuple(str(c) for c in arrays["class_names"])
    table = _Table(keys, np.full(len(rows), CODEC_JPEG, np.int8), arrays["labels"][rows], False)
    return DataSource(
        name="cifar10_sample",
        split=split,
        num_examples=len(rows),
        num_classes=len(class_names),
        class_names=class_names,
        decoded_bytes=len(rows) * 32 * 32 * 3,
        _table=table,
    )


# ----------------------------------------------------------------------------
# TFDS.


def _load_tfds(data_cfg: mlc.ConfigDict, split: str) -> DataSource:
    import tensorflow_datasets as tfds  # Deferred: slow to import, only needed here.

    name, data_dir = data_cfg.name, data_cfg.get("data_dir")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=5)
        raise ValueError(
            f"data.name={name!r} is not a tfds dataset{f'; did you mean {close}' if close else ''}."
            " List the names with `tfds.list_builders()` or see "
            "https://www.tensorflow.org/datasets/catalog"
        ) from None
    except ValueError as e:  # E.g. an unknown config such as 'imagenet2012_subset/2pct'.
        raise ValueError(f"data.name={name!r}: {e}") from None
    if not builder.is_prepared():
        if not data_cfg.get("download", False):
            raise FileNotFoundError(_not_prepared_message(builder, name))
        builder.download_and_prepare()
    available = list(builder.info.splits.keys())
    try:
        absolute = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    except (ValueError, KeyError, AssertionError) as e:
        raise ValueError(
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
        raise ValueError(
            f"tfds dataset {name!r} has features {list(features.keys())}; expected an "
            "'image' and a 'label' feature (an image classification dataset)"
        )
    label_feature = features[label_key]
    num = sum(end - start for _, start, end in ranges)
    height, width = features[image_key].shape[:2]
    return DataSource(
        name=name,
        split=split,
        num_examples=num,
        num_classes=label_feature.num_classes,
        class_names=tuple(label_feature.names),
        decoded_bytes=num * height * width * 3 if height and width else None,
        _tfds=_TfdsSplit(builder, split, tuple(ranges), image_key, label_key),
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


def _tfds_shard_indices(ranges, process_index: int, process_count: int) -> np.ndarray:
    """Split indices of a host's tfds shard: its even part of every range, in order."""
    parts, offset = [np.zeros([0], np.int64)], 0
    for _, start, end in ranges:
        lo, hi = _even_range(end - start, process_index, process_count)
        parts.append(np.arange(offset + lo, offset + hi, dtype=np.int64))
        offset += end - start
    return np.concatenate(parts)


def _tfds_records(spec: _TfdsSplit, process_index: int, process_count: int) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    instructions = []
    for splitname, start, end in spec.ranges:
        lo, hi = _even_range(end - start, process_index, process_count)
        if hi > lo:
            instructions.append(tfds.core.ReadInstruction(splitname, start + lo, start + hi, "abs"))
    # Cycle length 1 reads the files in order, so 'index' is the absolute position.
    read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
    if instructions:
        split = functools.reduce(lambda a, b: a + b, instructions)
    else:
        split, start = spec.ranges[0][0], spec.ranges[0][1]  # An empty shard: read nothing.
        split = tfds.core.ReadInstruction(split, start, start + 1, "abs")
    ds = spec.builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={spec.image_key: tfds.decode.SkipDecoding()},
        read_config=read_config,
    )
    if not instructions:
        ds = ds.take(0)
    # The shard's indices are known arithmetically; zip them in rather than trust
    # a per-record id.
    indices = tf.data.Dataset.from_tensor_slices(
        _tfds_shard_indices(spec.ranges, process_index, process_count)
    )
    return tf.data.Dataset.zip(ds, indices).map(
        lambda ex, i: {
            "index": i,
            "label": tf.cast(ex[spec.label_key], tf.int32),
            "key": ex[spec.image_key],
            "codec": tf.constant(-1, tf.int8),
        }
    )


# ----------------------------------------------------------------------------
# Image folders.


@dataclasses.dataclass(frozen=True)
class _ImageFile:
    path: str
    ok: bool
    reason: str = ""
    codec: int = CODEC_PIL
    pixels: int = 0


def _load_folder(data_cfg: mlc.ConfigDict, split: str, seed: int) -> DataSource:
    name = os.path.expanduser(str(data_cfg.name))
    root = _find_tree_root(_open_folder(name, data_cfg.get("extract_dir")), name)
    splits, class_names = _folder_layout(root, name)
    train_split = _cfg(data_cfg, "train_split", "train")
    eval_split = _cfg(data_cfg, "eval_split", "test")
    val_fraction = _cfg(data_cfg, "val_fraction", 0.0)
    strict = bool(data_cfg.get("strict", False))
    # A seeded part of the train images is held out when the tree has no split
    # folders, or has the train folder but no eval folder.
    hold_out = val_fraction > 0 and (
        splits is None or (train_split in splits and eval_split not in splits)
    )
    if hold_out and split in (train_split, eval_split):
        files = _checked_files(root if splits is None else splits[train_split], class_names, strict)
        held_out = _holdout_mask(files[1], val_fraction, seed)
        keep = held_out if split == eval_split else ~held_out
        files = tuple(column[keep] for column in files)
    elif splits is not None and split in splits:
        files = _checked_files(splits[split], class_names, strict)
    elif splits is None and split == train_split:
        files = _checked_files(root, class_names, strict)
    else:
        if splits is None:
            available = [train_split]
            hint = (
                "set data.val_fraction > 0 to hold out an eval split, or use root/<split>/<class>/"
            )
        else:
            available = sorted(splits) + ([eval_split] if hold_out else [])
            hint = "add the split folder or set data.val_fraction > 0 to hold out part of train"
        raise ValueError(
            f"split={split!r} not found in image folder {name!r} (root {root}): available "
            f"splits {available}; {hint}"
        )
    paths, labels, codecs, pixels = files
    if not len(paths):
        raise ValueError(f"split={split!r} of image folder {name!r} has no readable images")
    return DataSource(
        name=name,
        split=split,
        num_examples=len(paths),
        num_classes=len(class_names),
        class_names=class_names,
        decoded_bytes=int(pixels.sum()) * 3,
        _table=_Table(paths, codecs, labels, True),
    )


def _open_folder(name: str, extract_dir: str | None) -> str:
    """Returns a directory for `name`, extracting it first if it is an archive."""
    if not os.path.exists(name):
        raise ValueError(
            f"data.name={name!r}: no such image folder or archive; expected "
            "root/<split>/<class>/<image>, root/<class>/<image> or a .tar/.tar.gz of either"
        )
    if os.path.isdir(name):
        return name
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise ValueError(f"data.name={name!r} is a file but not an archive {ARCHIVE_SUFFIXES}")
    return extract_archive(name, extract_dir)


def extract_archive(path: str, extract_dir: str | None = None) -> str:
    """Extracts a tar archive once and returns the directory holding its files.

    The target is <extract_dir>/<name>-<hash of real path, size, mtime>, so a
    changed archive is extracted anew. Extraction goes to a temporary sibling
    renamed into place when complete: an interrupted run never leaves a partial
    tree, and concurrent processes on one machine keep whichever copy lands first.

    Args:
      path: a .tar, .tar.gz or .tgz file.
      extract_dir: parent directory of the extracted trees; default
        <system tmp>/simclr_jax_archives.

    Returns:
      The extracted directory.
    """
    stat = os.stat(path)
    digest = hashlib.sha1(
        f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    stem = os.path.basename(path).split(".")[0] or "archive"
    parent = extract_dir or os.path.join(tempfile.gettempdir(), "simclr_jax_archives")
    target = os.path.join(parent, f"{stem}-{digest}")
    if os.path.exists(os.path.join(target, _EXTRACTED_MARKER)):
        return target
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{stem}-", dir=parent)
    try:
        with tarfile.open(path) as tar:
            tar.extractall(staging, filter="data")  # 'data' refuses links out of the tree.
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"data.name={path!r}: cannot extract the archive ({e})") from None
    open(os.path.join(staging, _EXTRACTED_MARKER), "w").close()
    try:
        os.rename(staging, target)
    except OSError:
        if not os.path.exists(os.path.join(target, _EXTRACTED_MARKER)):
            raise
    return target


def _visible(entries) -> list:
    return sorted(
        (e for e in entries if not e.name.startswith((".", "__MACOSX"))), key=lambda e: e.name
    )


def _image_files(directory: str) -> list[str]:
    with os.scandir(directory) as it:
        return [
            e.path
            for e in _visible(it)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        ]


def _subdirs(directory: str) -> list[str]:
    with os.scandir(directory) as it:
        return [e.path for e in _visible(it) if e.is_dir()]


def _find_tree_root(path: str, name: str) -> str:
    """Steps through single wrapper folders (e.g. an archive's top folder)."""
    while True:
        subdirs = _subdirs(path)
        holds_classes = any(_image_files(d) for d in subdirs)
        holds_splits = any(_image_files(c) for d in subdirs for c in _subdirs(d))
        if holds_classes or holds_splits or len(subdirs) != 1 or _image_files(path):
            break
        path = subdirs[0]
    if not holds_classes and not holds_splits:
        raise ValueError(
            f"data.name={name!r}: found no images ({', '.join(IMAGE_EXTENSIONS)}) in "
            f"{path}/<class>/ or {path}/<split>/<class>/; images must sit in class folders"
        )
    if holds_classes and holds_splits:
        raise ValueError(
            f"data.name={name!r}: {path} mixes class folders with split folders; use either "
            "root/<class>/<image> or root/<split>/<class>/<image>"
        )
    return path


def _folder_layout(root: str, name: str) -> tuple[dict[str, str] | None, tuple[str, ...]]:
    """Returns ({split: dir} or None when root holds classes, sorted class names)."""
    subdirs = _subdirs(root)
    if any(_image_files(d) for d in subdirs):
        classes = [os.path.basename(d) for d in subdirs if _image_files(d)]
        return None, tuple(classes)
    splits = {os.path.basename(d): d for d in subdirs if any(_image_files(c) for c in _subdirs(d))}
    # One class list for all splits, so a label means the same class everywhere.
    classes = sorted(
        {os.path.basename(c) for d in splits.values() for c in _subdirs(d) if _image_files(c)}
    )
    return splits, tuple(classes)


def _checked_files(directory: str, class_names: tuple[str, ...], strict: bool):
    """Lists, checks and labels the images of directory/<class>/.

    Unreadable files raise (strict) or are named in one UnreadableImageWarning.

    Returns:
      (paths, labels, codecs, pixels) NumPy arrays of the readable images, sorted
      by (label, file name).
    """
    checked, labels = _scan_class_folders(directory, class_names)
    bad = [f for f in checked if not f.ok]
    if bad and strict:
        raise ValueError(
            f"unreadable image {bad[0].path}: {bad[0].reason} ({len(bad)} unreadable in "
            f"{directory}; data.strict=True, set it to False to skip them)"
        )
    if bad:
        listing = "\n".join(f"  {f.path}: {f.reason}" for f in bad)
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) of {len(checked)} in "
            f"{directory}:\n{listing}",
            UnreadableImageWarning,
            stacklevel=4,  # The caller of load_source.
        )
    good = [i for i, f in enumerate(checked) if f.ok]
    return (
        np.array([checked[i].path for i in good], dtype=object),
        np.array([labels[i] for i in good], np.int32),
        np.array([checked[i].codec for i in good], np.int8),
        np.array([checked[i].pixels for i in good], np.int64),
    )


# Memoised: a run opens the train split several times (pretraining, then eval
# features), and checking a large folder takes seconds.
@functools.lru_cache(maxsize=16)
def _scan_class_folders(directory: str, class_names: tuple[str, ...]):
    candidates, labels = [], []
    for label, cls in enumerate(class_names):
        class_dir = os.path.join(directory, cls)
        files = _image_files(class_dir) if os.path.isdir(class_dir) else []
        candidates += files
        labels += [label] * len(files)
    full = len(candidates) <= FULL_VERIFY_MAX_FILES
    workers = min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        checked = list(pool.map(functools.partial(_inspect_image, full_decode=full), candidates))
    return tuple(checked), tuple(labels)


def _inspect_image(path: str, *, full_decode: bool) -> _ImageFile:
    """Checks that a file is a decodable image and picks its decoder.

    Always: non-empty, PIL recognises the format, and a JPEG ends with its
    end-of-image marker / a PNG with its IEND chunk (catches truncated files
    cheaply). A file failing the trailer check, a non-JPEG/PNG file, and every
    file when full_decode, is decoded with PIL to be sure.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return _ImageFile(path, False, "empty file")
        with open(path, "rb") as f:
            f.seek(max(0, size - 64))
            tail = f.read()
        with Image.open(path) as image:
            fmt, (width, height) = image.format, image.size
            codec = _PIL_CODECS.get(fmt, CODEC_PIL)
            intact = (codec == CODEC_JPEG and tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")) or (
                codec == CODEC_PNG and b"IEND" in tail
            )
            if full_decode or not intact:
                image.load()
                if not intact and codec != CODEC_PIL:
                    # PIL may tolerate a missing trailer that TensorFlow rejects.
                    tf_decode = tf.io.decode_jpeg if codec == CODEC_JPEG else tf.io.decode_png
                    with open(path, "rb") as f:
                        tf_decode(f.read(), channels=3)
    except (OSError, SyntaxError, ValueError, tf.errors.OpError, Image.DecompressionBombError) as e:
        return _ImageFile(path, False, f"{type(e).__name__}: {e}".strip())
    return _ImageFile(path, True, codec=codec, pixels=width * height)


def _holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Marks round(fraction * n_c) seeded picks of every class c as held out."""
    mask = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = int(round(fraction * len(rows)))
        rng = np.random.default_rng([seed, int(label)])
        mask[rows[rng.permutation(len(rows))[:count]]] = True
    return mask
