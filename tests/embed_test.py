"""python -m simclr_jax.embed: h of a whole split against the restored encoder applied to the
decoded images, the labels and ids of the split, the map picture; t-SNE separates clusters."""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from simclr_jax import checkpoint, models
from simclr_jax.config_checks import ConfigError
from simclr_jax.data import sources, views
from simclr_jax.eval import embedding_map, embeddings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_nn_accuracy(points: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy in the plane (NumPy)."""
    d = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float(np.mean(labels[d.argmin(1)] == labels))


@pytest.fixture(scope="module")
def embedded(tiny_pretrained_run, tmp_path_factory):
    """write_embeddings of the tiny run's 'test' split (the embedded sample: 1,000 images)."""
    out = str(tmp_path_factory.mktemp("embed"))
    config = embeddings.embed_config(tiny_pretrained_run, {"eval.batch_size": 256})
    # One OpenMP thread: t-SNE's threads spin at barriers when CI's two workers share 2 cores.
    with threadpool_limits(1, user_api="openmp"):
        summary = embeddings.write_embeddings(out, config, "test", max_examples=150, seed=3)
    return out, summary, config


def test_embeddings_are_h_of_the_restored_encoder_on_the_split_in_order(
    embedded, tiny_pretrained_run
):
    out, summary, config = embedded
    h = np.load(os.path.join(out, "embeddings.npy"))
    labels = np.load(os.path.join(out, "labels.npy"))
    indices = np.load(os.path.join(out, "indices.npy"))
    source = sources.load_source(config.data, "test")
    assert source.num_examples == 1000
    assert h.dtype == np.float32 and labels.dtype == np.int32 and indices.dtype == np.int64
    assert h.shape[0] == labels.shape[0] == indices.shape[0] == 1000
    np.testing.assert_array_equal(indices, np.arange(1000))  # the split's fixed order
    np.testing.assert_array_equal(labels, source.table.labels)
    assert not os.path.exists(os.path.join(out, "paths.txt"))  # no files behind the sample

    # Reference: the checkpoint restored directly, images decoded with PIL, the eval view,
    # the encoder applied to one batch of rows spread over the split.
    manager = checkpoint.create_manager(tiny_pretrained_run, max_to_keep=3, asynchronous=False)
    step = manager.latest_step()
    restored = jax.tree_util.tree_map(np.asarray, manager.restore(step))
    manager.close()
    with open(os.path.join(tiny_pretrained_run, "config.json")) as f:
        model_cfg = json.load(f)["model"]
    encoder = models.build_encoder(mlc.ConfigDict(model_cfg))
    rows = np.random.default_rng(0).choice(1000, 24, replace=False)
    images = np.stack(
        [
            views.eval_view(
                np.asarray(Image.open(io.BytesIO(source.table.keys[i]))), config.augment
            )
            for i in rows
        ]
    )
    variables = {
        "params": restored["params"]["encoder"],
        "batch_stats": restored["batch_stats"]["encoder"],
    }
    reference = np.asarray(encoder.apply(variables, images, train=False))
    assert h.shape[1] == reference.shape[1]
    np.testing.assert_allclose(h[rows], reference, rtol=1e-4, atol=1e-4)
    assert summary["checkpoint"]["step"] == step
    assert (summary["num_examples"], summary["dim"]) == h.shape


def test_the_map_is_a_png_of_the_stated_size_over_a_seeded_subset(embedded):
    out, summary, _ = embedded
    with Image.open(os.path.join(out, "map.png")) as image:
        assert image.format == "PNG"
        assert image.size == embedding_map.FIGURE_PIXELS
    points = np.load(os.path.join(out, "map_points.npy"))
    rows = np.load(os.path.join(out, "map_rows.npy"))
    assert points.shape == (150, 2) and points.dtype == np.float32 and np.isfinite(points).all()
    np.testing.assert_array_equal(rows, embedding_map.subsample_rows(1000, 150, 3))
    assert len(np.unique(rows)) == 150 and rows.min() >= 0 and rows.max() < 1000
    title = summary["map"]["title"]
    for part in (
        "'test'",
        "t-SNE",
        "150 of 1,000 examples",
        f"step {summary['checkpoint']['step']}",
    ):
        assert part in title


def test_tsne_separates_well_separated_clusters_and_unlabelled_points_are_drawn(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 32)) * 10
    labels = np.repeat(np.arange(3), 25)
    features = centers[labels] + rng.normal(size=(75, 32))
    with threadpool_limits(1, user_api="openmp"):
        points = embedding_map.map_2d(features, "tsne", seed=0)
    assert points.shape == (75, 2) and points.dtype == np.float32
    assert one_nn_accuracy(points, labels) == 1.0
    # The same features with shuffled labels: the map carries no label information.
    assert one_nn_accuracy(points, rng.permutation(labels)) < 0.7
    labels_with_unlabelled = labels.copy()
    labels_with_unlabelled[:5] = -1
    path = str(tmp_path / "map.png")
    embedding_map.plot_map(points, labels_with_unlabelled, ("a", "b", "c"), path, "blobs")
    with Image.open(path) as image:
        assert image.size == embedding_map.FIGURE_PIXELS


