"""kNN against an independent NumPy implementation; feature extraction drops padding."""

import jax
import numpy as np
import pytest

from simclr_jax import sharding
from simclr_jax.eval import features, knn, reports


def numpy_knn(train, train_labels, test, num_classes, k, temperature):
    """Weighted kNN written out per query (InstDisc / solo-learn protocol)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for i, q in enumerate(test):
        sims = train @ q
        order = np.argsort(-sims, kind="stable")[:k]
        for j in order:
            scores[i, train_labels[j]] += np.exp(sims[j] / temperature)
    return scores


@pytest.mark.parametrize("k, temperature", [(1, 0.1), (5, 0.07), (20, 0.5), (200, 0.1)])
def test_knn_matches_numpy(k, temperature):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(120, 16)).astype(np.float32)
    labels = rng.integers(0, 7, size=120)
    test = rng.normal(size=(37, 16)).astype(np.float32)
    expected = numpy_knn(
        train.astype(np.float64), labels, test.astype(np.float64), 7, min(k, 120), temperature
    )
    got = knn.knn_scores(
        train, labels, test, num_classes=7, k=k, temperature=temperature, chunk_size=16
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_knn_on_clustered_features_is_accurate_and_random_is_chance():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 32)) * 5
    labels = rng.integers(0, 5, 500)
    feats = centers[labels] + rng.normal(size=(500, 32))
    scores = knn.knn_scores(feats[:400], labels[:400], feats[400:], num_classes=5, k=20)
    assert reports.topk_accuracy(scores, labels[400:], 1) > 0.97
    noise = rng.normal(size=(500, 32))
    scores = knn.knn_scores(noise[:400], labels[:400], noise[400:], num_classes=5, k=20)
    assert reports.topk_accuracy(scores, labels[400:], 1) < 0.4


def test_topk_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert reports.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert reports.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert reports.topk_accuracy(scores, labels, 3) == pytest.approx(1.0)


def test_knn_rejects_bad_arguments():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="k=0"):
        knn.knn_scores(x, np.zeros(4, int), x, num_classes=2, k=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        knn.knn_scores(x, np.zeros(4, int), x, num_classes=2, temperature=-1)
    with pytest.raises(ValueError, match="4 train features but 3 labels"):
        knn.knn_scores(x, np.zeros(3, int), x, num_classes=2)


def test_extract_features_drops_padding_on_eight_devices():
    mesh = sharding.create_mesh(jax.devices())
    rng = np.random.default_rng(0)
    images = rng.normal(size=(21, 2, 2, 3)).astype(np.float32)
    batches = []
    for start in range(0, 21, 16):
        chunk = images[start : start + 16]
        pad = 16 - len(chunk)
        batches.append(
            {
                "image": np.concatenate([chunk, np.zeros((pad, 2, 2, 3), np.float32)]),
                "label": np.arange(start, start + 16, dtype=np.int32),
                "mask": np.arange(16) < len(chunk),
            }
        )
    out, labels = features.extract_features(
        jax.jit(lambda x: {"h": x.reshape(x.shape[0], -1).sum(-1, keepdims=True)}), batches, mesh
    )
    np.testing.assert_array_equal(labels, np.arange(21))
    np.testing.assert_allclose(out["h"][:, 0], images.reshape(21, -1).sum(-1), rtol=1e-5)
