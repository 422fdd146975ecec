"""Tests of the replicated FIFO queue (simclr_jax.methods.queue) and MoCo v2 on the train step.

The queue after several updates against a NumPy simulation of the FIFO over the global
batches (wrapping around), on 1, 4 and 8 devices; memory_losses.moco_v2_loss against a
float64 NumPy reference (value and, by finite differences, gradient) and on 8 devices against
1; MoCo v2 steps on 8 devices against 1 (params, key encoder, queue, ptr) and one step against
an independent computation; the config errors; slow: a run stopped and resumed against the
uninterrupted one, bit for bit with the queue and its position in the checkpoint.
(tests/methods_test.py also runs MoCo v2 through main.py, kNN, export and fine-tuning.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_losses_test import finite_difference_grads
from methods_test import (
    _assert_trees_close,
    _batch,
    _TinyEncoder,
    assert_ema_of_post_step_params,
    restore_latest,
    run_steps,
)
from tiny_run import tiny_config

from configs import mocov2_cifar10, mocov2_imagenet
from simclr_jax import (
    checkpoint,
    config_checks,
    memory_losses,
    methods,
    models,
    sharding,
    train,
    train_state,
)
from simclr_jax.methods import mocov2
from simclr_jax.methods import queue as queue_lib
from simclr_jax.methods.heads import MLPHead, ProjectorModel

AXIS = sharding.DATA_AXIS
P = jax.sharding.PartitionSpec
TAU = 0.2

# ----------------------------------------------------------------------------
# The queue.
# ----------------------------------------------------------------------------


def _numpy_fifo(queue, batches):
    """The FIFO by hand: each global batch overwrites the oldest len(batch) rows."""
    queue, ptr = np.array(queue), 0
    for batch in batches:
        queue[ptr : ptr + len(batch)] = batch
        ptr = (ptr + len(batch)) % len(queue)
    return queue, ptr


def _run_enqueues(queue, batches, num_devices):
    """queue_lib.enqueue over the global batches, each split over num_devices devices."""
    ptr = jnp.int32(0)
    if num_devices == 1:
        update = jax.jit(functools.partial(queue_lib.enqueue, axis_name=None))
        for batch in batches:
            queue, ptr = update(queue, ptr, batch)
        return np.asarray(queue), int(ptr)
    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    update = jax.jit(
        jax.shard_map(
            functools.partial(queue_lib.enqueue, axis_name=AXIS),
            mesh=mesh,
            in_specs=(P(), P(), P(AXIS)),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )
    for batch in batches:
        queue, ptr = update(queue, ptr, batch)
    return np.asarray(queue), int(ptr)


@pytest.mark.parametrize("num_devices", [1, 4, 8])
def test_queue_after_k_steps_is_the_numpy_fifo_of_the_global_batches(num_devices):
    size, dim, batch_size, k = 48, 5, 16, 5  # k > size / batch_size: the queue wraps.
    queue, ptr = queue_lib.init(jax.random.key(0), size, dim)
    assert queue.dtype == jnp.float32 and queue.shape == (size, dim)
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-6)
    assert ptr.dtype == jnp.int32 and int(ptr) == 0
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(batch_size, dim)).astype(np.float32) for _ in range(k)]
    got, got_ptr = _run_enqueues(queue, batches, num_devices)
    want, want_ptr = _numpy_fifo(queue, batches)
    np.testing.assert_array_equal(got, want)  # exact: the rows are copied, in batch order
    assert got_ptr == want_ptr == (k * batch_size) % size == 32
    # The rows of the last two batches, and the slot written 3 updates ago is batch 2's.
    np.testing.assert_array_equal(got[16:32], batches[4])
    np.testing.assert_array_equal(got[32:48], batches[2])


def test_enqueue_refuses_a_queue_that_is_not_a_multiple_of_the_batch():
    queue, ptr = queue_lib.init(jax.random.key(0), 40, 4)
    with pytest.raises(ValueError, match="multiple of the global batch 16"):
        queue_lib.enqueue(queue, ptr, jnp.ones((16, 4)), None)
    with pytest.raises(ValueError, match=r"rows must be \[n, 4\]"):
        queue_lib.enqueue(queue, ptr, jnp.ones((8, 3)), None)


# ----------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------


def np_moco_v2(q, k, queue, tau):
    """Float64: -log softmax of column 0 of [q.k, q.queue^T] / tau, mean over the batch."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = np.concatenate([np.sum(qn * kn, 1, keepdims=True), qn @ queue.T], axis=1) / tau
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.sum(np.exp(logits - top), axis=1))
    return np.mean(log_z - logits[:, 0]), np.mean(np.argmax(logits, 1) == 0)


def _loss_inputs(n, d, size, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, d))
    k = q + 0.8 * rng.normal(size=(n, d))  # correlated: the positive often wins
    queue = rng.normal(size=(size, d))
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    return [x.astype(np.float32) for x in (q, k, queue)]


