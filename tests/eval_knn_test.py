"""The sharded, blocked kNN against a float64 NumPy reference; unlabelled rows; the evaluator.

The reference is weighted kNN as in InstDisc (Wu et al. 2018) and solo-learn:
cosine similarity of l2-normalised features, the k most similar memory rows,
votes exp(similarity / T) per class.
"""

import math

import jax
import numpy as np
import pytest

from simclr_jax import sharding
from simclr_jax.eval import knn


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
