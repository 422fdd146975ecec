"""Tests of NNCLR (support set) and InstDisc (memory bank) on the train step.

The memory bank after several updates against a NumPy simulation over the global batches, on
1, 4 and 8 devices; memory_losses.nnclr_loss and instdisc_loss against float64 NumPy references
(value and, by finite differences, gradient) and on 8 devices against 1; one step of each
method against an independent computation of what enters the support set / the bank; steps on
8 devices against 1; the config errors; slow: a run stopped and resumed against the
uninterrupted one, bit for bit with the support set / bank in the checkpoint.
(tests/methods_test.py also runs both through main.py, kNN, export and fine-tuning; the FIFO
queue itself is tested in tests/queue_methods_test.py.)
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
    restore_latest,
    run_steps,
)
from tiny_run import tiny_config

from configs import instdisc_cifar10, nnclr_cifar10
from simclr_jax import (
    checkpoint,
    config_checks,
    memory_losses,
    methods,
    models,
    sharding,
    steps,
    train,
    train_state,
)
from simclr_jax.methods import instdisc, memory_bank, nnclr
from simclr_jax.methods.byol import BYOLModel
from simclr_jax.methods.heads import MLPHead, ProjectorModel

AXIS = sharding.DATA_AXIS
P = jax.sharding.PartitionSpec
TAU = 0.2


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _shard_mapped(fn, num_devices, in_specs, out_specs):
    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    return jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    )


# ----------------------------------------------------------------------------
# The memory bank.
# ----------------------------------------------------------------------------


def _numpy_bank(bank, updates, momentum):
    """The bank by hand, float64: row i <- unit(m * row i + (1 - m) * unit(new_i))."""
    bank = np.array(bank, np.float64)
    for index, rows in updates:
        bank[index] = _unit(momentum * bank[index] + (1 - momentum) * _unit(rows))
    return bank


@pytest.mark.parametrize("num_devices", [1, 4, 8])
def test_bank_after_k_steps_is_the_numpy_update_of_the_global_batches(num_devices):
    size, dim, batch, k, m = 40, 5, 16, 4, 0.5  # 4 x 16 > 40: rows are revisited
    bank = memory_bank.init(jax.random.key(0), size, dim)
    assert bank.dtype == jnp.float32 and bank.shape == (size, dim)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-6)
    rng = np.random.default_rng(1)
    updates = [
        (rng.permutation(size)[:batch].astype(np.int32), rng.normal(size=(batch, dim)))
        for _ in range(k)
    ]
    update = functools.partial(memory_bank.update, momentum=m)
    if num_devices == 1:
        fn = jax.jit(functools.partial(update, axis_name=None))
    else:
        fn = _shard_mapped(
            functools.partial(update, axis_name=AXIS), num_devices, (P(), P(AXIS), P(AXIS)), P()
        )
    got = bank
    for index, rows in updates:
        got = fn(got, index, rows.astype(np.float32))
    want = _numpy_bank(bank, updates, m)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    touched = np.unique(np.concatenate([i for i, _ in updates]))
    untouched = np.setdiff1d(np.arange(size), touched)
    assert len(untouched) > 0
    np.testing.assert_array_equal(got[untouched], bank[untouched])


def test_bank_refuses_bad_shapes():
    bank = memory_bank.init(jax.random.key(0), 8, 4)
    with pytest.raises(ValueError, match=r"rows must be \[n, 4\] and index \[n\]"):
        memory_bank.update(bank, jnp.arange(3), jnp.ones((3, 2)), 0.5, None)
    with pytest.raises(ValueError, match=r"rows must be \[n, 4\] and index \[n\]"):
        memory_bank.update(bank, jnp.arange(2), jnp.ones((3, 4)), 0.5, None)
    with pytest.raises(ValueError, match="needs >= 1 example"):
        memory_bank.init(jax.random.key(0), 0, 4)


# ----------------------------------------------------------------------------
# The losses against float64 NumPy.
# ----------------------------------------------------------------------------


def _np_log_softmax_at(logits, labels):
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.sum(np.exp(logits - top), axis=1))
    return logits[np.arange(len(labels)), labels] - log_z


def np_nnclr(z1, z2, p1, p2, support, tau):
    """Float64: for each direction, the support row nearest (cosine) to z is the anchor,
    scored against every image's prediction of the other view; the mean of both CEs."""
    labels = np.arange(len(z1))

    def direction(z, p):
        anchors = support[np.argmax(_unit(z) @ support.T, axis=1)]
        logits = anchors @ _unit(p).T / tau
        return -np.mean(_np_log_softmax_at(logits, labels)), np.mean(logits.argmax(1) == labels)

    (ce_12, acc_12), (ce_21, acc_21) = direction(z1, p2), direction(z2, p1)
    return (ce_12 + ce_21) / 2, (acc_12 + acc_21) / 2