def _loss_value_and_grads(q, k, queue, axis_name=None):
    fn = functools.partial(memory_losses.moco_v2_loss, temperature=TAU, axis_name=axis_name)
    return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(q, k, queue)


def test_moco_v2_loss_value_and_gradient_match_float64_numpy():
    q, k, queue = _loss_inputs(6, 5, 16, seed=2)
    (loss, metrics), (gq, gk, gqueue) = jax.jit(_loss_value_and_grads)(q, k, queue)
    ref, acc = np_moco_v2(*[x.astype(np.float64) for x in (q, k, queue)], TAU)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_acc"], acc)
    assert 0 < acc < 1  # both outcomes occur, so the metric is tested
    rest = [x.astype(np.float64) for x in (k, queue)]
    (fd,) = finite_difference_grads(lambda a: np_moco_v2(a, *rest, TAU)[0], [q])
    scale = np.max(np.abs(fd))
    assert scale > 1e-3
    np.testing.assert_allclose(gq, fd, atol=1e-5 * scale, rtol=1e-4)
    # The key and the queue are constants of the loss.
    np.testing.assert_array_equal(gk, np.zeros_like(gk))
    np.testing.assert_array_equal(gqueue, np.zeros_like(gqueue))


def test_moco_v2_loss_on_eight_devices_equals_one_device():
    """The queue replicated, the batch split: the value is the global batch's on every device
    and each device's input gradient is D x the global one (method_losses' convention)."""
    num_devices, n_local = 8, 3
    q, k, queue = _loss_inputs(num_devices * n_local, 6, 40, seed=3)
    (ref_loss, ref_metrics), (ref_gq, _, _) = jax.jit(_loss_value_and_grads)(q, k, queue)

    def body(q, k, queue):
        (loss, metrics), (gq, _, _) = _loss_value_and_grads(q, k, queue, axis_name=AXIS)
        return loss[None], metrics["contrastive_acc"][None], gq

    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(AXIS), P(AXIS), P()),
        out_specs=(P(AXIS), P(AXIS), P(AXIS)),
        check_vma=False,
    )
    loss, acc, gq = jax.jit(fn)(q, k, queue)
    np.testing.assert_allclose(loss, np.full(num_devices, ref_loss), rtol=5e-6)
    np.testing.assert_allclose(acc, np.full(num_devices, ref_metrics["contrastive_acc"]))
    scale = np.max(np.abs(ref_gq))
    np.testing.assert_allclose(np.asarray(gq) / num_devices, ref_gq, atol=5e-6 * scale)
    # ... the float64 reference's global value.
    ref, _ = np_moco_v2(*[x.astype(np.float64) for x in (q, k, queue)], TAU)
    np.testing.assert_allclose(loss[0], ref, rtol=1e-5)


def test_moco_v2_loss_refuses_bad_inputs():
    q, k, queue = _loss_inputs(4, 3, 8, seed=0)
    with pytest.raises(ValueError, match=r"queue must be \[K, 3\]"):
        memory_losses.moco_v2_loss(q, k, queue[:, :2], TAU)
    with pytest.raises(ValueError, match=r"batch sizes differ"):
        memory_losses.moco_v2_loss(q, k[:2], queue, TAU)
    with pytest.raises(ValueError, match=r"temperature must be a finite scalar > 0"):
        memory_losses.moco_v2_loss(q, k, queue, 0.0)


# ----------------------------------------------------------------------------
# MoCo v2 on the train step.
# ----------------------------------------------------------------------------

MOMENTUM, QUEUE_SIZE, BATCH = 0.9, 32, 16


def _model(axis):
    return ProjectorModel(
        encoder=_TinyEncoder(bn_axis_name=axis),
        projector=MLPHead(16, 8, hidden_bn=False),
        probe=models.LinearHead(num_classes=10),
    )


def _mocov2_steps(num_devices, num_steps, parallelism="shard_map"):
    """num_steps MoCo v2 steps with SGD(0.5) from a state whose key encoder differs from the
    query encoder, on batches _batch(seed=i). Returns (old state, new state, metrics) as NumPy."""
    method = mocov2.MoCoV2(momentum=MOMENTUM, temperature=TAU, queue_size=QUEUE_SIZE)
    tx = optax.sgd(0.5)
    state = method.create_state(_model(None), tx, jax.random.key(0), (8, 8, 3))
    state = state.replace(
        target_params=jax.tree_util.tree_map(lambda x: 0.5 * x + 0.01, state.target_params)
    )
    old = jax.device_get(state)
    batches = [_batch(seed=i, n=BATCH) for i in range(num_steps)]
    new, metrics = run_steps(method, _model, tx, state, batches, num_devices, parallelism)
    return old, new, metrics


