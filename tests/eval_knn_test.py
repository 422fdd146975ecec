"""The sharded, blocked kNN against a float64 NumPy reference; unlabelled rows; the evaluator.

The reference is weighted kNN as in InstDisc (Wu et al. 2018) and solo-learn:
cosine similarity of l2-normalised features, the k most similar memory rows,
votes exp(similarity / T) per class.
"""

import math

import jax
import numpy as np
import pytest
from tiny_run import tiny_config

from simclr_jax import models, sharding
from simclr_jax.eval import features, knn, monitor


def reference_knn(train, train_labels, test, num_classes, k, temperature):
    """float64 weighted kNN, one query at a time, over the rows given (all labelled)."""
    train = np.asarray(train, np.float64)
    test = np.asarray(test, np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    k = min(k, len(train))
    scores = np.zeros((len(test), num_classes))
    for i, q in enumerate(test):
        sims = train @ q
        for j in np.argsort(-sims, kind="stable")[:k]:
            scores[i, train_labels[j]] += np.exp(sims[j] / temperature)
    return scores


def mesh_of(num_devices):
    return sharding.create_mesh(jax.devices()[:num_devices])


def random_problem(seed, n=61, m=23, dim=12, num_classes=5):
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, n)
    test = rng.normal(size=(m, dim)).astype(np.float32)
    return train, labels, test


# N = 61 is not a multiple of 8; k = 20 and 61 exceed N / 8 (under 8 rows per device), so
# padding rows sit in every device's running top-k and must never reach the global one.
@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("k, block_size", [(1, 4), (20, 3), (20, 1024), (61, 5), (500, 2)])
def test_sharded_knn_matches_the_numpy_reference(num_devices, k, block_size):
    train, labels, test = random_problem(k + block_size)
    expected = reference_knn(train, labels, test, 5, k, 0.1)
    got = knn.knn_scores(
        train,
        labels,
        test,
        num_classes=5,
        k=k,
        temperature=0.1,
        chunk_size=8,
        mesh=mesh_of(num_devices),
        block_size=block_size,
    )
    assert got.shape == (23, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_eight_devices_give_the_single_device_scores():
    train, labels, test = random_problem(7, n=203, m=40, dim=32, num_classes=10)
    kwargs = dict(num_classes=10, k=30, temperature=0.07, chunk_size=16)
    one = knn.knn_scores(train, labels, test, mesh=mesh_of(1), **kwargs)
    eight = knn.knn_scores(train, labels, test, mesh=mesh_of(8), block_size=4, **kwargs)
    np.testing.assert_allclose(eight, one, rtol=1e-5)


def test_unlabelled_memory_rows_never_take_a_neighbour_slot():
    # The query is [1, 0]. The unlabelled rows (-1, TFDS's label) and the row labelled
    # num_classes are identical to it, the nearest neighbours; a -1 would wrap to the
    # last class. With them dropped, k=2 takes [0.8, 0.6] (class 1, cosine 0.8) and
    # [0.6, 0.8] (class 0, cosine 0.6).
    train = np.array([[1, 0], [0, 1], [1, 0], [0.8, 0.6], [2, 0], [0.6, 0.8], [1, 0]], np.float32)
    labels = np.array([-1, 0, -1, 1, 3, 0, -1])
    test = np.array([[1, 0]], np.float32)
    for num_devices in (1, 8):
        got = knn.knn_scores(
            train, labels, test, num_classes=3, k=2, temperature=1.0, mesh=mesh_of(num_devices)
        )
        np.testing.assert_allclose(got, [[math.exp(0.6), math.exp(0.8), 0.0]], rtol=1e-6)
        keep = labels >= 0
        keep &= labels < 3
        np.testing.assert_allclose(
            got, reference_knn(train[keep], labels[keep], test, 3, 2, 1.0), rtol=1e-6
        )


def test_k_is_clipped_to_the_labelled_memory_rows():
    train = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    labels = np.array([0, -1, 1])
    got = knn.knn_scores(train, labels, train[:1], num_classes=2, k=200, temperature=1.0)
    np.testing.assert_allclose(got, [[math.e, math.exp(math.sqrt(0.5))]], rtol=1e-6)


def test_a_memory_without_labels_is_an_error():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="no example labelled in"):
        knn.knn_scores(x, np.full(4, -1), x, num_classes=2)
    with pytest.raises(ValueError, match="block_size=0"):
        knn.knn_scores(x, np.zeros(4, int), x, num_classes=2, block_size=0)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_knn_normalises_memory_and_queries(num_devices):
    # Positive row scales on either side leave the cosines, hence the scores, unchanged.
    train, labels, test = random_problem(3)
    rng = np.random.default_rng(4)
    kwargs = dict(num_classes=5, k=10, temperature=0.1, mesh=mesh_of(num_devices))
    plain = knn.knn_scores(train, labels, test, **kwargs)
    memory_scaled = train * rng.uniform(0.01, 100.0, size=(len(train), 1)).astype(np.float32)
    query_scaled = test * rng.uniform(0.01, 100.0, size=(len(test), 1)).astype(np.float32)
    np.testing.assert_allclose(
        knn.knn_scores(memory_scaled, labels, test, **kwargs), plain, rtol=1e-5
    )
    np.testing.assert_allclose(
        knn.knn_scores(train, labels, query_scaled, **kwargs), plain, rtol=1e-5
    )