def np_instdisc(v, index, bank, tau):
    """Float64: -log P(index | v), P the softmax of bank . unit(v) / tau (Wu et al. eq. 2)."""
    logits = _unit(v) @ bank.T / tau
    return -np.mean(_np_log_softmax_at(logits, index)), np.mean(logits.argmax(1) == index)


def _nnclr_inputs(n, d, size, seed):
    rng = np.random.default_rng(seed)
    z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    p1, p2 = z1 + 0.5 * rng.normal(size=(n, d)), z2 + 0.5 * rng.normal(size=(n, d))
    support = _unit(rng.normal(size=(size, d)))
    return [x.astype(np.float32) for x in (z1, z2, p1, p2, support)]


def _instdisc_inputs(n, d, size, seed):
    rng = np.random.default_rng(seed)
    bank = _unit(rng.normal(size=(size, d)))
    index = rng.permutation(size)[:n].astype(np.int32)
    v = bank[index] + 0.7 * rng.normal(size=(n, d))  # near its own row: the positive often wins
    return v.astype(np.float32), index, bank.astype(np.float32)


def _nnclr_value_and_grads(z1, z2, p1, p2, support, axis_name=None):
    fn = functools.partial(memory_losses.nnclr_loss, temperature=TAU, axis_name=axis_name)
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4), has_aux=True)(z1, z2, p1, p2, support)


def _instdisc_value_and_grads(v, index, bank, axis_name=None):
    def fn(v, bank):
        return memory_losses.instdisc_loss(v, index, bank, TAU, axis_name)

    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(v, bank)


def test_nnclr_loss_value_and_gradient_match_float64_numpy():
    inputs = _nnclr_inputs(6, 5, 10, seed=2)
    (loss, metrics), grads = jax.jit(_nnclr_value_and_grads)(*inputs)
    f64 = [x.astype(np.float64) for x in inputs]
    ref, acc = np_nnclr(*f64, TAU)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_acc"], acc)
    assert 0 < acc < 1  # both outcomes occur, so the metric is tested
    # The nearest neighbours are no function of z in a neighbourhood (argmax): the predictions
    # carry the whole gradient; z and the support set get none.
    z1, z2, p1, p2, support = f64
    fd = finite_difference_grads(lambda a, b: np_nnclr(z1, z2, a, b, support, TAU)[0], [p1, p2])
    for got, want in zip(grads[2:4], fd, strict=True):
        scale = np.max(np.abs(want))
        assert scale > 1e-3
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4)
    for zero in (grads[0], grads[1], grads[4]):
        np.testing.assert_array_equal(zero, np.zeros_like(zero))


def test_instdisc_loss_value_and_gradient_match_float64_numpy():
    v, index, bank = _instdisc_inputs(6, 5, 12, seed=3)
    (loss, metrics), (gv, gbank) = jax.jit(_instdisc_value_and_grads)(v, index, bank)
    ref, acc = np_instdisc(v.astype(np.float64), index, bank.astype(np.float64), TAU)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_acc"], acc)
    assert 0 < acc < 1
    (fd,) = finite_difference_grads(
        lambda a: np_instdisc(a, index, bank.astype(np.float64), TAU)[0], [v]
    )
    scale = np.max(np.abs(fd))
    assert scale > 1e-3
    np.testing.assert_allclose(gv, fd, atol=1e-5 * scale, rtol=1e-4)
    np.testing.assert_array_equal(gbank, np.zeros_like(gbank))  # the bank is a constant


