"""Tests of the evaluation protocols: linear eval, kNN, fine-tuning, subsets, export, reports."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from counting import correct_count
from tiny_run import tiny_config

from configs import cifar10
from configs import finetune as finetune_config
from configs import knn as knn_config
from configs import linear_eval as linear_config
from simclr_jax import checkpoint, export, files, models, optim, sharding
from simclr_jax.eval import features, finetune, linear, protocols, reports, subsets
from simclr_jax.eval import pretrained as pretrained_lib


def tiny_protocol(config, init_from):
    config.init_from = init_from
    config.eval.batch_size = 256
    return config


@pytest.fixture
def pretrained_run(tiny_pretrained_run):
    """The session's tiny pretraining run (conftest.py)."""
    return tiny_pretrained_run


def restored_encoder(workdir):
    manager = checkpoint.create_manager(workdir, max_to_keep=3, asynchronous=False)
    restored = manager.restore(manager.latest_step())
    manager.close()
    return jax.tree_util.tree_map(np.asarray, restored)


def assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def linear_cfg(epochs=30.0, batch_size=128, base_lr=0.5):
    cfg = linear_config.get_config().linear
    cfg.epochs, cfg.batch_size, cfg.base_lr = epochs, batch_size, base_lr
    return cfg


def accuracy(logits, labels):
    return float(np.mean(np.argmax(logits, 1) == labels))


# --- Linear classifier on controlled features. ---------------------------------------------


def separable_data(rng, n, num_classes=10, dim=32):
    centers = 3.0 * rng.normal(size=(num_classes, dim))
    labels = rng.integers(0, num_classes, n)
    return (centers[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32), labels, centers


def test_linear_eval_on_separable_features_reaches_100_percent():
    rng = np.random.default_rng(0)
    x, y, centers = separable_data(rng, 2000)
    labels_test = rng.integers(0, 10, 500)
    x_test = (centers[labels_test] + 0.3 * rng.normal(size=(500, 32))).astype(np.float32)
    params = linear.train_linear_on_features(x, y, 10, linear_cfg())
    assert accuracy(linear.classify(params, x_test, 10), labels_test) >= 0.99


def test_linear_eval_on_random_features_stays_at_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    y = rng.integers(0, 10, 2000)
    params = linear.train_linear_on_features(x, y, 10, linear_cfg())
    x_test = rng.normal(size=(3000, 32)).astype(np.float32)
    y_test = rng.integers(0, 10, 3000)
    # Chance is 0.1; the binomial std over 3000 examples is 0.0055.
    assert abs(accuracy(linear.classify(params, x_test, 10), y_test) - 0.1) < 0.03


def test_pretrained_like_features_beat_random_ones():
    # What compare_random_init measures, on features we control: informative
    # (class-structured) features beat uninformative ones of the same shape.
    rng = np.random.default_rng(2)
    x, y, _ = separable_data(rng, 1500)
    noise = rng.normal(size=x.shape).astype(np.float32)
    good = linear.train_linear_on_features(x[:1000], y[:1000], 10, linear_cfg())
    bad = linear.train_linear_on_features(noise[:1000], y[:1000], 10, linear_cfg())
    acc_good = accuracy(linear.classify(good, x[1000:], 10), y[1000:])
    acc_bad = accuracy(linear.classify(bad, noise[1000:], 10), y[1000:])
    assert acc_good > acc_bad + 0.5


# --- Subsets. --------------------------------------------------------------------------------


def test_subsets_are_class_balanced_deterministic_and_nested():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)[rng.permutation(5000)]
    one = subsets.class_balanced_subset(labels, 0.01, seed=3, num_classes=10)
    ten = subsets.class_balanced_subset(labels, 0.1, seed=3, num_classes=10)
    assert np.array_equal(np.bincount(labels[one], minlength=10), np.full(10, 5))
    assert np.array_equal(np.bincount(labels[ten], minlength=10), np.full(10, 50))
    assert np.array_equal(one, subsets.class_balanced_subset(labels, 0.01, seed=3, num_classes=10))
    assert set(one) <= set(ten)
    assert not np.array_equal(
        one, subsets.class_balanced_subset(labels, 0.01, seed=4, num_classes=10)
    )
    assert len(np.unique(ten)) == len(ten)
    assert np.array_equal(
        subsets.class_balanced_subset(labels, 1.0, seed=0, num_classes=10), np.arange(5000)
    )


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, True, "10%"])
def test_bad_label_fraction_is_rejected(fraction):
    with pytest.raises(ValueError, match="label_fraction"):
        subsets.class_balanced_subset(np.arange(10), fraction, seed=0, num_classes=10)


def test_imagenet_uses_the_official_subsets():
    data = cifar10.get_config().data
    data.name = "imagenet2012"
    resolved, indices = subsets.resolve_finetune_data(data, 0.01, 0)
    assert resolved.name == "imagenet2012_subset/1pct" and indices is None
    resolved, _ = subsets.resolve_finetune_data(data, 0.1, 0)
    assert resolved.name == "imagenet2012_subset/10pct"
    assert data.name == "imagenet2012"  # the caller's config is not modified


