"""Tests for simclr_jax.losses.nt_xent against a float64 NumPy reference and across devices.

The NumPy reference uses the plain [2N, 2N] formulation of the paper with an
analytic gradient; the sharded tests compare jax.shard_map and jax.pmap runs on
the 8 fake CPU devices (set up in conftest.py) with the single-device call.
"""

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from simclr_jax import losses

NUM_DEVICES = 8
AXIS = "data"


# ----------------------------------------------------------------------------
# Independent float64 reference: the paper's NT-Xent on the whole [2N, 2N] matrix.
# ----------------------------------------------------------------------------


def np_nt_xent(z1, z2, tau):
    """Paper NT-Xent (mean over 2N anchors), its gradient and metrics, in float64.

    Returns:
      (loss, grad_z1, grad_z2, metrics) with metrics as documented in nt_xent.
    """
    z = np.concatenate([z1, z2]).astype(np.float64)
    two_n = z.shape[0]
    n = two_n // 2
    norms = np.sqrt(np.sum(z * z, axis=1, keepdims=True))
    zh = z / norms
    s = zh @ zh.T / tau
    pos = (np.arange(two_n) + n) % two_n
    others = ~np.eye(two_n, dtype=bool)  # Candidates: everything but oneself.

    s_masked = np.where(others, s, -np.inf)
    row_max = s_masked.max(axis=1, keepdims=True)
    lse = row_max[:, 0] + np.log(np.sum(np.exp(s_masked - row_max), axis=1))
    per_anchor = lse - s[np.arange(two_n), pos]
    loss = per_anchor.mean()

    # dL/dS[i, k] = (softmax_i(k) - [k == pos(i)]) / 2N; S is symmetric in Z.
    prob = np.exp(s_masked - lse[:, None])
    target = np.zeros_like(prob)
    target[np.arange(two_n), pos] = 1.0
    g_s = (prob - target) / two_n
    g_zh = (g_s + g_s.T) @ zh / tau
    # Through z / |z|: (I - zh zh^T) / |z|.
    g_z = (g_zh - zh * np.sum(zh * g_zh, axis=1, keepdims=True)) / norms

    acc = np.argmax(s_masked, axis=1) == pos
    ent = -np.sum(np.where(others, prob * np.log(np.where(others, prob, 1.0)), 0.0), axis=1)
    # The "_ab" metrics: candidates are the other view's N columns only.
    other_view = (np.arange(two_n)[:, None] < n) != (np.arange(two_n)[None, :] < n)
    s_ab = np.where(other_view, s, -np.inf)
    acc_ab = np.argmax(s_ab, axis=1) == pos
    lse_ab = s_ab.max(1) + np.log(np.sum(np.exp(s_ab - s_ab.max(1, keepdims=True)), axis=1))
    prob_ab = np.exp(s_ab - lse_ab[:, None])
    log_prob_ab = np.where(other_view, s_ab - lse_ab[:, None], 0.0)
    ent_ab = -np.sum(prob_ab * log_prob_ab, axis=1)
    metrics = {
        "contrastive_acc": acc.mean(),
        "entropy": ent.mean(),
        "contrastive_acc_ab": acc_ab.mean(),
        "entropy_ab": ent_ab.mean(),
    }
    return loss, g_z[:n], g_z[n:], metrics


def make_views(n, d, seed, noise=1.0, dtype=np.float32):
    """Two correlated views (z2 = z1 + noise), so positives win only sometimes."""
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d))
    z2 = z1 + noise * rng.normal(size=(n, d))
    return z1.astype(dtype), z2.astype(dtype)


def loss_and_grads(z1, z2, **kwargs):
    """(loss, metrics), (dL/dz1, dL/dz2) of nt_xent under jit."""
    fn = jax.value_and_grad(lambda a, b: losses.nt_xent(a, b, **kwargs), (0, 1), has_aux=True)
    return jax.jit(fn)(z1, z2)


@pytest.mark.parametrize(
    "n,d,tau", [(1, 3, 0.2), (4, 8, 0.5), (16, 32, 0.1), (12, 16, 0.05), (24, 4, 1.0)]
)
def test_value_and_gradient_match_numpy(n, d, tau):
    z1, z2 = make_views(n, d, seed=n * 100 + d)
    (loss, metrics), (g1, g2) = loss_and_grads(z1, z2, temperature=tau)
    ref_loss, ref_g1, ref_g2, _ = np_nt_xent(z1, z2, tau)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g1, ref_g1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g2, ref_g2, rtol=1e-5, atol=1e-5)