def test_memory_losses_on_eight_devices_equal_one_device():
    """The support set and the bank replicated, the batch split: every device reports the
    global value and its input gradient is D x the global one (method_losses' convention)."""
    num_devices, n_local = 8, 2
    n = num_devices * n_local
    inputs = _nnclr_inputs(n, 6, 20, seed=4)
    (ref_loss, ref_metrics), ref_grads = jax.jit(_nnclr_value_and_grads)(*inputs)

    def nnclr_body(*args):
        (loss, metrics), grads = _nnclr_value_and_grads(*args, axis_name=AXIS)
        return loss[None], metrics["contrastive_acc"][None], grads[2], grads[3]

    batch_spec = (P(AXIS),) * 4
    fn = _shard_mapped(nnclr_body, num_devices, batch_spec + (P(),), (P(AXIS),) * 4)
    loss, acc, g1, g2 = fn(*inputs)
    np.testing.assert_allclose(loss, np.full(num_devices, ref_loss), rtol=5e-6)
    np.testing.assert_allclose(acc, np.full(num_devices, ref_metrics["contrastive_acc"]))
    for got, want in ((g1, ref_grads[2]), (g2, ref_grads[3])):
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(np.asarray(got) / num_devices, want, atol=5e-6 * scale)
    ref, _ = np_nnclr(*[x.astype(np.float64) for x in inputs], TAU)
    np.testing.assert_allclose(loss[0], ref, rtol=1e-5)

    v, index, bank = _instdisc_inputs(n, 6, 40, seed=5)
    (ref_loss, _), (ref_gv, _) = jax.jit(_instdisc_value_and_grads)(v, index, bank)

    def instdisc_body(v, index, bank):
        (loss, _), (gv, _) = _instdisc_value_and_grads(v, index, bank, axis_name=AXIS)
        return loss[None], gv

    fn = _shard_mapped(instdisc_body, num_devices, (P(AXIS), P(AXIS), P()), (P(AXIS), P(AXIS)))
    loss, gv = fn(v, index, bank)
    np.testing.assert_allclose(loss, np.full(num_devices, ref_loss), rtol=5e-6)
    scale = np.max(np.abs(ref_gv))
    np.testing.assert_allclose(np.asarray(gv) / num_devices, ref_gv, atol=5e-6 * scale)


def test_memory_losses_refuse_bad_inputs():
    z1, z2, p1, p2, support = _nnclr_inputs(4, 3, 8, seed=0)
    with pytest.raises(ValueError, match=r"support must be \[K, 3\]"):
        memory_losses.nnclr_loss(z1, z2, p1, p2, support[:, :2], TAU)
    with pytest.raises(ValueError, match=r"batch sizes differ"):
        memory_losses.nnclr_loss(z1, z2, p1[:2], p2, support, TAU)
    v, index, bank = _instdisc_inputs(4, 3, 8, seed=0)
    with pytest.raises(ValueError, match=r"index must be \[4\]"):
        memory_losses.instdisc_loss(v, index[:2], bank, TAU)
    with pytest.raises(ValueError, match=r"bank must be \[K, 3\]"):
        memory_losses.instdisc_loss(v, index, bank.T, TAU)
    with pytest.raises(ValueError, match=r"temperature must be a finite scalar > 0"):
        memory_losses.instdisc_loss(v, index, bank, -1.0)


# ----------------------------------------------------------------------------
# The methods on the train step.
# ----------------------------------------------------------------------------

QUEUE_SIZE, BATCH, NUM_EXAMPLES, BANK_M = 32, 16, 40, 0.5


def _nnclr_model(axis):
    head = dict(bn_axis_name=axis)
    return BYOLModel(
        encoder=_TinyEncoder(bn_axis_name=axis),
        projector=MLPHead(16, 8, num_layers=3, last_bn=True, last_bn_affine=True, **head),
        predictor=MLPHead(16, 8, **head),
        probe=models.LinearHead(num_classes=10),
    )


def _instdisc_model(axis):
    return ProjectorModel(
        encoder=_TinyEncoder(bn_axis_name=axis),
        projector=MLPHead(8, 8, num_layers=1),
        probe=models.LinearHead(num_classes=10),
    )


SETUPS = {
    "nnclr": (nnclr.NNCLR(temperature=TAU, queue_size=QUEUE_SIZE), _nnclr_model),
    "instdisc": (
        instdisc.InstDisc(temperature=TAU, bank_momentum=BANK_M, num_examples=NUM_EXAMPLES),
        _instdisc_model,
    ),
}


def _indexed_batch(seed):
    """methods_test's batch with 'index': distinct examples of the split, as the pipeline's."""
    batch = _batch(seed=seed, n=BATCH)
    rng = np.random.default_rng(100 + seed)
    batch["index"] = rng.permutation(NUM_EXAMPLES)[:BATCH].astype(np.int32)
    return batch


def _method_steps(name, num_devices, num_steps, parallelism="shard_map"):
    """num_steps steps of the method with SGD(0.5) on batches _indexed_batch(i).
    Returns (old state, new state, metrics) as NumPy."""
    method, build = SETUPS[name]
    tx = optax.sgd(0.5)
    state = method.create_state(build(None), tx, jax.random.key(0), (8, 8, 3))
    old = jax.device_get(state)
    batches = [_indexed_batch(i) for i in range(num_steps)]
    new, metrics = run_steps(method, build, tx, state, batches, num_devices, parallelism)
    return old, new, metrics