def test_embedded_subset_matches_its_labels():
    data = linear_config.get_config().data
    _, indices = subsets.resolve_finetune_data(data, 0.05, seed=0)
    labels, _ = subsets.split_labels(data)
    assert np.array_equal(indices, subsets.class_balanced_subset(labels, 0.05, 0, num_classes=10))
    counts = np.bincount(labels[indices], minlength=10)
    expected = np.round(0.05 * np.bincount(labels, minlength=10))
    assert np.array_equal(counts, expected)


# --- On a tiny pretraining run. ---------------------------------------------------------


@pytest.mark.slow
def test_linear_eval_end_to_end_records_provenance(pretrained_run, tmp_path):
    config = tiny_protocol(linear_config.get_config(), pretrained_run)
    config.linear.epochs = 3.0
    config.eval.compare_random_init = True
    results = protocols.run("linear_eval", config, str(tmp_path))
    with open(tmp_path / files.RESULTS_FILE) as f:
        saved = json.load(f)
    assert saved["protocol"] == "linear_eval"
    assert saved["checkpoint"]["step"] == 4
    assert saved["checkpoint"]["path"] == os.path.join(
        checkpoint.checkpoint_dir(pretrained_run), "4"
    )
    assert saved["dataset"] == "embedded:cifar10_sample"
    summary = saved["summary"]
    matrix = np.asarray(summary["confusion"])
    assert matrix.sum() == summary["examples"] == 1000
    assert summary["top1"] == pytest.approx(np.trace(matrix) / matrix.sum())
    per_class = np.diag(matrix) / matrix.sum(1)
    np.testing.assert_allclose(list(summary["per_class"].values()), per_class)
    assert 0.0 <= summary["top1"] <= summary["top5"] <= 1.0
    for key in ("top1", "top5"):
        assert 0.0 <= saved["random_init"][key] <= 1.0
    assert results["top1"] == saved["top1"]
    assert (tmp_path / reports.CONFUSION_FILE).stat().st_size > 1000
    with open(tmp_path / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    assert record["eval/top1"] == pytest.approx(saved["top1"])


@pytest.mark.slow
def test_knn_end_to_end_from_a_step_directory(pretrained_run, tmp_path, monkeypatch):
    step_dir = os.path.join(checkpoint.checkpoint_dir(pretrained_run), "2")
    config = tiny_protocol(knn_config.get_config(), step_dir)
    config.eval.knn_k = 20
    seen = {}
    real_extract = features.extract_encoder_features

    def recording(pretrained, config, split, mesh, **kwargs):
        seen[split] = real_extract(pretrained, config, split, mesh, **kwargs)
        return seen[split]

    monkeypatch.setattr(features, "extract_encoder_features", recording)
    results = protocols.run("knn", config, str(tmp_path))
    assert results["checkpoint"] == {"path": step_dir, "step": 2}
    assert results["k"] == 20
    # Independent NumPy kNN on the same features.
    (train_h, train_y), (test_h, test_y) = seen["train"], seen["test"]
    assert len(train_y) == 4000 and len(test_y) == 1000
    a = train_h / np.linalg.norm(train_h, axis=1, keepdims=True)
    b = test_h / np.linalg.norm(test_h, axis=1, keepdims=True)
    sims = b @ a.T
    top = np.argsort(-sims, axis=1)[:, :20]
    votes = np.zeros((len(b), 10))
    for i in range(len(b)):
        np.add.at(votes[i], train_y[top[i]], np.exp(sims[i, top[i]] / 0.1))
    # float32 similarities against float64 ones: at most a near-tie may flip (measured 0 of
    # 1,000); compared as counts of examples.
    expected = int(np.sum(np.argmax(votes, 1) == test_y))
    assert abs(correct_count(results["top1"], len(test_y)) - expected) <= 2


@pytest.mark.slow
def test_reference_linear_eval_leaves_the_encoder_unchanged(pretrained_run):
    config = tiny_protocol(linear_config.get_config("reference"), pretrained_run)
    config.linear.epochs = 0.01  # a few augmented steps
    config.linear.batch_size = 64
    pretrained = pretrained_lib.load_pretrained(pretrained_run)
    mesh = sharding.create_mesh(jax.devices())
    state = linear.train_linear_reference(pretrained, config, 10, mesh)
    assert int(state.step) >= 1
    saved = restored_encoder(pretrained_run)
    frozen = jax.device_get(state.frozen)
    assert_trees_equal(frozen["params"], saved["params"]["encoder"])
    assert_trees_equal(frozen["batch_stats"], saved["batch_stats"]["encoder"])
    # The classifier did train (a fresh one would equal its init).
    assert float(np.abs(np.asarray(state.params["classifier"]["dense"]["bias"])).max()) > 0


def test_finetune_starts_from_the_pretrained_weights(pretrained_run):
    pretrained = pretrained_lib.load_pretrained(pretrained_run)
    model = finetune.build_finetune_model(pretrained.model_config, 10, ft_proj_selector=1)
    config = finetune_config.get_config()
    tx, _ = optim.create_optimizer(
        config.finetune.optim, batch_size=16, total_steps=2, warmup_steps=0
    )
    state = finetune.create_finetune_state(pretrained, model, tx, 32, seed=0)
    saved = restored_encoder(pretrained_run)
    for name in ("encoder", "head"):
        assert_trees_equal(state.params[name], saved["params"][name])
        assert_trees_equal(state.batch_stats[name], saved["batch_stats"][name])
    assert set(state.params) == {"encoder", "head", "classifier"}


@pytest.mark.slow
def test_finetune_with_frozen_stages_end_to_end(pretrained_run, tmp_path, monkeypatch):
    config = tiny_protocol(finetune_config.get_config(), pretrained_run)
    config.finetune.label_fraction = 0.1  # 400 labelled examples
    config.finetune.epochs = 0.1
    config.finetune.batch_size = 64
    config.finetune.from_block = 3
    captured = {}
    real_step = finetune.make_train_step

    def capturing(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def wrapped(state, images, labels):
            state, loss = step(state, images, labels)
            captured["state"] = state
            return state, loss

        return wrapped

    monkeypatch.setattr(finetune, "make_train_step", capturing)
    results = protocols.run("finetune", config, str(tmp_path))
    assert results["labelled_examples"] == 400 and results["steps"] == 1
    assert os.path.exists(tmp_path / files.RESULTS_FILE)
    final = jax.device_get(captured["state"])
    saved = restored_encoder(pretrained_run)
    enc, ref = final.params["encoder"], saved["params"]["encoder"]
    for frozen in ("stem_conv", "block1_0", "block2_1"):
        assert_trees_equal(enc[frozen], ref[frozen])
        if frozen in final.batch_stats["encoder"]:
            assert_trees_equal(
                final.batch_stats["encoder"][frozen], saved["batch_stats"]["encoder"][frozen]
            )
    moved = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), enc["block4_1"], ref["block4_1"])
    )
    assert max(moved) > 0