@pytest.mark.parametrize(
    "rows, devices, block_size", [(1, 1, 16), (61, 8, 3), (1_281_167, 8, 16384), (100, 3, 7)]
)
def test_memory_layout_pads_little(rows, devices, block_size):
    per_device, block = knn.memory_layout(rows, devices, block_size)
    assert block <= block_size and per_device % block == 0
    assert per_device * devices >= rows
    # Under one row per block of padding per device, beyond the rounding to devices.
    assert per_device - math.ceil(rows / devices) < per_device // block


def test_the_step_compiles_once_for_every_chunk():
    train, labels, test = random_problem(5, m=21)
    mesh = mesh_of(8)
    knn.knn_scores(train, labels, test, num_classes=5, k=7, chunk_size=8, mesh=mesh, block_size=2)
    per_device, block = knn.memory_layout(61, 8, 2)
    step = knn.make_knn_step(mesh, k=7, num_classes=5, block=block)
    assert step._cache_size() == 1  # the last chunk (5 rows) is padded to 8


# --- The evaluator: what it extracts and what it counts. ----------------------------------


def test_evaluator_counts_and_scores_labelled_rows_only(monkeypatch):
    """Unlabelled train rows stay out of the memory, unlabelled eval rows are not scored,
    and the train split is encoded for h only."""
    config = tiny_config()
    config.eval.knn_k = 2
    config.eval.knn_temperature = 1.0
    mesh = mesh_of(8)
    model = models.build_model(config.model, num_classes=3)
    variables = model.init(jax.random.key(0), np.zeros((2, 32, 32, 3), np.float32), train=False)
    # Memory: the unlabelled rows are the nearest to every query and carry no class; with
    # them dropped, the queries [1, 0] and [0, 1] have neighbours as in the test above.
    split_data = {
        "train": (
            {"h": np.array([[1, 0], [0.8, 0.6], [1, 0], [0.6, 0.8], [0, 1]], np.float32)},
            np.array([-1, 1, -1, 0, 0], np.int32),
        ),
        "test": (
            {
                "h": np.array([[1, 0], [0, 1], [1, 0]], np.float32),
                "probe_logits": np.array([[0, 5, 0], [9, 0, 0], [9, 0, 0]], np.float32),
            },
            np.array([1, 0, -1], np.int32),
        ),
    }
    seen = {}

    def fake_extract(embed_fn, batches, mesh_):
        (split,) = batches
        # What the evaluator asks the model for on this split.
        seen[split] = set(embed_fn(np.zeros((8, 32, 32, 3), np.float32)))
        return split_data[split]

    monkeypatch.setattr(features, "eval_batches", lambda config_, split: [split])
    monkeypatch.setattr(features, "extract_features", fake_extract)
    evaluate = monitor.make_evaluator(config, mesh=mesh, num_classes=3)
    results = evaluate(variables["params"], variables["batch_stats"])
    assert seen == {"train": {"h"}, "test": {"h", "probe_logits"}}
    assert results["knn_memory_examples"] == 3
    assert results["eval_examples"] == 2
    # Query [1, 0] (class 1): neighbours 0.8 (class 1) and 0.6 (class 0): right. Query
    # [0, 1] (class 0): neighbours [0, 1] (class 0) and [0.6, 0.8] (class 0): right. The
    # unlabelled third query, which the probe would get wrong, is not scored.
    assert results["knn_top1"] == 1.0
    assert results["probe_top1"] == 1.0
    results = evaluate(variables["params"], variables["batch_stats"], "random_init_")
    assert set(results) == {"random_init_knn_top1", "random_init_knn_top5"}
