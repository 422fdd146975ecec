"""Examples without a label never act as a class (simclr_jax/labels.py and its consumers).

TFDS marks unlabelled examples with -1 ('train+unlabelled' on STL-10); JAX wraps a -1 index to
the last class. Every consumer of labels is checked against a float64 NumPy reference computed
on the labelled rows only: the online probe's loss, accuracy and gradient (one device and eight,
with the unlabelled rows unevenly spread over the devices, full batch and micro-batched), the
linear classifier, fine-tuning subsets and the reports.
"""

import jax
import numpy as np
import optax
import pytest
from stub_model import StubModel

from simclr_jax import labels as labels_lib
from simclr_jax import models, sharding, steps
from simclr_jax.eval import linear, reports, subsets

CLASSES = 3


def _reference_probe(h, w, b, labels):
    """float64 mean cross-entropy, top-1 and (dW, db) over the labelled rows only."""
    h, w, b = (np.asarray(a, np.float64) for a in (h, w, b))
    keep = (labels >= 0) & (labels < CLASSES)
    h, y = h[keep], labels[keep]
    logits = h @ w + b
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    loss = -logp[np.arange(len(y)), y].mean()
    top1 = np.mean(np.argmax(logits, 1) == y)
    g = np.exp(logp)
    g[np.arange(len(y)), y] -= 1.0
    g /= len(y)
    return loss, top1, h.T @ g, g.sum(0)


@pytest.mark.parametrize("devices,micro", [(1, None), (8, None), (8, 2)])
def test_the_probe_learns_only_from_labelled_rows(devices, micro):
    n = 32
    rng = np.random.default_rng(0)
    view1 = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
    view2 = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    labels[:4] = -1  # all of device 0's rows on 8 devices
    labels[[9, 17, 30]] = [-1, CLASSES, 7]  # and a few more, also out of range above
    model = StubModel(probe=models.LinearHead(num_classes=CLASSES))
    tx = optax.sgd(1.0)  # the update is minus the gradient
    state = steps.create_train_state(model, tx, jax.random.key(0), (4, 4, 3))
    mesh = sharding.create_mesh(jax.devices()[:devices])
    step = steps.compile_train_step(
        lambda s, b: steps.train_step(
            s, b, model=model, tx=tx, learning_rate_fn=lambda _: 1.0, temperature=0.5,
            loss_scale=1.0, axis_name=sharding.DATA_AXIS, sync_batch_stats=True,
            micro_batch_per_device=micro,
        ),
        parallelism="shard_map",
        mesh=mesh,
    )  # fmt: skip
    old = jax.device_get(state.params["probe"]["dense"])
    h = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        np.concatenate([view1, view2]),
        train=False,
    )["h"]
    batch = {"view1": view1, "view2": view2, "label": labels}
    new_state, metrics = step(state, sharding.make_global_batch(batch, mesh))  # donates state
    new = jax.device_get(new_state.params["probe"]["dense"])
    loss, top1, dw, db = _reference_probe(h, old["kernel"], old["bias"], np.tile(labels, 2))
    values = jax.device_get(metrics.compute())
    np.testing.assert_allclose(values["probe_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(values["probe_top1"], top1, rtol=1e-6)
    np.testing.assert_allclose(old["kernel"] - new["kernel"], dw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(old["bias"] - new["bias"], db, rtol=1e-4, atol=1e-6)


def test_a_batch_without_labels_leaves_the_probe_unchanged():
    model = StubModel(probe=models.LinearHead(num_classes=CLASSES))
    tx = optax.sgd(1.0)
    state = steps.create_train_state(model, tx, jax.random.key(0), (4, 4, 3))
    rng = np.random.default_rng(1)
    batch = {
        "view1": rng.normal(size=(8, 4, 4, 3)).astype(np.float32),
        "view2": rng.normal(size=(8, 4, 4, 3)).astype(np.float32),
        "label": np.full(8, labels_lib.UNLABELLED, np.int32),
    }
    new_state, metrics = jax.jit(
        lambda s, b: steps.train_step(
            s, b, model=model, tx=tx, learning_rate_fn=lambda _: 1.0, temperature=0.5,
            loss_scale=1.0, axis_name=None, sync_batch_stats=False,
        )
    )(state, batch)  # fmt: skip
    for old, new in zip(
        jax.tree_util.tree_leaves(state.params["probe"]),
        jax.tree_util.tree_leaves(new_state.params["probe"]),
        strict=True,
    ):
        np.testing.assert_array_equal(old, new)
    values = jax.device_get(metrics.compute())
    # No labelled row in the interval: the probe's metrics say so (NaN), not 0.
    assert np.isnan(values["probe_loss"]) and np.isnan(values["probe_top1"])


def test_mean_labelled_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, CLASSES)).astype(np.float32)
    labels = np.array([0, -1, 2, CLASSES, 1, -5], np.int32)
    value, grad = jax.value_and_grad(labels_lib.mean_labelled_cross_entropy)(logits, labels)
    keep = labels_lib.is_labelled(labels, CLASSES)
    assert keep.tolist() == [True, False, True, False, True, False]
    ref = optax.softmax_cross_entropy_with_integer_labels(logits[keep], labels[keep]).mean()
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~keep], 0.0)
    assert float(labels_lib.mean_labelled_cross_entropy(logits, np.full(6, -1))) == 0.0


