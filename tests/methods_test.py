"""Tests of the method interface (simclr_jax.methods), BYOL and MoCo v3 on the train step, and
every method through the trainer and the evaluation tools.

The losses themselves are tested against float64 NumPy formulas in method_losses_test.py,
Barlow Twins' and VICReg's steps in methods_redundancy_test.py. Here: the EMA schedule and
update against NumPy; one BYOL / MoCo v3 step on 1 device against 8 devices (global BN, params
and EMA target); and, slow, BYOL and MoCo v3 runs stopped and resumed against uninterrupted
ones, bit for bit, with the target in the checkpoint; kNN, export and fine-tuning on each
method's checkpoint; a smoke run of main.py per method (MoCo v2 included; its own tests are in
queue_methods_test.py).
"""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from tiny_run import tiny_config

from configs import (
    barlow_twins_cifar10,
    byol_cifar10,
    cifar10,
    instdisc_cifar10,
    mocov2_cifar10,
    mocov3_cifar10,
    nnclr_cifar10,
    vicreg_cifar10,
)
from configs import knn as knn_config
from simclr_jax import (
    checkpoint,
    config_checks,
    export,
    methods,
    models,
    sharding,
    steps,
    train,
)
from simclr_jax.eval import finetune, protocols
from simclr_jax.eval import pretrained as pretrained_lib
from simclr_jax.methods import byol, ema, mocov3
from simclr_jax.methods.heads import MLPHead

AXIS = sharding.DATA_AXIS
P = jax.sharding.PartitionSpec


def test_ema_rate_follows_the_byol_schedule():
    total, tau_base = 40, 0.99
    k = np.arange(total + 1)
    ref = 1 - (1 - tau_base) * (np.cos(np.pi * k / total) + 1) / 2
    got = np.array([ema.ema_rate(i, total, tau_base) for i in k])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)
    assert got[0] == pytest.approx(tau_base) and got[-1] == pytest.approx(1.0)


class _TinyEncoder(nn.Module):
    """Conv -> BN (global with bn_axis_name) -> ReLU -> mean pool: cheap to compile."""

    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, images, train: bool):
        x = nn.Conv(6, (3, 3), use_bias=False)(images)
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name)(x)
        return jnp.mean(nn.relu(x), axis=(1, 2))


