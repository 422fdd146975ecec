"""kNN against an independent NumPy implementation; feature extraction drops padding and runs
BatchNorm in inference mode."""

import flax.linen as nn
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


def tiny_pretrained_with_running_stats_far_from_any_batch():
    """A random tiny ResNet-18 whose BN statistics and affine parameters are far from neutral."""
    from tiny_run import tiny_config

    from simclr_jax import models
    from simclr_jax.eval import pretrained as pretrained_lib

    model_cfg = tiny_config().model
    model = models.build_model(model_cfg, num_classes=10)
    variables = model.init(jax.random.key(0), np.zeros((2, 32, 32, 3), np.float32), train=False)
    rng = np.random.default_rng(0)

    def perturb(path, x):
        name = jax.tree_util.keystr(path[-1:])
        shape = np.shape(x)
        if "mean" in name:
            return rng.normal(0.0, 0.5, shape).astype(np.float32)
        if "var" in name:
            return rng.uniform(0.3, 3.0, shape).astype(np.float32)
        if "scale" in name:  # The last BN of each block starts at 0: make every BN matter.
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return np.asarray(x)

    variables = jax.tree_util.tree_map_with_path(perturb, variables)
    return pretrained_lib.Pretrained(
        path="test",
        step=0,
        model_config=model_cfg,
        params=dict(variables["params"]),
        batch_stats=dict(variables["batch_stats"]),
        probe_classes=10,
    )


def test_encoder_features_are_per_example_with_the_running_bn_statistics():
    """Evaluation runs BatchNorm in inference mode: each example's h depends on itself only."""
    from tiny_run import tiny_config

    from simclr_jax import models

    pretrained = tiny_pretrained_with_running_stats_far_from_any_batch()
    before = jax.tree_util.tree_map(np.copy, (pretrained.params, pretrained.batch_stats))
    config = tiny_config()
    config.eval.batch_size = 16  # 2 examples per device on the 8 test devices
    mesh = sharding.create_mesh(jax.devices())
    h, labels = features.extract_encoder_features(pretrained, config, "test", mesh)
    assert h.shape[0] == labels.shape[0] == 1000
    # Extraction changes neither the statistics nor the parameters.
    after = (pretrained.params, pretrained.batch_stats)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)

    encoder = models.build_encoder(pretrained.model_config)
    variables = pretrained.variables("encoder")
    variables = {k: v["encoder"] for k, v in variables.items()}
    batch = next(features.eval_batches(config, "test"))
    images = batch["image"][batch["mask"]]
    np.testing.assert_array_equal(batch["label"][batch["mask"]], labels[: len(images)])
    # Each example encoded alone (a batch of one) gives the same h as inside the batch.
    apply = jax.jit(lambda x: encoder.apply(variables, x, train=False))
    alone = np.concatenate([np.asarray(apply(image[None])) for image in images])
    np.testing.assert_allclose(h[: len(images)], alone, rtol=1e-5, atol=1e-5)
    # ...which batch statistics would not: train mode gives other features for this batch.
    train_h, _ = encoder.apply(variables, images, train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(train_h) - h[: len(images)]).max() > 0.1

    # NumPy reference of every BatchNorm of that inference pass: the running statistics.
    seen = []

    def check_batch_norm(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            bn = jax.tree_util.tree_map(np.asarray, context.module.variables)
            x, stats, affine = np.asarray(args[0], np.float64), bn["batch_stats"], bn["params"]
            expected = (x - stats["mean"]) / np.sqrt(stats["var"] + context.module.epsilon)
            expected = expected * affine["scale"] + affine["bias"]
            np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
            seen.append(context.module.name)
        return out

    with nn.intercept_methods(check_batch_norm):
        reference = encoder.apply(variables, images[:2], train=False)
    assert len(seen) == 1 + 8 * 2 + 4  # stem, two per basic block, one shortcut per stage
    np.testing.assert_allclose(h[:2], np.asarray(reference), rtol=1e-5, atol=1e-5)
