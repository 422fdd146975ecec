"""The folder source: image folders and .tar / .tar.gz / .tgz archives of them.

Layouts: root/<split>/<class>/<image> or root/<class>/<image> (then
`val_fraction` holds out a seeded, class-stratified eval split), or a .tar /
.tar.gz / .tgz archive holding such a tree, extracted once into
`data_cfg.extract_dir` (default: <tmp>/simclr_jax_archives/<name>-<hash of
path, size, mtime>) and reused afterwards. Every file is checked before the
count is fixed (see `_inspect_image`); unreadable files are skipped and named in
one warning, or raise with `strict=True`. JPEG and PNG are decoded by
TensorFlow; other formats (BMP, WebP, GIF, ...) with PIL. Any mode (grayscale,
CMYK, palette, RGBA) becomes RGB; alpha is dropped. The split is a Table of file
paths sorted by (class, file name), so any example can be read by index.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import tarfile
import tempfile
import warnings

import ml_collections as mlc
import numpy as np
import tensorflow as tf
from PIL import Image

from simclr_jax.config_checks import ConfigError, MissingPathError
from simclr_jax.data.sources import base

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Folders up to this many files are fully decoded once up front (CIFAR-sized:
# a few seconds); larger ones get the header/trailer checks only, and a file
# that passes them but fails to decode later stops the pipeline.
FULL_VERIFY_MAX_FILES = 100_000
_PIL_CODECS = {"JPEG": base.CODEC_JPEG, "MPO": base.CODEC_JPEG, "PNG": base.CODEC_PNG}
_EXTRACTED_MARKER = ".simclr_jax_extracted"


class UnreadableImageWarning(UserWarning):
    """Some files of an image folder could not be read and were skipped."""


@dataclasses.dataclass(frozen=True)
class _ImageFile:
    path: str
    ok: bool
    reason: str = ""
    codec: int = base.CODEC_PIL
    pixels: int = 0


def load_folder(data_cfg: mlc.ConfigDict, split: str, seed: int) -> base.DataSource:
    """Opens `split` of the image folder or archive data_cfg.name (see sources.load_source)."""
    name = os.path.expanduser(str(data_cfg.name))
    root = _find_tree_root(_open_folder(name, data_cfg.get("extract_dir")), name)
    splits, class_names = _folder_layout(root, name)
    train_split = base.data_field(data_cfg, "train_split", "train")
    eval_split = base.data_field(data_cfg, "eval_split", "test")
    val_fraction = base.data_field(data_cfg, "val_fraction", 0.0)
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
        raise base.UnknownSplitError(
            f"split={split!r} not found in image folder {name!r} (root {root}): available "
            f"splits {available}; {hint}"
        )
    paths, labels, codecs, pixels = files
    if not len(paths):
        raise ConfigError(f"split={split!r} of image folder {name!r} has no readable images")
    return base.DataSource(
        name=name,
        split=split,
        num_examples=len(paths),
        num_classes=len(class_names),
        class_names=class_names,
        decoded_bytes=int(pixels.sum()) * 3,
        table=base.Table(paths, codecs, labels, True),
    )


def _open_folder(name: str, extract_dir: str | None) -> str:
    """Returns a directory for `name`, extracting it first if it is an archive."""
    if not os.path.exists(name):
        raise MissingPathError(
            f"data.name={name!r}: no such image folder or archive; expected "
            "root/<split>/<class>/<image>, root/<class>/<image> or a .tar/.tar.gz of either"
        )
    if os.path.isdir(name):
        return name
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise ConfigError(f"data.name={name!r} is a file but not an archive {ARCHIVE_SUFFIXES}")
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
        raise ConfigError(f"data.name={path!r}: cannot extract the archive ({e})") from None
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
        raise ConfigError(
            f"data.name={name!r}: found no images ({', '.join(IMAGE_EXTENSIONS)}) in "
            f"{path}/<class>/ or {path}/<split>/<class>/; images must sit in class folders"
        )
    if holds_classes and holds_splits:
        raise ConfigError(
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
        raise ConfigError(
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
            codec = _PIL_CODECS.get(fmt, base.CODEC_PIL)
            intact = (
                codec == base.CODEC_JPEG and tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
            ) or (codec == base.CODEC_PNG and b"IEND" in tail)
            if full_decode or not intact:
                image.load()
                if not intact and codec != base.CODEC_PIL:
                    # PIL may tolerate a missing trailer that TensorFlow rejects.
                    tf_decode = tf.io.decode_jpeg if codec == base.CODEC_JPEG else tf.io.decode_png
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