def _byol_model(axis, moco=False):
    head = dict(bn_axis_name=axis)
    if moco:
        projector = MLPHead(16, 8, use_bias=False, out_bias=False, last_bn=True, **head)
        predictor = MLPHead(16, 8, use_bias=False, out_bias=False, **head)
    else:
        projector, predictor = MLPHead(16, 8, **head), MLPHead(16, 8, **head)
    return byol.BYOLModel(
        encoder=_TinyEncoder(bn_axis_name=axis),
        projector=projector,
        predictor=predictor,
        probe=models.LinearHead(num_classes=10),
    )


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return {
        "view1": rng.uniform(size=(n, 8, 8, 3)).astype(np.float32),
        "view2": rng.uniform(size=(n, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


TOTAL_STEPS, TAU_BASE = 10, 0.9


def run_steps(method, build_model, tx, state, batches, num_devices, parallelism="shard_map"):
    """The train step of `method` over `batches` from `state` on num_devices (1: plain jit;
    otherwise compile_train_step with `parallelism`), the LR logged as 0.5.

    Args:
      build_model: axis -> the method's model with that BN axis (None on one device).

    Returns:
      (new state, the last step's metrics computed) as NumPy.
    """
    axis = AXIS if num_devices > 1 else None
    step = functools.partial(
        steps.train_step,
        model=build_model(axis),
        tx=tx,
        learning_rate_fn=lambda s: jnp.float32(0.5),
        method=method,
        axis_name=axis,
        sync_batch_stats=False,
    )
    if num_devices == 1:
        fn, place = jax.jit(step), lambda b: b
    else:
        mesh = sharding.create_mesh(jax.devices()[:num_devices])
        fn = steps.compile_train_step(step, parallelism=parallelism, mesh=mesh)
        place = functools.partial(sharding.make_global_batch, mesh=mesh)
        if parallelism == "pmap":
            state = sharding.replicate_for_pmap(state, jax.devices()[:num_devices])
            place = functools.partial(sharding.shard_for_pmap, num_local_devices=num_devices)
    for batch in batches:
        state, metrics = fn(state, place(batch))
    if parallelism == "pmap" and num_devices > 1:
        state = sharding.unreplicate_from_pmap(state)
        metrics = sharding.unreplicate_from_pmap(metrics)
    return jax.device_get(state), jax.device_get(metrics.compute())


def assert_ema_of_post_step_params(old, new, tau):
    """new.target_params == tau * old.target_params + (1 - tau) * new.params (float64), for
    the target's modules {'encoder', 'projector'}; float32 rounding allowed."""
    assert set(new.target_params) == {"encoder", "projector"}
    for name in new.target_params:
        expected = jax.tree_util.tree_map(
            lambda t, o: tau * np.float64(t) + (1 - tau) * np.float64(o),
            old.target_params[name],
            new.params[name],
        )
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
            new.target_params[name],
            expected,
        )


def _byol_step(num_devices, start_step=0, parallelism="shard_map", moco=False):
    """One BYOL (or MoCo v3) step with SGD(0.5) from a state whose target differs from the
    online net.

    Returns (old state, new state, metrics) as NumPy."""
    if moco:
        method = mocov3.MoCoV3(tau_base=TAU_BASE, total_steps=TOTAL_STEPS, temperature=0.2)
    else:
        method = byol.BYOL(tau_base=TAU_BASE, total_steps=TOTAL_STEPS)
    tx = optax.sgd(0.5)
    state = method.create_state(_byol_model(None, moco), tx, jax.random.key(0), (8, 8, 3))
    # A target unlike the online network, so the EMA's mixing is visible.
    state = state.replace(
        step=jnp.int32(start_step),
        target_params=jax.tree_util.tree_map(lambda x: 0.5 * x + 0.01, state.target_params),
    )
    old = jax.device_get(state)
    build = functools.partial(_byol_model, moco=moco)
    new, metrics = run_steps(method, build, tx, state, [_batch()], num_devices, parallelism)
    return old, new, metrics


@pytest.mark.parametrize("start_step", [0, 7])
def test_byol_step_updates_the_target_by_the_ema_of_the_post_step_params(start_step):
    old, new, metrics = _byol_step(1, start_step)
    k = start_step
    tau = 1 - (1 - TAU_BASE) * (np.cos(np.pi * k / TOTAL_STEPS) + 1) / 2
    assert_ema_of_post_step_params(old, new, tau)
    # The online network moved (so "post-step" differs from "pre-step").
    assert optax.tree.norm(jax.tree_util.tree_map(np.subtract, new.params, old.params)) > 1e-3
    # The target's BN running statistics come from its own forward pass in training mode.
    moved = jax.tree_util.tree_map(np.subtract, new.target_batch_stats, old.target_batch_stats)
    assert optax.tree.norm(moved) > 0
    assert 0.0 <= metrics["loss"] <= 8.0 and new.step == start_step + 1


# 8 devices sum in another order than 1: measured differences <= 3e-7 absolute (float32
# rounding; the pre-BN biases, whose exact gradient is 0, hold only such noise); bounds 1e-5
# of each tensor's largest entry plus 1e-6.
TREE_TOL, TREE_ATOL = 1e-5, 1e-6


def _assert_trees_close(a, b, tol, atol=TREE_ATOL):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        error, bound = np.abs(x - y).max(), tol * np.abs(y).max() + atol
        assert error <= bound, f"{jax.tree_util.keystr(path)}: {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("parallelism", ["shard_map", pytest.param("pmap", marks=pytest.mark.slow)])
def test_byol_step_on_eight_devices_equals_one_device(parallelism):
    _, one, one_metrics = _byol_step(1, 3)
    _, eight, eight_metrics = _byol_step(8, 3, parallelism)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    for field in ("params", "batch_stats", "target_params", "target_batch_stats"):
        _assert_trees_close(getattr(eight, field), getattr(one, field), TREE_TOL)


def test_mocov3_step_on_eight_devices_equals_one_device():
    _, one, one_metrics = _byol_step(1, 3, moco=True)
    _, eight, eight_metrics = _byol_step(8, 3, moco=True)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    for field in ("params", "batch_stats", "target_params", "target_batch_stats"):
        _assert_trees_close(getattr(eight, field), getattr(one, field), TREE_TOL)


def test_simclr_keeps_the_plain_train_state_tree():
    """Old SimCLR checkpoints keep loading: the state is {'step', 'params', 'batch_stats',
    'opt_state'} with params {'encoder', 'head', 'probe'}."""
    config = tiny_config()
    method = methods.from_config(config, total_steps=4)
    model = methods.build_model(config, num_classes=10)
    tx = optax.sgd(0.1)
    state = jax.eval_shape(
        lambda k: method.create_state(model, tx, k, (32, 32, 3)), jax.random.key(0)
    )
    assert type(state) is steps.TrainState
    assert set(state.params) == {"encoder", "head", "probe"}


def test_config_errors_name_the_field():
    config = byol_cifar10.get_config("runlocal")
    config.train.micro_batch_size = 16
    with pytest.raises(config_checks.ConfigError, match=r"train\.micro_batch_size"):
        methods.check_config(config)
    config = byol_cifar10.get_config("runlocal")
    config.method.tau_base = 1.5
    with pytest.raises(config_checks.ConfigError, match=r"method\.tau_base"):
        methods.check_config(config)
    config = mocov3_cifar10.get_config("runlocal")
    config.method.temperature = 0.0
    with pytest.raises(config_checks.ConfigError, match=r"method\.temperature"):
        methods.check_config(config)
    config = cifar10.get_config("runlocal")
    config.method.name = "byl"
    with pytest.raises(config_checks.ConfigError, match=r"method\.name"):
        methods.check_config(config)
    # A run's config.json from before config.method existed is SimCLR.
    assert methods.method_name(mlc.ConfigDict({"model": {}})) == "simclr"


METHOD_CONFIGS = {
    "byol": byol_cifar10,
    "mocov2": mocov2_cifar10,
    "mocov3": mocov3_cifar10,
    "barlow_twins": barlow_twins_cifar10,
    "vicreg": vicreg_cifar10,
    "nnclr": nnclr_cifar10,
    "instdisc": instdisc_cifar10,
}
EMA_METHODS = ("byol", "mocov3")


def _tiny_method(name, **overrides):
    config = tiny_config(**overrides)
    config.method = METHOD_CONFIGS[name].get_config("runlocal").method
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """name -> the workdir of an uninterrupted 4-step tiny run of that method on 8 devices."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = str(tmp_path_factory.mktemp(f"{name}_run"))
            train.train_and_evaluate(_tiny_method(name), runs[name])
        return runs[name]

    return get


def restore_latest(workdir):
    """The workdir's latest checkpoint as a tree of NumPy arrays."""
    manager = checkpoint.create_manager(workdir, max_to_keep=3, asynchronous=False)
    restored = manager.restore(manager.latest_step())
    manager.close()
    return jax.tree_util.tree_map(np.asarray, restored)


@pytest.mark.slow
@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_method_resumed_run_equals_uninterrupted_bit_for_bit(name, uninterrupted, tmp_path):
    """BYOL and MoCo v3: the EMA target is in the checkpoint and resumes exactly."""
    workdir = str(tmp_path)
    out = train.train_and_evaluate(_tiny_method(name, train__stop_at_step=2), workdir)
    assert out["preempted"] and checkpoint.latest_step(workdir) == 2
    saved = restore_latest(workdir)
    assert set(saved["target_params"]) == {"encoder", "projector"}
    assert set(saved["target_batch_stats"]) == {"encoder", "projector"}
    train.train_and_evaluate(_tiny_method(name), workdir)
    resumed, reference = restore_latest(workdir), restore_latest(uninterrupted(name))
    assert int(resumed["step"]) == 4
    for field in ("params", "batch_stats", "opt_state", "target_params", "target_batch_stats"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, resumed[field], reference[field])
    # The target is not a copy of the online network: the EMA ran.
    target = jax.tree_util.tree_leaves(resumed["target_params"]["encoder"])
    online = jax.tree_util.tree_leaves(resumed["params"]["encoder"])
    assert not all(np.array_equal(t, o) for t, o in zip(target, online, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_knn_export_and_finetune_read_the_method_from_the_run(name, uninterrupted, tmp_path):
    """kNN (with its random-init baseline, which rebuilds the method's model), the npz export of
    the online encoder, and fine-tuning: from h it starts; from a head layer it stops with a
    ConfigError, as these methods have no SimCLR projection head."""
    run = uninterrupted(name)
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["method"]["name"] == name
    config = knn_config.get_config()
    config.init_from = run
    config.eval.batch_size = 256
    config.eval.knn_k = 20
    config.eval.compare_random_init = True
    results = protocols.run("knn", config, str(tmp_path / "knn"))
    assert results["checkpoint"]["step"] == 4
    assert 0.0 <= results["top1"] <= 1.0 and 0.0 <= results["random_init"]["top1"] <= 1.0
    out = export.export_encoder(run, str(tmp_path / f"{name}.npz"), include_head=True)
    exported = export.load_exported(out)
    assert set(exported["params"]) == {"encoder"}
    saved = restore_latest(run)["params"]["encoder"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, exported["params"]["encoder"], saved)
    pretrained = pretrained_lib.load_pretrained(run)
    tx = optax.sgd(0.1)
    from_h = finetune.build_finetune_model(pretrained.model_config, 10, 0)
    state = finetune.create_finetune_state(pretrained, from_h, tx, 32, seed=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params["encoder"], saved)
    from_head = finetune.build_finetune_model(pretrained.model_config, 10, 1)
    with pytest.raises(config_checks.ConfigError, match=rf"ft_proj_selector=1.*{name}"):
        finetune.create_finetune_state(pretrained, from_head, tx, 32, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_each_method_trains_through_main_py(name, tmp_path):
    """A 2-step smoke run of the real CLI per method (8 fake devices, global BN)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        "main.py",
        f"--workdir={tmp_path}",
        f"--config=configs/{name}_cifar10.py:runlocal",
        "--config.model.base_width=4",
        "--config.train.batch_size=16",
        "--config.train.steps=2",
        "--config.eval.knn=False",
        f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}",
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    title = methods.METHODS[name].TITLE
    assert f"{title} pretraining: 2 steps" in proc.stdout
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert last["step"] == 2 and np.isfinite(last["train/loss"])
    saved = restore_latest(str(tmp_path))
    assert set(saved["params"]) >= {"encoder", "projector", "probe"}
    if name in EMA_METHODS or name == "mocov2":
        assert set(saved["target_params"]) == {"encoder", "projector"}
        if name == "mocov2":  # the queue and its position after 2 steps of 16
            assert saved["queue"].shape == (256, 32) and int(saved["queue_ptr"]) == 32
    else:
        assert "target_params" not in saved
    if name == "nnclr":  # the support set of view-1 projections after 2 steps of 16
        assert saved["queue"].shape == (256, 32) and int(saved["queue_ptr"]) == 32
    if name == "instdisc":  # one bank row per example of the embedded sample's 4,000
        assert saved["bank"].shape == (4000, 32)
