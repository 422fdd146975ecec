"""Micro-batched (gradient-caching) SimCLR step against the plain full-batch step.

The reference for "exact" is the ordinary step on the whole batch: with BN in
inference mode the micro-batched step must give the same loss, gradients (read
off an SGD update with learning rate 1) and probe metrics, on one device and on
8 devices. With BN in training mode the documented behaviour is checked
against a reference built by hand: each micro-batch normalised on its own
(over every device with global BN), NT-Xent in NumPy over the whole batch, and
running statistics averaged over the micro-batch updates.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from losses_test import np_nt_xent

from configs import cifar10
from simclr_jax import models, sharding, steps

BATCH = 16  # global examples
IMAGE = 16  # pixels
TAU = 0.5
LOSS_SCALE = 2.0


class _SmallEncoder(nn.Module):
    """Two conv + BN + ReLU layers: the step logic at a fraction of ResNet's compile time."""

    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        for i, features in enumerate((8, 16)):
            x = nn.Conv(features, (3, 3), strides=2, use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                axis_name=self.bn_axis_name,
                use_fast_variance=False,
                name=f"bn{i}",
            )(x)
            x = nn.relu(x)
        return jnp.mean(x, axis=(1, 2))


def _model(bn_axis_name, resnet=False):
    config = cifar10.get_config("runlocal").model
    config.base_width = 4
    config.head_hidden_dim = 16
    config.head_dim = 16
    model = models.build_model(config, num_classes=10, bn_axis_name=bn_axis_name)
    if resnet:
        return model
    return model.clone(encoder=_SmallEncoder(bn_axis_name=bn_axis_name))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    # A colour per image plus noise per view: images differ clearly (i.i.d. noise
    # images all pool to nearly the same features, and the loss goes flat).
    colour = rng.uniform(size=(BATCH, 1, 1, 3))
    noise = rng.normal(size=(2, BATCH, IMAGE, IMAGE, 3))
    return {
        "view1": (colour + 0.3 * noise[0]).astype(np.float32),
        "view2": (colour + 0.3 * noise[1]).astype(np.float32),
        "label": rng.integers(0, 10, size=BATCH).astype(np.int32),
    }


def _state(model, tx, stats_model):
    state = steps.create_train_state(model, tx, jax.random.key(1), (IMAGE, IMAGE, 3))
    # Realistic running statistics for inference-mode BN: the batch statistics
    # of another batch. BN keeps momentum * old + (1 - momentum) * batch, so
    # starting from zeros and dividing by 1 - momentum gives them exactly.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.batch_stats)
    other = _batch(99)
    images = np.concatenate([other["view1"], other["view2"]])
    _, new_vars = stats_model.apply(
        {"params": state.params, "batch_stats": zeros}, images, train=True, mutable=["batch_stats"]
    )
    stats = jax.tree_util.tree_map(lambda x: x / 0.1, new_vars["batch_stats"])
    return state.replace(batch_stats=stats)


def _run(num_devices, micro_per_device, freeze_bn, batch, resnet=False):
    """One step with SGD(lr=1): returns (new state, metrics, old state) as NumPy."""
    axis = sharding.DATA_AXIS if num_devices > 1 else None
    model = _model(axis, resnet)
    tx = optax.sgd(1.0)
    state = _state(model, tx, _model(None, resnet))
    old_state = jax.device_get(state)  # the step donates `state`
    step = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        learning_rate_fn=lambda s: jnp.float32(1.0),
        temperature=TAU,
        loss_scale=LOSS_SCALE,
        axis_name=axis,
        sync_batch_stats=False,
        micro_batch_per_device=micro_per_device,
        freeze_bn=freeze_bn,
    )
    if num_devices == 1:
        new_state, metrics = jax.jit(step)(state, batch)
    else:
        mesh = sharding.create_mesh(jax.devices()[:num_devices])
        fn = steps.compile_train_step(step, parallelism="shard_map", mesh=mesh)
        new_state, metrics = fn(state, sharding.make_global_batch(batch, mesh))
    return jax.device_get(new_state), jax.device_get(metrics.compute()), old_state


def _grads(new_state, old_state):
    # SGD with lr 1: params_new = params_old - grad.
    return jax.tree_util.tree_map(lambda a, b: b - a, new_state.params, old_state.params)


def _assert_trees_close(a, b, scale_tol, atol=1e-7):
    """Every leaf: max |a - b| <= scale_tol * max |b| + atol.

    Relative to the leaf's largest entry rather than entry by entry: float32
    sums in a different order leave an absolute error proportional to the
    magnitudes being summed, which small entries of a large-gradient tensor
    would otherwise fail on.
    """
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        error = np.abs(x - y).max()
        bound = scale_tol * np.abs(y).max() + atol
        assert error <= bound, f"{jax.tree_util.keystr(path)}: max error {error:.3g} > {bound:.3g}"