def test_gradient_reference_agrees_with_finite_differences():
    """Guards the analytic NumPy gradient itself, which the other tests trust."""
    z1, z2 = make_views(3, 4, seed=7)
    z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
    _, g1, g2, _ = np_nt_xent(z1, z2, 0.3)
    eps = 1e-6
    for arr, grad in ((z1, g1), (z2, g2)):
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = np_nt_xent(z1, z2, 0.3)[0]
            arr[idx] = old - eps
            down = np_nt_xent(z1, z2, 0.3)[0]
            arr[idx] = old
            np.testing.assert_allclose((up - down) / (2 * eps), grad[idx], atol=1e-7)


@pytest.mark.parametrize("noise", [0.3, 1.5])
def test_metrics_match_numpy(noise):
    z1, z2 = make_views(32, 8, seed=3, noise=noise)
    _, metrics = losses.nt_xent(z1, z2, temperature=0.2)
    _, _, _, ref = np_nt_xent(z1, z2, 0.2)
    # Accuracies are fractions of 64 anchors: compare exactly (to float32 rounding).
    for key in ("contrastive_acc", "contrastive_acc_ab"):
        np.testing.assert_allclose(metrics[key], ref[key], atol=1e-6)
    for key in ("entropy", "entropy_ab"):
        np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-5)
    if noise == 1.5:
        # Non-trivial regime, so accuracy and entropy are actually exercised.
        assert 0.1 < ref["contrastive_acc"] < 0.9


def test_loss_scale_two_is_reference_convention():
    z1, z2 = make_views(8, 6, seed=11)
    (l1, _), (g1a, g1b) = loss_and_grads(z1, z2, temperature=0.1)
    (l2, _), (g2a, g2b) = loss_and_grads(z1, z2, temperature=0.1, loss_scale=2.0)
    # The reference: mean over N images of (loss_a + loss_b).
    ref_loss = np_nt_xent(z1, z2, 0.1)[0]
    np.testing.assert_allclose(l2, 2 * ref_loss, rtol=1e-5)
    np.testing.assert_allclose(l2, 2 * l1, rtol=1e-6)
    np.testing.assert_allclose(g2a, 2 * g1a, rtol=1e-6)
    np.testing.assert_allclose(g2b, 2 * g1b, rtol=1e-6)


def test_bfloat16_inputs_low_temperature():
    z1, z2 = make_views(16, 32, seed=5, noise=1.5)
    # Large magnitudes too: normalisation must happen in float32, not bfloat16.
    z1b = jnp.asarray(z1 * 300.0, jnp.bfloat16)
    z2b = jnp.asarray(z2 * 300.0, jnp.bfloat16)
    (loss, metrics), (g1, g2) = loss_and_grads(z1b, z2b, temperature=0.05)
    (loss2, _), (g1_2, g2_2) = loss_and_grads(z1b, z2b, temperature=0.05, loss_scale=2.0)
    assert loss.dtype == jnp.float32 and g1.dtype == jnp.bfloat16
    assert np.isfinite(loss) and np.all(np.isfinite(np.asarray(g1, np.float32)))
    assert np.all(np.isfinite(np.asarray(g2, np.float32)))
    assert all(np.isfinite(v) for v in metrics.values())
    # Computed in float32 from the bfloat16 values: equals the float64 reference on them.
    ref_loss = np_nt_xent(np.asarray(z1b, np.float64), np.asarray(z2b, np.float64), 0.05)[0]
    assert ref_loss > 0.1  # Not the trivial regime where every positive wins outright.
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss2, 2 * loss, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g1_2, np.float32), 2 * np.asarray(g1, np.float32))
    np.testing.assert_array_equal(np.asarray(g2_2, np.float32), 2 * np.asarray(g2, np.float32))


def test_zero_projection_is_finite():
    z1, z2 = make_views(4, 5, seed=2)
    z1[1] = 0.0
    (loss, _), (g1, g2) = loss_and_grads(z1, z2, temperature=0.05)
    assert np.isfinite(loss) and np.all(np.isfinite(g1)) and np.all(np.isfinite(g2))