def test_export_round_trip_gives_identical_features(pretrained_run, tmp_path):
    path = export.export_encoder(pretrained_run, str(tmp_path / "encoder.npz"))
    with np.load(path) as data:
        assert "encoder/block1_0/conv1/kernel" in data.files
        assert "batch_stats/encoder/stem_bn/mean" in data.files
        assert "head/dense_0/kernel" in data.files
    variables = export.load_exported(path)
    model_cfg = export.load_exported_model_config(path)
    assert model_cfg["base_width"] == 4
    encoder = models.build_encoder(pretrained_lib.load_pretrained(pretrained_run).model_config)
    saved = restored_encoder(pretrained_run)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
    apply = jax.jit(encoder.apply, static_argnames="train")
    reference = apply(
        {"params": saved["params"]["encoder"], "batch_stats": saved["batch_stats"]["encoder"]},
        images,
        train=False,
    )
    loaded = apply(
        {
            "params": variables["params"]["encoder"],
            "batch_stats": variables["batch_stats"]["encoder"],
        },
        images,
        train=False,
    )
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(reference))
    with pytest.raises(ValueError, match="npz"):
        export.export_encoder(pretrained_run, str(tmp_path / "encoder.pt"))


# --- Bad input. ----------------------------------------------------------------------------


def test_missing_or_empty_init_from_is_reported(tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        pretrained_lib.load_pretrained("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained_lib.load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrained_lib.load_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="protocol='pretrained'"):
        protocols.run("pretrained", linear_config.get_config(), str(tmp_path))


def test_different_architecture_is_reported(pretrained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(pretrained_run, copy)
    with open(copy / "config.json") as f:
        saved = json.load(f)
    saved["model"]["base_width"] = 8
    with open(copy / "config.json", "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match="does not match the architecture"):
        pretrained_lib.load_pretrained(str(copy))
    os.remove(copy / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained_lib.load_pretrained(str(copy))


def test_head_with_other_class_count_is_reported(pretrained_run, tmp_path):
    pretrained = pretrained_lib.load_pretrained(pretrained_run)
    with pytest.raises(ValueError, match="has 10 classes but the dataset has 100.*init_from_probe"):
        pretrained_lib.check_num_classes(
            pretrained.probe_classes,
            100,
            head="checkpoint's online probe",
            fix="set --config.linear.init_from_probe=False",
        )


def test_finetune_selector_and_configs_are_checked():
    model_cfg = tiny_config().model
    with pytest.raises(ValueError, match="ft_proj_selector=5"):
        finetune.build_finetune_model(model_cfg, 10, ft_proj_selector=5)
    with pytest.raises(ValueError, match="linear.mode='fast'"):
        cfg = linear_cfg()
        cfg.mode = "fast"
        linear.train_linear_on_features(np.zeros((4, 2)), np.zeros(4, int), 2, cfg)
    for get in (linear_config.get_config, knn_config.get_config, finetune_config.get_config):
        assert get().protocol in protocols.PROTOCOLS
    assert finetune_config.get_config("1pct").finetune.label_fraction == 0.01
