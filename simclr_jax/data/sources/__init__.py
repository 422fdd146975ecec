"""Data sources: the embedded CIFAR-10 sample, TFDS datasets and image folders.

`load_source(data_cfg, split)` returns a `base.DataSource`: the split's size, its
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
(see simclr_jax/data/order.py), so there a host may read any example.

One module per source: embedded.py, tfds.py, folder.py (folders and archives);
base.py holds what they share (DataSource, image decoding, host checks).
"""

import ml_collections as mlc

from simclr_jax.config_checks import DATA_SOURCES, ConfigError
from simclr_jax.data import order
from simclr_jax.data.sources import base, embedded, folder, tfds

SPLIT_FIELDS = ("train_split", "eval_split")


def validate_data_config(data_cfg: mlc.ConfigDict) -> None:
    """Raises ConfigError (a ValueError) naming the field, its value and what is allowed.

    Args:
      data_cfg: the data section of a config (fields listed in load_source).
    """
    source = data_cfg.get("source")
    if source not in DATA_SOURCES:
        raise ConfigError(f"data.source={source!r}: allowed values are {DATA_SOURCES}")
    val_fraction = base.data_field(data_cfg, "val_fraction", 0.0)
    if isinstance(val_fraction, bool) or not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction!r}: must be in [0, 1)")
    if val_fraction > 0 and source != "folder":
        raise ConfigError(
            f"data.val_fraction={val_fraction!r} applies to data.source='folder' only; for "
            "tfds hold out with split slicing, e.g. train_split='train[:90%]', "
            "eval_split='train[90%:]'"
        )
    name = data_cfg.get("name")
    if source == "embedded" and name not in (None, "", *embedded.EMBEDDED_NAMES):
        raise ConfigError(
            f"data.name={name!r} with data.source='embedded': the embedded sample is "
            f"CIFAR-10 (name one of {embedded.EMBEDDED_NAMES}); use source='tfds' for other "
            "datasets"
        )
    if source in ("tfds", "folder") and not name:
        raise ConfigError(f"data.name={name!r}: name the tfds dataset or the image folder")


def load_source(
    data_cfg: mlc.ConfigDict, split: str, *, seed: int | None = None
) -> base.DataSource:
    """Opens one split of the configured data source.

    Args:
      data_cfg: ConfigDict with source ('embedded' | 'tfds' | 'folder'), name,
        data_dir, download, train_split, eval_split, val_fraction, strict and,
        optionally, extract_dir (where archives are unpacked).
      split: split to read, e.g. data_cfg.train_split or data_cfg.eval_split.
      seed: seed of the folder hold-out split (val_fraction); None reads
        data.split_seed (order.split_seed), as the pipeline does. Keep it fixed
        across runs that must share the same validation set.

    Returns:
      A DataSource.

    Raises:
      base.UnknownSplitError: the dataset has no such split (lists the available ones).
    """
    validate_data_config(data_cfg)
    seed = order.split_seed(data_cfg) if seed is None else seed
    if not isinstance(split, str) or not split:
        raise ConfigError(f"split={split!r}: expected a split name such as 'train'")
    if data_cfg.source == "embedded":
        return embedded.load_embedded(split)
    if data_cfg.source == "tfds":
        return tfds.load_tfds(data_cfg, split)
    return folder.load_folder(data_cfg, split, seed)


def open_split(data_cfg: mlc.ConfigDict, field: str) -> base.DataSource:
    """Opens the split named by data_cfg.<field>, naming the field when it does not exist.

    Runs open every split they will read before their first step with this, so a
    mistyped split fails in seconds, not after training.

    Args:
      data_cfg: the config's data section.
      field: 'train_split' or 'eval_split'.

    Returns:
      The DataSource of that split.

    Raises:
      ConfigError: 'config.data.<field>=<value> is invalid: ...' with the available splits,
        or for an empty split.
    """
    if field not in SPLIT_FIELDS:
        raise ValueError(f"field={field!r}: expected one of {SPLIT_FIELDS}")
    try:
        source = load_source(data_cfg, data_cfg[field])
    except base.UnknownSplitError as e:
        raise ConfigError(f"config.data.{field}={data_cfg[field]!r} is invalid: {e}") from None
    if source.num_examples == 0:
        raise ConfigError(f"config.data.{field}={data_cfg[field]!r} is invalid: it is empty.")
    return source


def open_splits(data_cfg: mlc.ConfigDict) -> tuple[base.DataSource, base.DataSource]:
    """(train split, eval split), both opened with open_split.

    Every source gives all splits of a dataset one class list, so a label means the same
    class in both.
    """
    return open_split(data_cfg, "train_split"), open_split(data_cfg, "eval_split")