@pytest.mark.parametrize(
    "kwargs,z_shapes,match",
    [
        ({"temperature": 0.0}, ((4, 3), (4, 3)), r"temperature.*> 0.*got 0\.0"),
        ({"temperature": -0.1}, ((4, 3), (4, 3)), r"temperature.*> 0.*got -0\.1"),
        ({"temperature": float("nan")}, ((4, 3), (4, 3)), r"temperature.*nan"),
        ({"temperature": 0.1, "loss_scale": 0.0}, ((4, 3), (4, 3)), r"loss_scale.*0\.0"),
        ({"temperature": 0.1}, ((4, 3), (5, 3)), r"z1 and z2.*\(4, 3\).*\(5, 3\)"),
        ({"temperature": 0.1}, ((4, 3, 2), (4, 3, 2)), r"z1 must be 2-D.*\(4, 3, 2\)"),
        ({"temperature": 0.1}, ((4, 3), (12,)), r"z2 must be 2-D.*\(12,\)"),
    ],
)
def test_bad_input_raises(kwargs, z_shapes, match):
    z1, z2 = (np.ones(s, np.float32) for s in z_shapes)
    with pytest.raises(ValueError, match=match):
        losses.nt_xent(z1, z2, **kwargs)


# ----------------------------------------------------------------------------
# Across devices.
# ----------------------------------------------------------------------------

N_LOCAL, DIM, TAU = 2, 8, 0.1
N_GLOBAL = N_LOCAL * NUM_DEVICES


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == NUM_DEVICES, "conftest.py should provide 8 CPU devices"
    return Mesh(np.array(jax.devices()), (AXIS,))


@pytest.fixture(scope="module")
def global_views():
    return make_views(N_GLOBAL, DIM, seed=21, noise=1.0)


def _per_device_value_and_grads(a, b):
    """The per-device program: the loss, its metrics and its gradient w.r.t. local z."""
    fn = functools.partial(losses.nt_xent, temperature=TAU, axis_name=AXIS)
    (loss, metrics), grads = jax.value_and_grad(fn, (0, 1), has_aux=True)(a, b)
    return loss, metrics, grads


def _sharded_run(mesh, z1, z2, check_vma):
    def body(a, b):
        loss, metrics, (ga, gb) = _per_device_value_and_grads(a, b)
        if not check_vma:
            # Without vma typing shard_map cannot tell that metrics are invariant.
            metrics = jax.tree.map(lambda x: x[None], metrics)
        return loss[None], metrics, ga, gb

    metrics_spec = P() if check_vma else P(AXIS)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(AXIS), P(AXIS)),
        out_specs=(P(AXIS), metrics_spec, P(AXIS), P(AXIS)),
        check_vma=check_vma,
    )
    return jax.jit(fn)(z1, z2)


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_matches_single_device(mesh, global_views, check_vma):
    z1, z2 = global_views
    (ref_loss, ref_metrics), (ref_g1, ref_g2) = loss_and_grads(z1, z2, temperature=TAU)
    losses_per_device, metrics, g1, g2 = _sharded_run(mesh, z1, z2, check_vma)
    # Every device reports the global loss value.
    np.testing.assert_allclose(losses_per_device, np.full(NUM_DEVICES, ref_loss), rtol=1e-5)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(np.asarray(metrics[key]).ravel(), value, rtol=1e-5, atol=1e-6)
    # Documented convention: the gradient w.r.t. a device's z is D x dL_global/dz,
    # because the all_gather transpose sums what every device's rows send back.
    np.testing.assert_allclose(np.asarray(g1) / NUM_DEVICES, ref_g1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g2) / NUM_DEVICES, ref_g2, rtol=1e-5, atol=1e-6)
    # And the global value is the paper's, from the float64 reference.
    np.testing.assert_allclose(ref_loss, np_nt_xent(z1, z2, TAU)[0], rtol=1e-5)


def test_pmap_matches_single_device(global_views):
    z1, z2 = global_views
    (ref_loss, ref_metrics), (ref_g1, ref_g2) = loss_and_grads(z1, z2, temperature=TAU)
    shape = (NUM_DEVICES, N_LOCAL, DIM)
    loss, metrics, (g1, g2) = jax.pmap(_per_device_value_and_grads, axis_name=AXIS)(
        z1.reshape(shape), z2.reshape(shape)
    )
    np.testing.assert_allclose(loss, np.full(NUM_DEVICES, ref_loss), rtol=1e-5)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[key], np.full(NUM_DEVICES, value), rtol=1e-5, atol=1e-6)
    g1 = np.asarray(g1).reshape(N_GLOBAL, DIM) / NUM_DEVICES
    g2 = np.asarray(g2).reshape(N_GLOBAL, DIM) / NUM_DEVICES
    np.testing.assert_allclose(g1, ref_g1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g2, ref_g2, rtol=1e-5, atol=1e-6)


