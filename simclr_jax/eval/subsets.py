"""Labelled subsets for semi-supervised fine-tuning (1% / 10% / 100% of labels).

Subsets are class-balanced (every class keeps the same fraction of its
examples, at least one) and seeded. Each class's examples are put in one
seeded order that does not depend on the fraction and a subset takes a prefix
of it, so subsets are nested: the 1% subset lies inside the 10% subset of the
same seed. ImageNet uses the published subsets instead (tfds
'imagenet2012_subset/1pct' and '/10pct'), see resolve_finetune_data.
Examples without a label (outside [0, num_classes), e.g. tfds's -1 in
'train+unlabelled') are never drawn.
"""

import ml_collections as mlc
import numpy as np

from simclr_jax.config_checks import ConfigError
from simclr_jax.data import sources
from simclr_jax.labels import is_labelled

IMAGENET_OFFICIAL = {0.01: "imagenet2012_subset/1pct", 0.1: "imagenet2012_subset/10pct"}


def check_fraction(fraction) -> float:
    """Returns fraction as a float; ConfigError (a ValueError) unless it lies in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ConfigError(f"finetune.label_fraction={fraction!r}: must be a number in (0, 1]")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"finetune.label_fraction={fraction!r}: must be in (0, 1], e.g. 0.01, 0.1 or 1.0"
        )
    return float(fraction)


def class_balanced_subset(
    labels: np.ndarray, fraction: float, seed: int, *, num_classes: int
) -> np.ndarray:
    """Indices of a class-balanced, seeded, nested subset of the labelled examples.

    Args:
      labels: [N] int labels of the split in its fixed order.
      fraction: share of each class to keep, in (0, 1]; each class keeps
        max(1, round(fraction * count)) examples.
      seed: the subset's seed; subsets of one seed are nested across fractions.
      num_classes: the dataset's class count; examples with a label outside
        [0, num_classes) (unlabelled) are never chosen.

    Returns:
      Sorted int64 indices into the split.

    Raises:
      ConfigError: for a fraction outside (0, 1], or when no example is labelled.
    """
    fraction = check_fraction(fraction)
    labels = np.asarray(labels)
    classes = np.unique(labels[is_labelled(labels, num_classes)])
    if not len(classes):
        raise ConfigError(
            f"the split has no example labelled in [0, {num_classes}): a label subset needs "
            "labels; set config.data.train_split to a labelled split"
        )
    chosen = []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        # One generator per (seed, class): a class's order does not depend on
        # the other classes or on the fraction, which is what nests subsets.
        order = np.random.default_rng([seed, int(cls)]).permutation(members)
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(order[:keep])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_labels(data_cfg: mlc.ConfigDict) -> tuple[np.ndarray, int]:
    """(labels of the train split in the pipeline's fixed order, the class count).

    Indexable sources read their table; a tfds split is read once without decoding
    its images (a pass over its records).
    """
    source = sources.load_source(data_cfg, data_cfg.train_split)
    if source.indexable:
        return source.table_rows(np.arange(source.num_examples))["label"], source.num_classes
    labels = [b.numpy() for b in source.records(0, 1).map(lambda r: r["label"]).batch(8192)]
    return np.concatenate(labels), source.num_classes


def labelled_subset(data_cfg: mlc.ConfigDict) -> np.ndarray | None:
    """The train split's labelled examples, for a protocol that trains on every label.

    Args:
      data_cfg: the config's data section.

    Returns:
      None when every example is labelled (the whole split), else the sorted int64
      indices of the examples labelled in [0, num_classes).

    Raises:
      ConfigError: when no example of the split is labelled.
    """
    labels, num_classes = split_labels(data_cfg)
    labelled = is_labelled(labels, num_classes)
    if not labelled.any():
        raise ConfigError(
            f"config.data.train_split={data_cfg.train_split!r} is invalid: it has no example "
            f"labelled in [0, {num_classes}) (unlabelled examples carry -1), and this protocol "
            "trains on labels; use a labelled split such as 'train'."
        )
    return None if labelled.all() else np.flatnonzero(labelled).astype(np.int64)


def resolve_finetune_data(
    data_cfg: mlc.ConfigDict, fraction: float, seed: int, *, official_imagenet: bool = True
) -> tuple[mlc.ConfigDict, np.ndarray | None]:
    """The data config and subset indices that fine-tuning on `fraction` of labels uses.

    Args:
      data_cfg: the config's data section.
      fraction: label fraction in (0, 1].
      seed: subset seed.
      official_imagenet: for tfds imagenet2012 at 1% / 10%, use the published
        subsets (tfds imagenet2012_subset/1pct|10pct) instead of a drawn one.

    Returns:
      (data_cfg, subset_indices): indices None means the whole train split. At fraction 1
      they are the labelled examples of a split that has unlabelled ones (labelled_subset);
      unlabelled examples are never in a subset.
    """
    fraction = check_fraction(fraction)
    if fraction == 1.0:
        return data_cfg, labelled_subset(data_cfg)
    if (
        official_imagenet
        and data_cfg.source == "tfds"
        and data_cfg.name == "imagenet2012"
        and fraction in IMAGENET_OFFICIAL
    ):
        official = mlc.ConfigDict(data_cfg.to_dict())
        official.name = IMAGENET_OFFICIAL[fraction]
        return official, None
    labels, num_classes = split_labels(data_cfg)
    return data_cfg, class_balanced_subset(labels, fraction, seed, num_classes=num_classes)