def test_reports_score_only_labelled_rows():
    scores = np.array(
        [[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.7], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]
    )
    labels = np.array([0, 1, -1, 1, 3])
    assert reports.topk_accuracy(scores, labels, 1) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(
        reports.confusion_matrix(np.argmax(scores, 1), labels, 3),
        [[1, 0, 0], [1, 1, 0], [0, 0, 0]],
    )
    summary = reports.summarize(scores, labels, ["a", "b", "c"])
    assert summary["examples"] == 3 and summary["unlabelled_examples"] == 2
    assert summary["top1"] == pytest.approx(2 / 3) and summary["per_class"]["b"] == 0.5
    assert np.isnan(reports.topk_accuracy(scores, np.full(5, -1), 1))


def test_linear_classifier_ignores_unlabelled_rows():
    """Training with extra unlabelled rows gives exactly the classifier of the labelled rows."""
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 5)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 40).astype(np.int32)
    cfg = linear.mlc.ConfigDict(
        dict(mode="cached", epochs=3, batch_size=8, base_lr=0.1, lr_scaling="linear",
             weight_decay=0.0, momentum=0.9, nesterov=True)
    )  # fmt: skip
    mixed_feats = np.concatenate([feats[:20], rng.normal(size=(7, 5)), feats[20:]]).astype(
        np.float32
    )
    mixed_labels = np.concatenate([labels[:20], np.full(7, -1), labels[20:]]).astype(np.int32)
    clean = linear.train_linear_on_features(feats, labels, CLASSES, cfg, seed=1)
    mixed = linear.train_linear_on_features(mixed_feats, mixed_labels, CLASSES, cfg, seed=1)
    for a, b in zip(
        jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(mixed), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no labelled example"):
        linear.train_linear_on_features(feats, np.full(40, -1), CLASSES, cfg)


def test_finetune_subsets_never_draw_unlabelled_examples():
    rng = np.random.default_rng(4)
    labelled = np.repeat(np.arange(CLASSES), 20)[rng.permutation(60)]
    labels = np.concatenate([labelled, np.full(40, -1)])[rng.permutation(100)]
    for fraction in (0.1, 0.5, 1.0):
        chosen = subsets.class_balanced_subset(labels, fraction, 0, num_classes=CLASSES)
        assert np.all(labels[chosen] >= 0)
        assert np.bincount(labels[chosen]).tolist() == [round(20 * fraction)] * CLASSES
    with pytest.raises(ValueError, match="no example labelled in"):
        subsets.class_balanced_subset(np.full(5, -1), 0.5, 0, num_classes=CLASSES)


# --- End to end: an STL-10-like tfds dataset whose 'unlabelled' split is all -1. ------------

import tensorflow_datasets as tfds  # noqa: E402

TRAIN, UNLABELLED, TEST = 48, 40, 24


class LabelsTestStlLike(tfds.core.GeneratorBasedBuilder):
    """STL-10's layout in miniature: train, unlabelled (label -1, as tfds marks it), test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(0, TRAIN, labelled=True),
            "unlabelled": self._generate_examples(1000, UNLABELLED, labelled=False),
            "test": self._generate_examples(2000, TEST, labelled=True),
        }

    def _generate_examples(self, start, count, labelled):
        for i in range(start, start + count):
            # Class c is brighter in channel c, so the classes are learnable.
            image = np.random.default_rng(i).integers(0, 128, (32, 32, 3), np.uint8)
            image[..., i % CLASSES] += 120
            yield i, {"image": image, "label": i % CLASSES if labelled else -1}


@pytest.fixture(scope="module")
def stl_like_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("stl_like"))
    LabelsTestStlLike(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir


def _stl_data(config, data_dir):
    config.data.source, config.data.name = "tfds", "labels_test_stl_like"
    config.data.data_dir, config.data.train_split = data_dir, "train+unlabelled"
    config.data.cache = False
    return config


@pytest.mark.slow
def test_pretraining_and_protocols_on_train_plus_unlabelled(stl_like_dir, tmp_path):
    from tiny_run import tiny_config

    from configs import finetune as finetune_config
    from configs import knn as knn_config
    from simclr_jax import train
    from simclr_jax.eval import finetune, knn

    config = _stl_data(tiny_config(eval__knn=True, eval__batch_size=16), stl_like_dir)
    pretrain_dir = str(tmp_path / "pretrain")
    results = train.train_and_evaluate(config, pretrain_dir)
    # kNN memory: the labelled train rows only; queries: every test row (all labelled).
    assert results["knn_memory_examples"] == TRAIN and results["eval_examples"] == TEST
    assert np.isfinite(results["probe_top1"]) and 0.0 <= results["knn_top1"] <= 1.0

    protocol = _stl_data(knn_config.get_config(), stl_like_dir)
    protocol.init_from, protocol.eval.batch_size, protocol.eval.knn_k = pretrain_dir, 16, 5
    out = knn.run(protocol, str(tmp_path / "knn"))
    assert out["summary"]["examples"] == TEST and out["summary"]["unlabelled_examples"] == 0

    protocol = _stl_data(finetune_config.get_config(), stl_like_dir)
    protocol.init_from, protocol.eval.batch_size = pretrain_dir, 16
    protocol.finetune.label_fraction, protocol.finetune.batch_size = 0.5, 8
    protocol.finetune.epochs = 1.0
    out = finetune.run(protocol, str(tmp_path / "finetune"))
    assert out["labelled_examples"] == TRAIN // 2  # half of each class, no unlabelled row
    protocol.finetune.label_fraction = 1.0
    out = finetune.run(protocol, str(tmp_path / "finetune_all"))
    assert out["labelled_examples"] == TRAIN  # every labelled row, no unlabelled one
    protocol.data.train_split = "unlabelled"
    with pytest.raises(ValueError, match="train_split='unlabelled' is invalid: it has no ex"):
        finetune.run(protocol, str(tmp_path / "finetune_none"))