def _pre_step_outputs(name, old):
    """The pre-step online network's outputs of both views [2n, d] in training mode (BN over
    2n), float64, and the batch's index."""
    batch = _indexed_batch(0)
    images = np.concatenate([batch["view1"], batch["view2"]])
    variables = {"params": old.params, "batch_stats": old.batch_stats}
    outputs, _ = SETUPS[name][1](None).apply(variables, images, train=True, mutable=["batch_stats"])
    outputs = {k: np.asarray(v, np.float64) for k, v in outputs.items() if k in ("z", "p")}
    return outputs, batch["index"]


def test_nnclr_step_enqueues_view_one_projections():
    old, new, metrics = _method_steps("nnclr", 1, 1)
    assert type(new) is train_state.SupportSetTrainState
    assert set(new.params) == {"encoder", "projector", "predictor", "probe"}
    assert set(new.params["projector"]) == {"dense_0", "dense_1", "dense_2", "bn_0", "bn_1", "bn_2"}
    assert set(new.params["projector"]["bn_2"]) == {"scale", "bias"}  # an affine output BN
    outputs, _ = _pre_step_outputs("nnclr", old)
    z, p = outputs["z"], outputs["p"]
    np.testing.assert_allclose(new.queue[:BATCH], _unit(z[:BATCH]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new.queue[BATCH:], old.queue[BATCH:])
    assert int(new.queue_ptr) == BATCH and int(new.step) == 1
    # The step's loss is the float64 NNCLR loss of these outputs against the pre-step support
    # set: anchors from z1 scored against p2 and from z2 against p1 (not the other pairings).
    n, support = BATCH, np.float64(old.queue)
    want, _ = np_nnclr(z[:n], z[n:], p[:n], p[n:], support, TAU)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)
    swapped, _ = np_nnclr(z[:n], z[n:], p[n:], p[:n], support, TAU)
    assert abs(swapped - want) > 1e-2  # the pairing is visible in the value
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0


def test_instdisc_step_moves_the_bank_rows_of_the_batch():
    old, new, metrics = _method_steps("instdisc", 1, 1)
    assert type(new) is train_state.MemoryBankTrainState
    assert set(new.params) == {"encoder", "projector", "probe"}
    assert set(new.params["projector"]) == {"dense_0"}  # one Linear layer
    outputs, index = _pre_step_outputs("instdisc", old)
    z = outputs["z"]
    direction = _unit(z[:BATCH]) + _unit(z[BATCH:])
    # The step's loss: both views' rows against the pre-step bank at the batch's indices.
    want, _ = np_instdisc(z, np.concatenate([index, index]), np.float64(old.bank), TAU)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)
    shuffled, _ = np_instdisc(z, np.concatenate([index, index[::-1]]), np.float64(old.bank), TAU)
    assert abs(shuffled - want) > 1e-3  # the rows' pairing with their bank rows is visible
    expected = _numpy_bank(old.bank, [(index, direction)], BANK_M)
    np.testing.assert_allclose(new.bank, expected, rtol=1e-5, atol=1e-6)
    others = np.setdiff1d(np.arange(NUM_EXAMPLES), index)
    np.testing.assert_array_equal(new.bank[others], old.bank[others])
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0


# The 8 devices sum in another order than 1: float32 rounding, amplified over 3 SGD steps at
# LR 0.5 through NNCLR's five BN layers. Measured (Intel Xeon @ 2.80GHz): NNCLR <= 8.6e-6 on a
# parameter tensor of largest entry 0.86, 3.2e-6 on BN statistics, 2.4e-5 on the unit queue
# rows; InstDisc <= 2.5e-7 on the parameters, 3.3e-7 on the bank. Bounds (relative to each
# tensor's largest entry, plus absolute): NNCLR 5e-5 + 5e-6, InstDisc methods_test's
# 1e-5 + 1e-6; a local-batch statistic or a queue/bank in another order differs by > 1e-2.
EIGHT_VS_ONE_TOL = {"nnclr": (5e-5, 5e-6), "instdisc": (1e-5, 1e-6)}


