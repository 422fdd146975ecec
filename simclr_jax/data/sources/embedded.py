"""The embedded source: a CIFAR-10 sample shipped with the package, no download.

simclr_jax/data/assets/cifar10_sample.npz holds 4000 train and 1000 test images
as their original JPEG bytes (made by simclr_jax/data/make_embedded_sample.py).
Each split is a Table, so any example can be read by index.
"""

import functools
import os

import numpy as np

from simclr_jax.config_checks import ConfigError
from simclr_jax.data.sources import base

EMBEDDED_NAMES = ("cifar10_sample", "cifar10")
EMBEDDED_SPLITS = {"train": 0, "test": 1}


def embedded_sample_path() -> str:
    """Path of the CIFAR-10 sample shipped with the package (4000 train + 1000 test)."""
    data_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(data_dir, "assets", "cifar10_sample.npz")


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> dict[str, np.ndarray]:
    with np.load(embedded_sample_path()) as f:
        return {k: f[k] for k in f.files}


def load_embedded(split: str) -> base.DataSource:
    """Opens `split` ('train' or 'test') of the embedded sample."""
    if split not in EMBEDDED_SPLITS:
        raise ConfigError(
            f"split={split!r} of the embedded sample: available {list(EMBEDDED_SPLITS)}"
        )
    arrays = _embedded_arrays()
    rows = np.flatnonzero(arrays["split"] == EMBEDDED_SPLITS[split])
    offsets, blob = arrays["offsets"], arrays["jpeg"]
    keys = np.array([blob[offsets[i] : offsets[i + 1]].tobytes() for i in rows], dtype=object)
    class_names = tuple(str(c) for c in arrays["class_names"])
    table = base.Table(
        keys, np.full(len(rows), base.CODEC_JPEG, np.int8), arrays["labels"][rows], False
    )
    return base.DataSource(
        name="cifar10_sample",
        split=split,
        num_examples=len(rows),
        num_classes=len(class_names),
        class_names=class_names,
        decoded_bytes=len(rows) * 32 * 32 * 3,
        table=table,
    )
