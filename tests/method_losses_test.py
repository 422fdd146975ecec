"""Tests for simclr_jax.method_losses against float64 NumPy references and across devices.

The references below are written from the papers' equations in the official code's form
(see docs/method_losses.md), independently of the JAX code: whole [d, d] matrices, np.cov,
np.var, an explicit logsumexp; their gradients come from central finite differences in
float64. The sharded tests run jax.shard_map (and jax.pmap) over the 8 fake CPU devices
of conftest.py and compare with one device on the global batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from losses_test import _max_intermediate_size  # the largest value a jaxpr produces

from simclr_jax import method_losses

NUM_DEVICES = 8
AXIS = "data"
TAU = 0.2
LAMBD = 0.05  # Larger than the official 0.0051 so the off-diagonal term weighs in the tests.

# ----------------------------------------------------------------------------
# Independent float64 references.
# ----------------------------------------------------------------------------


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_byol(p1, p2, t1, t2):
    """Grill et al. eq. 2, both orderings, mean over the batch."""
    term_12 = np.sum((_unit(p1) - _unit(t2)) ** 2, axis=1)
    term_21 = np.sum((_unit(p2) - _unit(t1)) ** 2, axis=1)
    cosine = (
        np.mean(np.sum(_unit(p1) * _unit(t2), 1)) + np.mean(np.sum(_unit(p2) * _unit(t1), 1))
    ) / 2
    return np.mean(term_12 + term_21), {"cosine": cosine}


def _ctr(q, k, tau):
    """MoCo v3 Algorithm 1: 2 tau CE(q k^T / tau, arange(N)), and the top-1 hits."""
    logits = _unit(q) @ _unit(k).T / tau
    top = logits.max(axis=1, keepdims=True)
    log_prob = logits - (top + np.log(np.sum(np.exp(logits - top), axis=1, keepdims=True)))
    idx = np.arange(len(q))
    return 2 * tau * -np.mean(log_prob[idx, idx]), np.mean(np.argmax(logits, 1) == idx)


def np_moco_v3(q1, q2, k1, k2, tau):
    loss_12, acc_12 = _ctr(q1, k2, tau)
    loss_21, acc_21 = _ctr(q2, k1, tau)
    return loss_12 + loss_21, {"contrastive_acc": (acc_12 + acc_21) / 2}


def np_barlow_twins(z1, z2, lambd):
    """Eq. 1 with C from the official code's non-affine BN (biased variance, eps 1e-5)."""
    n, d = z1.shape
    z1n = (z1 - z1.mean(0)) / np.sqrt(np.var(z1, axis=0) + 1e-5)
    z2n = (z2 - z2.mean(0)) / np.sqrt(np.var(z2, axis=0) + 1e-5)
    c = z1n.T @ z2n / n
    eye = np.eye(d)
    on_diag = np.sum((np.diag(c) - 1) ** 2)
    off_diag = np.sum((c * (1 - eye)) ** 2)
    metrics = {"on_diag": on_diag, "off_diag": off_diag, "mean_diag": np.mean(np.diag(c))}
    return on_diag + lambd * off_diag, metrics