@pytest.mark.parametrize("parallelism", ["shard_map", pytest.param("pmap", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_memory_method_steps_on_eight_devices_equal_one_device(name, parallelism):
    """Three steps (the support set of two batches wraps; the bank's rows are revisited)."""
    _, one, one_metrics = _method_steps(name, 1, 3)
    _, eight, eight_metrics = _method_steps(name, 8, 3, parallelism)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    stored = "queue" if name == "nnclr" else "bank"
    tol, atol = EIGHT_VS_ONE_TOL[name]
    for field in ("params", "batch_stats", stored):
        _assert_trees_close(getattr(eight, field), getattr(one, field), tol, atol)
    if name == "nnclr":
        assert int(eight.queue_ptr) == int(one.queue_ptr) == (3 * BATCH) % QUEUE_SIZE


def test_instdisc_needs_the_batch_index_and_the_split_size():
    with pytest.raises(ValueError, match=r"needs the training split's size.*num_examples=0"):
        instdisc.InstDisc(temperature=TAU, bank_momentum=BANK_M, num_examples=0).create_state(
            _instdisc_model(None), optax.sgd(0.1), jax.random.key(0), (8, 8, 3)
        )
    method, build = SETUPS["instdisc"]
    tx = optax.sgd(0.1)
    state = method.create_state(build(None), tx, jax.random.key(0), (8, 8, 3))
    batch = _batch(seed=0, n=4)  # no 'index'
    with pytest.raises(ValueError, match=r"InstDisc needs batch\['index'\]"):
        steps.train_step(
            state,
            batch,
            model=build(None),
            tx=tx,
            learning_rate_fn=lambda s: 0.1,
            method=method,
            axis_name=None,
            sync_batch_stats=False,
        )


def test_memory_method_config_errors_name_the_field():
    def check(module, field, value, match):
        config = module.get_config("runlocal")
        section, name = field.split(".")
        config[section][name] = value
        with pytest.raises(config_checks.ConfigError, match=match):
            methods.check_config(config)

    check(nnclr_cifar10, "method.queue_size", 100, r"method\.queue_size=100.*multiple")
    check(nnclr_cifar10, "method.temperature", 0.0, r"method\.temperature")
    check(nnclr_cifar10, "method.predictor_hidden_dim", 0, r"method\.predictor_hidden_dim")
    check(nnclr_cifar10, "train.micro_batch_size", 16, r"train\.micro_batch_size")
    check(instdisc_cifar10, "method.bank_momentum", 1.5, r"method\.bank_momentum=1\.5")
    check(instdisc_cifar10, "method.temperature", -0.1, r"method\.temperature")
    check(instdisc_cifar10, "method.projector_dim", 0, r"method\.projector_dim")
    check(instdisc_cifar10, "train.micro_batch_size", 16, r"train\.micro_batch_size")
    for module in (nnclr_cifar10, instdisc_cifar10):
        for arg in (None, "quickstart", "runlocal"):
            config = module.get_config(arg)
            methods.check_config(config)
            config_checks.validate_pretrain_config(config)
    assert methods.METHODS["nnclr"].TITLE == "NNCLR"
    assert methods.METHODS["instdisc"].TITLE == "InstDisc"


# ----------------------------------------------------------------------------
# Resume (slow): the support set and the bank are in the checkpoint.
# ----------------------------------------------------------------------------


def _tiny(name, **overrides):
    config = tiny_config(**overrides)
    module = {"nnclr": nnclr_cifar10, "instdisc": instdisc_cifar10}[name]
    config.method = module.get_config("runlocal").method
    if name == "nnclr":
        config.method.queue_size = 48  # 3 global batches of 16: 4 steps wrap it
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nnclr", "instdisc"])
def test_memory_method_resumed_run_equals_uninterrupted_bit_for_bit(name, tmp_path):
    reference = str(tmp_path / "uninterrupted")
    train.train_and_evaluate(_tiny(name), reference)
    resumed = str(tmp_path / "resumed")
    out = train.train_and_evaluate(_tiny(name, train__stop_at_step=2), resumed)
    assert out["preempted"] and checkpoint.latest_step(resumed) == 2
    at_two = restore_latest(resumed)
    train.train_and_evaluate(_tiny(name), resumed)
    got, want = restore_latest(resumed), restore_latest(reference)
    assert int(got["step"]) == 4
    stored = ("queue", "queue_ptr") if name == "nnclr" else ("bank",)
    for field in ("params", "batch_stats", "opt_state", *stored):
        jax.tree_util.tree_map(np.testing.assert_array_equal, got[field], want[field])
    # The stored vectors changed after the stop: the resumed run continued them.
    assert not np.array_equal(at_two[stored[0]], got[stored[0]])
    if name == "instdisc":  # one row per example of the runlocal split
        assert got["bank"].shape[0] == 4000