# Tolerances: the micro-batched step sums k partial gradients in float32, its
# forward passes are compiled differently from the full step's and 8 devices
# reduce in another order, so results agree to float32 rounding: observed
# errors are <= 2e-6 of each tensor's largest entry.
RTOL, TREE_TOL = 1e-5, 2e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_devices,micro_per_device,resnet",
    # The small encoder keeps compiling cheap; a ResNet-18 micro-batched run is
    # compared with its full-batch run through the trainer in train_test.py.
    [(1, 4, False), (1, 8, False), (8, 1, False)],
)
def test_micro_batched_step_equals_full_batch_with_frozen_bn(num_devices, micro_per_device, resnet):
    ref_state, ref_metrics, old = _run(1, None, True, _batch(), resnet)
    state, metrics, _ = _run(num_devices, micro_per_device, True, _batch(), resnet)
    for key in ("loss", "contrastive_acc", "entropy", "probe_loss", "probe_top1", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=RTOL, atol=1e-6)
    _assert_trees_close(_grads(state, old), _grads(ref_state, old), TREE_TOL)
    # Frozen BN: running statistics are untouched.
    _assert_trees_close(state.batch_stats, old.batch_stats, 0, 0)
    # The contrastive gradient reaches the encoder (were it zero, the comparison
    # would prove nothing).
    assert optax.tree.norm(_grads(ref_state, old)["encoder"]) > 1e-2


@pytest.mark.slow
def test_micro_batched_eight_devices_equals_full_eight_devices_frozen_bn():
    full, full_metrics, old = _run(8, None, True, _batch(3))
    micro, micro_metrics, _ = _run(8, 1, True, _batch(3))
    np.testing.assert_allclose(micro_metrics["loss"], full_metrics["loss"], rtol=RTOL)
    _assert_trees_close(_grads(micro, old), _grads(full, old), TREE_TOL)


def _nt_xent_numpy(z1, z2, tau):
    """The float64 NT-Xent reference of losses_test (loss only)."""
    return np_nt_xent(z1, z2, tau)[0]


@pytest.mark.slow
def test_bn_runs_per_micro_batch_and_running_stats_average_the_updates():
    """Documented BN behaviour in training mode, checked against a by-hand reference."""
    batch = _batch(5)
    k, m = 2, BATCH // 2
    new_state, metrics, old = _run(1, m, False, batch)

    model = _model(None)
    variables = {"params": old.params, "batch_stats": old.batch_stats}
    zs, stats = [], []
    for i in range(k):
        rows = slice(i * m, (i + 1) * m)
        images = np.concatenate([batch["view1"][rows], batch["view2"][rows]])
        out, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"])
        zs.append(np.asarray(out["z"]))
        stats.append(new_vars["batch_stats"])
    z1 = np.concatenate([z[:m] for z in zs])
    z2 = np.concatenate([z[m:] for z in zs])
    np.testing.assert_allclose(metrics["loss"], _nt_xent_numpy(z1, z2, TAU), rtol=1e-5)
    expected_stats = jax.tree_util.tree_map(lambda *s: np.mean(s, axis=0), *stats)
    _assert_trees_close(new_state.batch_stats, expected_stats, 1e-5)

    # ... which is not full-batch BN: the full-batch step's loss differs.
    _, full_metrics, _ = _run(1, None, False, batch)
    assert abs(float(full_metrics["loss"]) - float(metrics["loss"])) > 1e-4


@pytest.mark.slow
def test_with_global_bn_a_micro_batch_spans_every_device():
    """8 devices x 1 example per micro-batch == 1 device with micro-batches of 8.

    On 8 devices (2 examples each) micro-batch i holds example i of every device:
    global rows {2d + i}. Reordering the batch so those rows are consecutive
    gives the same micro-batches on one device; NT-Xent does not depend on the
    order of the images, so loss and gradients must match.
    """
    batch = _batch(7)
    eight, eight_metrics, old = _run(8, 1, False, batch)
    order = np.array([2 * d + i for i in range(2) for d in range(8)])
    permuted = {key: value[order] for key, value in batch.items()}
    one, one_metrics, _ = _run(1, 8, False, permuted)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=RTOL)
    _assert_trees_close(_grads(eight, old), _grads(one, old), TREE_TOL)
    _assert_trees_close(eight.batch_stats, one.batch_stats, TREE_TOL)


def test_micro_batch_must_divide_the_device_batch():
    with pytest.raises(ValueError, match="micro_batch_per_device=3"):
        _run(1, 3, True, _batch())
