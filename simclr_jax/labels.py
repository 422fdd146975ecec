"""What counts as a label: an int in [0, num_classes); anything else means "no label".

TFDS marks unlabelled examples with -1 (STL-10's 'unlabelled' split, so
'train+unlabelled' mixes both), and image folders or user datasets may hold
labels outside the class range. Such examples still serve self-supervised
pretraining, but they never act as a class: every consumer of labels (the
online probe's loss and accuracy, the kNN memory bank, linear evaluation,
fine-tuning subsets and reports) masks them with `is_labelled` or refuses them
with an error where a label is required. JAX would otherwise wrap -1 to the
last class in an index or a one-hot.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

UNLABELLED = -1  # TFDS's label of an unlabelled example


def is_labelled(labels, num_classes: int):
    """Boolean mask of the labels in [0, num_classes).

    Args:
      labels: int labels, any shape; a NumPy or JAX array (the result has the
        same kind, so it works inside jit).
      num_classes: the dataset's class count.

    Returns:
      bool array of labels' shape: True where the example has a usable label.
    """
    return (labels >= 0) & (labels < num_classes)


def keep_labelled(labels: np.ndarray, num_classes: int, *arrays: np.ndarray):
    """The rows whose label is in [0, num_classes), of labels and of each array.

    Args:
      labels: [N] int labels (NumPy).
      num_classes: the dataset's class count.
      *arrays: [N, ...] arrays row-aligned with labels (features, logits).

    Returns:
      (labels[mask], *[a[mask] for a in arrays]).
    """
    labels = np.asarray(labels)
    mask = is_labelled(labels, num_classes)
    return (labels[mask], *(np.asarray(a)[mask] for a in arrays))


def labelled_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row softmax cross-entropy, 0 with no gradient where the row has no label.

    Args:
      logits: [n, classes] float.
      labels: [n] int; rows outside [0, classes) are masked (an index of -1 would
        otherwise pick the last class).

    Returns:
      (cross-entropy [n] float32, labelled [n] bool).
    """
    labelled = is_labelled(labels, logits.shape[-1])
    safe = jnp.where(labelled, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.where(labelled, ce, 0.0), labelled


def mean_labelled_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The mean softmax cross-entropy over the labelled rows (0 when none is); a scalar."""
    ce, labelled = labelled_cross_entropy(logits, labels)
    return jnp.sum(ce) / jnp.maximum(jnp.sum(labelled), 1)