def test_parameter_gradients_pmean_psum_semantics(mesh):
    """How the trainer turns per-device parameter gradients into the global one.

    z = x @ W with W replicated: pmap / shard_map(check_vma=False) need a pmean
    of the per-device gradients; shard_map(check_vma=True) psums by itself when
    transposing W's implicit broadcast, so its gradient is D x the global one.
    """
    rng = np.random.default_rng(4)
    x1 = rng.normal(size=(N_GLOBAL, 5)).astype(np.float32)
    x2 = (x1 + rng.normal(size=x1.shape)).astype(np.float32)
    w = rng.normal(size=(5, DIM)).astype(np.float32)

    def loss_fn(w, a, b, axis_name):
        return losses.nt_xent(a @ w, b @ w, temperature=TAU, axis_name=axis_name)[0]

    ref = jax.grad(loss_fn)(w, x1, x2, None)

    grad_fn = functools.partial(jax.grad(loss_fn), axis_name=AXIS)
    pmapped = jax.pmap(
        lambda w, a, b: jax.lax.pmean(grad_fn(w, a, b), AXIS), AXIS, in_axes=(None, 0, 0)
    )(w, x1.reshape(NUM_DEVICES, N_LOCAL, 5), x2.reshape(NUM_DEVICES, N_LOCAL, 5))
    np.testing.assert_allclose(pmapped[0], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pmapped[-1], ref, rtol=1e-5, atol=1e-6)

    specs = (P(), P(AXIS), P(AXIS))
    no_vma = jax.jit(
        jax.shard_map(
            lambda w, a, b: jax.lax.pmean(grad_fn(w, a, b), AXIS)[None],
            mesh=mesh,
            in_specs=specs,
            out_specs=P(AXIS),
            check_vma=False,
        )
    )(w, x1, x2)
    np.testing.assert_allclose(np.asarray(no_vma)[3], ref, rtol=1e-5, atol=1e-6)

    with_vma = jax.jit(
        jax.shard_map(grad_fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)
    )(w, x1, x2)
    np.testing.assert_allclose(np.asarray(with_vma) / NUM_DEVICES, ref, rtol=1e-5, atol=1e-6)


def test_negatives_are_gathered_across_devices(mesh, global_views):
    """A loss over per-device negatives only would differ; the sharded one must not."""
    z1, z2 = global_views
    global_loss = np_nt_xent(z1, z2, TAU)[0]
    per_device_only = np.mean(
        [
            np_nt_xent(z1[i : i + N_LOCAL], z2[i : i + N_LOCAL], TAU)[0]
            for i in range(0, N_GLOBAL, N_LOCAL)
        ]
    )
    # 3 candidates per anchor instead of 31: a much smaller loss.
    assert global_loss - per_device_only > 0.5
    sharded_loss = _sharded_run(mesh, z1, z2, check_vma=True)[0]
    np.testing.assert_allclose(sharded_loss, np.full(NUM_DEVICES, global_loss), rtol=1e-5)


def _max_intermediate_size(jaxpr):
    """Largest number of elements of any value produced in a jaxpr, sub-jaxprs included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jex.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jex.core.Jaxpr):
                    biggest = max(biggest, _max_intermediate_size(sub))
    return biggest


def test_per_device_memory_is_rows_times_global_batch(mesh, global_views):
    """Forward and backward never build the [2N, 2N] matrix, only [n, 2N] blocks."""
    z1, z2 = global_views
    fn = jax.shard_map(
        lambda a, b: _per_device_value_and_grads(a, b)[2],
        mesh=mesh,
        in_specs=(P(AXIS), P(AXIS)),
        out_specs=(P(AXIS), P(AXIS)),
    )
    inner = jax.make_jaxpr(fn)(z1, z2).jaxpr.eqns[0].params["jaxpr"]
    biggest = _max_intermediate_size(getattr(inner, "jaxpr", inner))
    # The gathered projections [N, d] or the logits block [n, 2N], whichever is larger.
    assert biggest <= max(N_LOCAL * 2 * N_GLOBAL, N_GLOBAL * DIM), biggest
    assert biggest < (2 * N_GLOBAL) ** 2