def np_vicreg(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """The official main_vicreg.py form: mse, unbiased std with eps 1e-4 halved, cov / d."""
    d = z1.shape[1]
    invariance = np.mean((z1 - z2) ** 2)
    std1 = np.sqrt(np.var(z1, axis=0, ddof=1) + 1e-4)
    std2 = np.sqrt(np.var(z2, axis=0, ddof=1) + 1e-4)
    variance = np.mean(np.maximum(0, 1 - std1)) / 2 + np.mean(np.maximum(0, 1 - std2)) / 2
    off = 1 - np.eye(d)
    cov1 = np.cov(z1, rowvar=False)  # ddof 1.
    cov2 = np.cov(z2, rowvar=False)
    covariance = np.sum((cov1 * off) ** 2) / d + np.sum((cov2 * off) ** 2) / d
    metrics = {
        "invariance": invariance,
        "variance": variance,
        "covariance": covariance,
        "std": (std1.mean() + std2.mean()) / 2,
    }
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance, metrics


def finite_difference_grads(fn, arrays, eps=1e-6):
    """Central differences of the float64 scalar fn(*arrays) w.r.t. every array."""
    arrays = [np.array(a, np.float64) for a in arrays]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            up = fn(*arrays)
            a[idx] = old - eps
            down = fn(*arrays)
            a[idx] = old
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


# ----------------------------------------------------------------------------
# The four losses in one table: JAX function, reference, inputs, which inputs are online.
# ----------------------------------------------------------------------------


def make_inputs(name, n, d, seed):
    """Float32 inputs: correlated views; VICReg's feature stds straddle 1 (both relu sides)."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.3, 2.0, d) if name == "vicreg" else np.ones(d)
    base = rng.normal(size=(n, d)) * scale

    def view():
        return (base + 0.7 * rng.normal(size=(n, d)) * scale).astype(np.float32)

    count = 4 if name in ("byol", "moco_v3") else 2
    return [view() for _ in range(count)]


CASES = {
    # name: (JAX loss(*inputs, axis_name), NumPy reference(*inputs), number of online inputs)
    "byol": (method_losses.byol_loss, np_byol, 2),
    "moco_v3": (
        functools.partial(method_losses.moco_v3_loss, temperature=TAU),
        functools.partial(np_moco_v3, tau=TAU),
        2,
    ),
    "barlow_twins": (
        functools.partial(method_losses.barlow_twins_loss, lambd=LAMBD),
        functools.partial(np_barlow_twins, lambd=LAMBD),
        2,
    ),
    "vicreg": (method_losses.vicreg_loss, np_vicreg, 2),
}


def value_and_grads(loss_fn, inputs, axis_name=None):
    """(loss, metrics), gradients w.r.t. every input (targets/keys included)."""
    fn = functools.partial(loss_fn, axis_name=axis_name)
    argnums = tuple(range(len(inputs)))
    return jax.value_and_grad(fn, argnums, has_aux=True)(*inputs)


def jit_value_and_grads(loss_fn, inputs):
    """value_and_grads on one device, compiled: one compilation instead of one per op."""
    return jax.jit(functools.partial(value_and_grads, loss_fn))(list(inputs))


@pytest.mark.parametrize("name", list(CASES))
def test_value_metrics_and_gradient_match_numpy(name):
    loss_fn, ref_fn, num_online = CASES[name]
    inputs = make_inputs(name, n=6, d=5, seed=len(name))
    (loss, metrics), grads = jit_value_and_grads(loss_fn, inputs)
    ref_loss, ref_metrics = ref_fn(*[x.astype(np.float64) for x in inputs])
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    assert set(metrics) == set(ref_metrics) | {"loss"}
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # Gradient w.r.t. the online inputs: float32 autodiff vs float64 finite differences.
    # Measured (CPU): at most 3.9e-7 of the largest entry (moco_v3; entries up to 6.9 for
    # vicreg); the tolerance, 1e-5 of the largest entry, leaves 25x. Values: <= 1.1e-7.
    rest = [x.astype(np.float64) for x in inputs[num_online:]]
    fd = finite_difference_grads(lambda *a: ref_fn(*a, *rest)[0], inputs[:num_online])
    for got, want in zip(grads[:num_online], fd, strict=True):
        scale = np.max(np.abs(want))
        assert scale > 1e-3  # A gradient that is not trivially zero.
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", ["byol", "moco_v3"])
def test_target_and_key_gradients_are_exactly_zero(name):
    loss_fn, _, num_online = CASES[name]
    inputs = make_inputs(name, n=6, d=5, seed=3)
    _, grads = jit_value_and_grads(loss_fn, inputs)
    for g in grads[num_online:]:
        np.testing.assert_array_equal(g, np.zeros_like(g))
    # Even when the caller differentiates through the targets' producer.
    w = jnp.eye(5)

    def through_targets(w):
        args = inputs[:num_online] + [x @ w for x in inputs[num_online:]]
        return loss_fn(*args)[0]

    np.testing.assert_array_equal(jax.grad(through_targets)(w), np.zeros((5, 5)))


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_inputs_are_computed_in_float32(name):
    loss_fn, ref_fn, num_online = CASES[name]
    inputs = [jnp.asarray(x, jnp.bfloat16) for x in make_inputs(name, n=8, d=6, seed=9)]
    (loss, _), grads = jit_value_and_grads(loss_fn, inputs)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    # The bfloat16 values, taken exactly, through float32 arithmetic: the float64 reference.
    ref_loss, _ = ref_fn(*[np.asarray(x, np.float64) for x in inputs])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_vicreg_coefficients_weigh_the_three_terms():
    z1, z2 = make_inputs("vicreg", n=8, d=6, seed=5)
    _, m = jax.jit(method_losses.vicreg_loss)(z1, z2)
    weighted = functools.partial(
        method_losses.vicreg_loss, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5
    )
    loss, _ = jax.jit(weighted)(z1, z2)
    expected = 2.0 * m["invariance"] + 3.0 * m["variance"] + 0.5 * m["covariance"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert m["variance"] > 0.01  # Some features have std < 1: the hinge is active.


def _bad(shape_a, shape_b):
    return np.ones(shape_a, np.float32), np.ones(shape_b, np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: method_losses.byol_loss(*_bad((4, 3), (4, 3)), *_bad((5, 3), (5, 3))),
         r"batch sizes differ.*p1 \(4, 3\).*z1_target \(5, 3\)"),
        (lambda: method_losses.byol_loss(*_bad((4, 3), (4, 3)), *_bad((4, 3), (4, 2))),
         r"feature dimensions differ.*z2_target \(4, 2\)"),
        (lambda: method_losses.moco_v3_loss(*_bad((4, 3, 1), (4, 3)), *_bad((4, 3), (4, 3)), 0.2),
         r"q1 must be 2-D.*\(4, 3, 1\)"),
        (lambda: method_losses.moco_v3_loss(*_bad((4, 3), (4, 3)), *_bad((4, 3), (2, 3)), 0.2),
         r"batch sizes differ.*k2 \(2, 3\)"),
        (lambda: method_losses.moco_v3_loss(*_bad((4, 3), (4, 3)), *_bad((4, 3), (4, 3)), 0.0),
         r"temperature must be a finite scalar > 0; got 0\.0"),
        (lambda: method_losses.barlow_twins_loss(*_bad((4, 3), (3, 3)), 5e-3),
         r"batch sizes differ.*z1 \(4, 3\), z2 \(3, 3\)"),
        (lambda: method_losses.barlow_twins_loss(*_bad((12,), (12,)), 5e-3),
         r"z1 must be 2-D.*\(12,\)"),
        (lambda: method_losses.barlow_twins_loss(*_bad((4, 3), (4, 3)), -1.0),
         r"lambd must be a finite scalar >= 0; got -1\.0"),
        (lambda: method_losses.vicreg_loss(*_bad((4, 3), (4, 4))),
         r"feature dimensions differ.*z1 \(4, 3\), z2 \(4, 4\)"),
        (lambda: method_losses.vicreg_loss(*_bad((0, 3), (0, 3))),
         r"at least one row"),
        (lambda: method_losses.vicreg_loss(*_bad((1, 3), (1, 3))),
         r"global batch of at least 2 rows.*got 1"),
        (lambda: method_losses.vicreg_loss(*_bad((4, 3), (4, 3)), cov_coeff=float("nan")),
         r"cov_coeff must be a finite scalar >= 0; got nan"),
    ],
)  # fmt: skip
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------
# Across devices: global statistics and candidates, gradients by the module's convention.
# ----------------------------------------------------------------------------

N_LOCAL = 3
N_GLOBAL = N_LOCAL * NUM_DEVICES
DIM = 12  # Not a multiple of 8: the last device's block of feature rows is padded.


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == NUM_DEVICES, "conftest.py should provide 8 CPU devices"
    return Mesh(np.array(jax.devices()), (AXIS,))


def _sharded(mesh, loss_fn, inputs, check_vma):
    def body(*local):
        (loss, metrics), grads = value_and_grads(loss_fn, list(local), axis_name=AXIS)
        if not check_vma:  # Without vma typing shard_map cannot tell metrics are invariant.
            metrics = jax.tree.map(lambda x: x[None], metrics)
        return loss[None], metrics, grads

    specs = tuple(P(AXIS) for _ in inputs)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=specs,
        out_specs=(P(AXIS), P() if check_vma else P(AXIS), specs),
        check_vma=check_vma,
    )
    return jax.jit(fn)(*inputs)


def _assert_matches_single_device(loss, metrics, grads, inputs, loss_fn):
    (ref_loss, ref_metrics), ref_grads = jit_value_and_grads(loss_fn, inputs)
    # Measured (float32 on CPU, 8 devices vs 1): loss and metrics within 4.0e-7 relative
    # (vicreg), gradients within 1.4e-7 of their largest entry; tolerances 5e-6 (12x, 35x).
    np.testing.assert_allclose(loss, np.full(NUM_DEVICES, ref_loss), rtol=5e-6)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(np.ravel(metrics[key]), value, rtol=5e-6, atol=1e-7, err_msg=key)
    for got, want in zip(grads, ref_grads, strict=True):
        # The convention of losses.nt_xent: a device's input gradient is D x the global one.
        scale = max(np.max(np.abs(want)), 1e-30)
        np.testing.assert_allclose(np.asarray(got) / NUM_DEVICES, want, atol=5e-6 * scale)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_shard_map_matches_single_device_on_the_global_batch(mesh, name, check_vma):
    loss_fn, ref_fn, num_online = CASES[name]
    inputs = make_inputs(name, N_GLOBAL, DIM, seed=40 + len(name))
    loss, metrics, grads = _sharded(mesh, loss_fn, inputs, check_vma)
    _assert_matches_single_device(loss, metrics, grads, inputs, loss_fn)
    # ... which is the float64 reference's global value.
    np.testing.assert_allclose(
        loss[0], ref_fn(*[x.astype(np.float64) for x in inputs])[0], rtol=1e-5
    )
    for g in grads[num_online:]:
        np.testing.assert_array_equal(g, np.zeros_like(g))


@pytest.mark.parametrize("name", list(CASES))
def test_pmap_matches_single_device_on_the_global_batch(name):
    loss_fn, _, _ = CASES[name]
    inputs = make_inputs(name, N_GLOBAL, DIM, seed=60 + len(name))
    per_device = [x.reshape(NUM_DEVICES, N_LOCAL, DIM) for x in inputs]
    fn = jax.pmap(lambda *a: value_and_grads(loss_fn, list(a), axis_name=AXIS), AXIS)
    (loss, metrics), grads = fn(*per_device)
    grads = [np.asarray(g).reshape(N_GLOBAL, DIM) for g in grads]
    _assert_matches_single_device(loss, metrics, grads, inputs, loss_fn)


@pytest.mark.parametrize("name", ["moco_v3", "barlow_twins", "vicreg"])
def test_per_device_statistics_would_give_another_loss(name):
    """The parity test above has teeth: per-device statistics or candidates change the value."""
    _, ref_fn, _ = CASES[name]
    inputs = [x.astype(np.float64) for x in make_inputs(name, N_GLOBAL, DIM, seed=40 + len(name))]
    global_loss = ref_fn(*inputs)[0]
    local_losses = [
        ref_fn(*[x[i : i + N_LOCAL] for x in inputs])[0] for i in range(0, N_GLOBAL, N_LOCAL)
    ]
    # 3-row batches: far fewer candidates, far noisier statistics (relative gap > 10%).
    assert abs(np.mean(local_losses) - global_loss) > 0.1 * abs(global_loss)


def test_parameter_gradient_pmean_is_the_global_gradient(mesh):
    """How the trainer combines per-device gradients (steps.py: pmean, check_vma=False)."""
    rng = np.random.default_rng(8)
    x1 = rng.normal(size=(N_GLOBAL, 5)).astype(np.float32)
    x2 = (x1 + rng.normal(size=x1.shape)).astype(np.float32)
    w = rng.normal(size=(5, DIM)).astype(np.float32)

    def loss_fn(w, a, b, axis_name):
        return method_losses.vicreg_loss(a @ w, b @ w, axis_name=axis_name)[0]

    want = jax.jit(jax.grad(loss_fn), static_argnums=3)(w, x1, x2, None)
    grad_fn = functools.partial(jax.grad(loss_fn), axis_name=AXIS)
    got = jax.jit(
        jax.shard_map(
            lambda w, a, b: jax.lax.pmean(grad_fn(w, a, b), AXIS)[None],
            mesh=mesh,
            in_specs=(P(), P(AXIS), P(AXIS)),
            out_specs=P(AXIS),
            check_vma=False,
        )
    )(w, x1, x2)
    np.testing.assert_allclose(np.asarray(got)[5], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_no_device_builds_the_whole_feature_matrix(mesh, name):
    """Forward and backward hold the gathered [N, d] views and [d / D, d] blocks, never [d, d]."""
    loss_fn, _, _ = CASES[name]
    dim = 64  # N * d = 1536 < d * d = 4096, so a [d, d] value would be the largest.
    inputs = make_inputs(name, N_GLOBAL, dim, seed=1)
    fn = jax.shard_map(
        lambda *a: value_and_grads(loss_fn, list(a), axis_name=AXIS)[1],
        mesh=mesh,
        in_specs=(P(AXIS), P(AXIS)),
        out_specs=(P(AXIS), P(AXIS)),
    )
    inner = jax.make_jaxpr(fn)(*inputs).jaxpr.eqns[0].params["jaxpr"]
    biggest = _max_intermediate_size(getattr(inner, "jaxpr", inner))
    assert biggest == N_GLOBAL * dim, biggest
