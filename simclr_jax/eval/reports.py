"""Evaluation reports: accuracy summaries, confusion matrix PNG, results.json, TensorBoard.

Only process 0 writes files, through simclr_jax.files (local or gs://).
Scalars go to TensorBoard and metrics.jsonl through metrics.MetricLogger under
'eval/<name>'.
"""

import io
import json

import jax
import numpy as np

from simclr_jax import files
from simclr_jax.labels import keep_labelled
from simclr_jax.metrics import MetricLogger

CONFUSION_FILE = "confusion_matrix.png"


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of the labelled rows whose label is among the k highest scores.

    Args:
      scores: [N, K] class scores.
      labels: [N] int labels; rows outside [0, K) (tfds's -1: unlabelled) are not scored.
      k: how many of the highest scores count (clipped to K).

    Returns:
      The accuracy in [0, 1]; NaN when no row is labelled.
    """
    labels, scores = keep_labelled(labels, scores.shape[1], scores)
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts; row = true class, column = prediction.

    Rows whose label is outside [0, num_classes) (unlabelled) are not counted.
    """
    labels, predictions = keep_labelled(labels, num_classes, predictions)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def summarize(scores: np.ndarray, labels: np.ndarray, class_names) -> dict:
    """Top-1, top-5 and per-class accuracy of class scores, over the labelled rows.

    Args:
      scores: [N, K] class scores (argmax = prediction).
      labels: [N] int labels; rows outside [0, K) (tfds's -1: unlabelled) are not scored.
      class_names: K names.

    Returns:
      {'top1', 'top5', 'per_class': {name: accuracy (NaN if absent)},
      'confusion': [K, K] list, 'examples': labelled rows scored,
      'unlabelled_examples': rows skipped}.
    """
    num_classes = scores.shape[1]
    scored, kept = keep_labelled(labels, num_classes, scores)
    matrix = confusion_matrix(np.argmax(kept, axis=1), scored, num_classes)
    counts = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diag(matrix) / counts
    return {
        "top1": topk_accuracy(kept, scored, 1),
        "top5": topk_accuracy(kept, scored, 5),
        "per_class": {str(n): float(a) for n, a in zip(class_names, per_class, strict=True)},
        "confusion": matrix.tolist(),
        "examples": int(len(scored)),
        "unlabelled_examples": int(len(labels) - len(scored)),
    }


def plot_confusion(matrix, class_names, path: str, title: str) -> None:
    """Writes a row-normalised confusion matrix as a PNG (matplotlib, Agg backend).

    Args:
      matrix: [K, K] counts (row = true class).
      class_names: K names.
      path: the PNG's path (local or remote).
      title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, np.float64)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.5 * len(class_names))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=90)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()  # matplotlib writes local files only; files.py writes anywhere
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    files.write_bytes(path, buffer.getvalue())


def write_results(workdir: str, results: dict, *, step: int = 0) -> None:
    """Writes results.json (atomically), the confusion PNG and eval/* scalars.

    Args:
      workdir: output directory.
      results: the protocol's results; a 'summary' entry from summarize() gets
        a confusion-matrix PNG, and every float at the top level or in
        'summary' / 'random_init' becomes an 'eval/...' scalar.
      step: the step the scalars are logged at (the checkpoint's).
    """
    if jax.process_index() != 0:
        return
    files.makedirs(workdir)
    summary = results.get("summary")
    if summary is not None:
        names = list(summary["per_class"])
        title = f"{results.get('protocol', '')} top-1 {summary['top1']:.3f}"
        plot_confusion(summary["confusion"], names, files.join(workdir, CONFUSION_FILE), title)
    scalars = {}
    for prefix, section in (("", results), ("", summary or {})):
        for key, value in section.items():
            if isinstance(value, float):
                scalars[f"eval/{prefix}{key}"] = value
    for key, value in (results.get("random_init") or {}).items():
        if isinstance(value, float):
            scalars[f"eval/random_init_{key}"] = value
    logger = MetricLogger(workdir, total_steps=0, is_main=True)
    logger.write_scalars(step, scalars)
    logger.close()
    text = json.dumps(results, indent=2, sort_keys=True)
    files.write_text(files.join(workdir, files.RESULTS_FILE), text)
