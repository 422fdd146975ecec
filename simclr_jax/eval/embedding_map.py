"""A 2-D map of representations (t-SNE or UMAP) and its picture, coloured by class.

`map_2d(features, method)` places every row of h in the plane: t-SNE with
scikit-learn (default) or UMAP with umap-learn (the optional extra
`pip install -e '.[umap]'`), both on l2-normalised rows, the cosine
geometry the kNN evaluation uses. `plot_map` writes the points as a PNG
(matplotlib, Agg backend) of FIGURE_PIXELS, one colour per class with a legend of
the class names; unlabelled examples (simclr_jax.labels) are grey.

Cost on 2 CPU cores (docs/embeddings.md): t-SNE of 1,000 points 4 s, of 4,000 points
19 s; UMAP of 1,000 points 16 s, plus about 25 s compiling its numba kernels on first
use. Both grow faster than linearly, hence the command-line tool's subsample
(`subsample_rows`).
"""

import io

import numpy as np

from simclr_jax import files
from simclr_jax import labels as labels_lib
from simclr_jax.config_checks import ConfigError

METHODS = ("tsne", "umap")
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}
UMAP_INSTALL = "pip install -e '.[umap]' in the repository (or: pip install umap-learn==0.5.12)"
# The picture: FIGURE_INCHES at DPI, so FIGURE_PIXELS (width, height).
FIGURE_INCHES = (8.0, 6.5)
DPI = 100
FIGURE_PIXELS = (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))
# The fewest rows a map is made of (t-SNE's perplexity needs a few neighbours).
MIN_MAP_ROWS = 4
# Beyond this many classes one colour per class cannot be told apart: no legend.
MAX_LEGEND_CLASSES = 20


def check_method(method: str) -> None:
    """Raises ConfigError naming the choices unless `method` is one of METHODS."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not a map method; use one of {METHODS}")


def subsample_rows(num_rows: int, max_rows: int, seed: int) -> np.ndarray:
    """Rows of a map of at most max_rows points: all, or a seeded uniform subset.

    Args:
      num_rows: rows available (N).
      max_rows: the most to keep; 0 keeps all.
      seed: seed of the subset.

    Returns:
      int64 [min(N, max_rows)] row indices in increasing order.

    Raises:
      ConfigError: for a negative max_rows or one below MIN_MAP_ROWS.
    """
    if max_rows < 0 or 0 < max_rows < MIN_MAP_ROWS:
        raise ConfigError(
            f"max_examples={max_rows}: use 0 for all rows or a count of at least {MIN_MAP_ROWS} "
            "(the fewest points a 2-D map is made of)"
        )
    if max_rows == 0 or num_rows <= max_rows:
        return np.arange(num_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, size=max_rows, replace=False)).astype(np.int64)


def map_2d(features: np.ndarray, method: str = "tsne", *, seed: int = 0) -> np.ndarray:
    """Places each row of `features` in the plane.

    Args:
      features: [n, d] float representations (h), n >= 4.
      method: 'tsne' (scikit-learn's Barnes-Hut t-SNE, perplexity 30 or less for
        small n, PCA initialisation) or 'umap' (umap-learn, 15 neighbours).
      seed: random seed of the method (the same seed gives the same map).

    Returns:
      float32 [n, 2] coordinates (arbitrary units).

    Raises:
      ConfigError: an unknown method, too few rows, or umap-learn not installed.
    """
    check_method(method)
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) < MIN_MAP_ROWS:
        raise ConfigError(
            f"a 2-D map needs at least {MIN_MAP_ROWS} rows of features; got shape {x.shape}"
        )
    # Cosine geometry: on unit vectors squared distances are 2 - 2 cos.
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3.0)
        tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
        points = tsne.fit_transform(x)
    else:
        try:
            import umap
        except ImportError:
            raise ConfigError(f"method='umap' needs umap-learn: {UMAP_INSTALL}") from None
        # A seed makes UMAP single-threaded; saying n_jobs=1 keeps it from warning so.
        reducer = umap.UMAP(
            n_components=2, n_neighbors=min(15, len(x) - 1), random_state=seed, n_jobs=1
        )
        points = reducer.fit_transform(x)
    return np.asarray(points, np.float32)


def plot_map(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    path: str,
    title: str,
) -> None:
    """Writes the map as a FIGURE_PIXELS PNG, points coloured by class.

    Args:
      points: float [n, 2] coordinates (map_2d).
      labels: int [n] labels; those outside [0, len(class_names)) are drawn grey
        as 'unlabelled' (simclr_jax.labels).
      class_names: label i is class_names[i]; the legend lists the classes
        present (none past MAX_LEGEND_CLASSES classes).
      path: the PNG to write (local or gs://).
      title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    points, labels = np.asarray(points), np.asarray(labels)
    num_classes = len(class_names)
    labelled = labels_lib.is_labelled(labels, num_classes)
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo")
    fig, ax = plt.subplots(figsize=FIGURE_INCHES, dpi=DPI)
    size = float(np.clip(20000 / max(len(points), 1), 3, 40))  # marker area, points^2
    if not labelled.all():
        ax.scatter(*points[~labelled].T, s=size, c="0.7", lw=0, label="unlabelled")
    for c in np.unique(labels[labelled]):
        rows = labels == c
        color = cmap(c % cmap.N if num_classes <= 20 else c / max(num_classes - 1, 1))
        ax.scatter(*points[rows].T, s=size, color=color, lw=0, label=class_names[c])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if num_classes <= MAX_LEGEND_CLASSES:
        fig.subplots_adjust(left=0.02, right=0.78, top=0.93, bottom=0.02)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=9 / size**0.5)
    else:
        fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.02)
    buffer = io.BytesIO()  # matplotlib writes local files only; files.py writes anywhere
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    files.write_bytes(path, buffer.getvalue())