def test_an_image_folder_override_gives_each_row_its_file_and_folder_class(
    tiny_pretrained_run, tmp_path
):
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            os.makedirs(tmp_path / "images" / split / name)
            for i in range(3 + label):
                path = str(tmp_path / "images" / split / name / f"{i}.png")
                Image.fromarray(rng.integers(0, 256, (40, 36, 3), np.uint8)).save(path)
                written[path] = label
    overrides = {"data.source": "folder", "data.name": str(tmp_path / "images")}
    overrides["eval.batch_size"] = 256  # the executable the other tests compiled
    config = embeddings.embed_config(tiny_pretrained_run, overrides)
    with threadpool_limits(1, user_api="openmp"):
        embeddings.write_embeddings(str(tmp_path / "out"), config, "test")
    with open(tmp_path / "out" / "paths.txt") as f:
        paths = f.read().splitlines()
    assert sorted(paths) == sorted(p for p in written if "/test/" in p)
    labels = np.load(tmp_path / "out" / "labels.npy")
    assert list(labels) == [written[p] for p in paths]
    assert np.load(tmp_path / "out" / "embeddings.npy").shape[0] == 7


def test_subsample_rows():
    np.testing.assert_array_equal(embedding_map.subsample_rows(7, 0, 0), np.arange(7))
    np.testing.assert_array_equal(embedding_map.subsample_rows(7, 9, 0), np.arange(7))
    rows = embedding_map.subsample_rows(100, 10, 1)
    assert len(np.unique(rows)) == 10 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, embedding_map.subsample_rows(100, 10, 1))
    assert not np.array_equal(rows, embedding_map.subsample_rows(100, 10, 2))


def test_user_errors(tiny_pretrained_run, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="init_from is empty"):
        embeddings.embed_config("")
    with pytest.raises(FileNotFoundError, match="init_from=.* does not exist"):
        embeddings.embed_config(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"--config.data.nme: no such field.*mean 'name'"):
        embeddings.embed_config(tiny_pretrained_run, {"data.nme": "cifar10"})
    with pytest.raises(ConfigError, match=r"only the sections"):
        embeddings.embed_config(tiny_pretrained_run, {"model.base_width": 8})
    with pytest.raises(ConfigError, match=r"--config.eval.batch_size='x'"):
        embeddings.embed_config(tiny_pretrained_run, {"eval.batch_size": "x"})
    config = embeddings.embed_config(
        tiny_pretrained_run, {"data.data_dir": "/elsewhere", "eval.batch_size": 64}
    )
    assert (config.data.data_dir, config.eval.batch_size) == ("/elsewhere", 64)
    with pytest.raises(ConfigError, match=r"--split='val' is invalid.*\['train', 'test'\]"):
        embeddings.embed_split(config, "val")
    with pytest.raises(ConfigError, match="method='pca'"):
        embeddings.write_embeddings(str(tmp_path), config, "test", method="pca")
    for bad in (-1, 3):  # fewer than the 4 points of a map: refused before any work
        with pytest.raises(ConfigError, match=f"max_examples={bad}: use 0 .* at least 4"):
            embeddings.write_embeddings(str(tmp_path / "out"), config, "test", max_examples=bad)
    assert not os.path.exists(tmp_path / "out")
    # A workdir without the run's data (as simclr_jax.convert writes): one line, no traceback.
    imported = tmp_path / "imported"
    shutil.copytree(tiny_pretrained_run, imported)
    run_config = json.loads((imported / "config.json").read_text())
    (imported / "config.json").write_text(json.dumps({"model": run_config["model"]}))
    with pytest.raises(ConfigError, match="no data or augment section"):
        embeddings.embed_config(str(imported))
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(ConfigError, match=r"needs umap-learn: pip install -e '\.\[umap\]'"):
        embedding_map.map_2d(np.eye(8), "umap")


@pytest.mark.slow
def test_command_line_user_error_is_one_line_with_exit_status_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "simclr_jax.embed", "--out", str(tmp_path), "--split=test"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: init_from is empty"), result.stderr