def test_mocov2_step_updates_key_encoder_and_queue():
    """One step on one device against an independent computation of the EMA and the keys."""
    old, new, metrics = _mocov2_steps(1, 1)
    assert type(new) is train_state.QueueTrainState
    assert set(new.params["projector"]) == {"dense_0", "dense_1"}  # MoCo v2's head: no BN
    assert set(new.target_batch_stats) == {"encoder"}
    assert_ema_of_post_step_params(old, new, MOMENTUM)
    # The keys: the pre-step key encoder on view 2 (BN in training mode over view 2 only).
    view2 = _batch(seed=0, n=BATCH)["view2"]
    variables = {"params": old.target_params, "batch_stats": old.target_batch_stats}
    k, stats = _model(None).apply(
        variables, view2, train=True, mutable=["batch_stats"], method=ProjectorModel.target_forward
    )
    keys = np.asarray(k) / np.linalg.norm(np.asarray(k), axis=1, keepdims=True)
    np.testing.assert_allclose(new.queue[:BATCH], keys, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new.queue[BATCH:], old.queue[BATCH:])
    assert int(new.queue_ptr) == BATCH and int(new.step) == 1
    _assert_trees_close(new.target_batch_stats, stats["batch_stats"], 1e-6)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0


# The 8 devices sum in another order than 1: float32 rounding (see methods_test.py).
@pytest.mark.parametrize("parallelism", ["shard_map", pytest.param("pmap", marks=pytest.mark.slow)])
def test_mocov2_steps_on_eight_devices_equal_one_device(parallelism):
    """Three steps (the queue of two batches wraps): params, key encoder, queue and ptr."""
    _, one, one_metrics = _mocov2_steps(1, 3)
    _, eight, eight_metrics = _mocov2_steps(8, 3, parallelism)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    for field in ("params", "batch_stats", "target_params", "target_batch_stats", "queue"):
        _assert_trees_close(getattr(eight, field), getattr(one, field), 1e-5)
    assert int(eight.queue_ptr) == int(one.queue_ptr) == (3 * BATCH) % QUEUE_SIZE


def test_mocov2_config_errors_name_the_field():
    def check(field, value, match):
        config = mocov2_cifar10.get_config("runlocal")
        section, name = field.split(".")
        config[section][name] = value
        with pytest.raises(config_checks.ConfigError, match=match):
            methods.check_config(config)

    check("method.queue_size", 100, r"method\.queue_size=100.*multiple of the global batch")
    check("method.queue_size", 0, r"method\.queue_size=0")
    check("method.momentum", 1.5, r"method\.momentum=1\.5")
    check("method.temperature", 0.0, r"method\.temperature")
    check("method.projector_dim", 0, r"method\.projector_dim")
    check("method.projector_hidden_dim", -1, r"method\.projector_hidden_dim")
    check("train.micro_batch_size", 16, r"train\.micro_batch_size")
    for arg in (None, "quickstart", "runlocal"):
        config = mocov2_cifar10.get_config(arg)
        methods.check_config(config)
        config_checks.validate_pretrain_config(config)
        assert config.method.queue_size % config.train.batch_size == 0
    # The paper's ImageNet recipe: SGD 0.03 at batch 256, 800 epochs, queue 65,536, m 0.999.
    for arg in (None, "runlocal"):
        config = mocov2_imagenet.get_config(arg)
        methods.check_config(config)
        config_checks.validate_pretrain_config(config)
    config = mocov2_imagenet.get_config()
    assert (config.model.depth, config.train.batch_size, config.train.epochs) == (50, 256, 800)
    assert (config.optim.name, config.optim.base_lr, config.method.queue_size) == (
        "sgd",
        0.03,
        65536,
    )
    assert methods.METHODS["mocov2"].TITLE == "MoCo v2"


def _tiny_mocov2(**overrides):
    config = tiny_config(**overrides)
    config.method = mocov2_cifar10.get_config("runlocal").method
    config.method.queue_size = 48  # 3 global batches of 16: 4 steps wrap it
    return config


@pytest.mark.slow
def test_mocov2_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path):
    """The key encoder, the queue and its position are in the checkpoint and resume exactly."""
    reference = str(tmp_path / "uninterrupted")
    train.train_and_evaluate(_tiny_mocov2(), reference)
    workdir = str(tmp_path / "resumed")
    out = train.train_and_evaluate(_tiny_mocov2(train__stop_at_step=2), workdir)
    assert out["preempted"] and checkpoint.latest_step(workdir) == 2
    saved = restore_latest(workdir)
    assert int(saved["queue_ptr"]) == 32 and saved["queue"].shape == (48, 32)
    train.train_and_evaluate(_tiny_mocov2(), workdir)
    resumed, uninterrupted = restore_latest(workdir), restore_latest(reference)
    assert int(resumed["step"]) == 4 and int(resumed["queue_ptr"]) == (4 * 16) % 48
    fields = ("params", "batch_stats", "opt_state", "target_params", "target_batch_stats")
    for field in (*fields, "queue", "queue_ptr"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, resumed[field], uninterrupted[field])
    # The queue holds keys of the run (unit rows, not the initial ones everywhere).
    np.testing.assert_allclose(np.linalg.norm(resumed["queue"], axis=1), 1.0, rtol=1e-5)
    assert not np.array_equal(resumed["queue"], saved["queue"])
