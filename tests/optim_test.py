"""Tests for simclr_jax.optim: LARS against a NumPy update, masks, schedules, config errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from simclr_jax import optim

# ----------------------------------------------------------------------------
# LARS against NumPy.
# ----------------------------------------------------------------------------

# The leaves of the test tree, by path, with the flags the reference would use.
# (shape, gets weight decay, gets trust ratio) under the "exclude the probe from
# both" rule of lars_exclusion_mask.
LEAVES = {
    ("encoder", "conv", "kernel"): ((3, 3, 2, 4), True, True),
    ("encoder", "bn", "scale"): ((4,), False, False),
    ("encoder", "bn", "bias"): ((4,), False, False),
    ("head", "dense", "kernel"): ((4, 3), True, True),
    ("probe", "kernel"): ((4, 5), False, False),
    ("probe", "bias"): ((5,), False, False),
}
LRS = (0.5, 0.2, 0.1)


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flatten(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = np.asarray(value)
    return out


def np_lars_updates(params, grads_per_step, lrs, wd, momentum, eta, flags):
    """Reference LARS (SimCLR's classic momentum) in float64; returns per-step updates."""
    w = {k: v.astype(np.float64) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    all_updates = []
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        updates = {}
        for key in w:
            decay, adapt = flags[key]
            g = grads[key].astype(np.float64)
            if decay:
                g = g + wd * w[key]
            if adapt:
                w_norm, g_norm = np.linalg.norm(w[key]), np.linalg.norm(g)
                ratio = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                g = g * ratio
            v[key] = momentum * v[key] + lr * g
            updates[key] = -v[key]
            w[key] = w[key] - v[key]
        all_updates.append(updates)
    return all_updates


def _random_tree(rng, zero=()):
    return {
        k: (np.zeros(shape) if k in zero else rng.normal(size=shape)).astype(np.float32)
        for k, (shape, _, _) in LEAVES.items()
    }


def _run_and_compare(tx, params, grads_per_step, flags, wd, momentum, eta):
    ref = np_lars_updates(params, grads_per_step, LRS, wd, momentum, eta, flags)
    p = _nest(params)
    state = tx.init(p)
    update_fn = jax.jit(tx.update)
    for step, grads in enumerate(grads_per_step):
        updates, state = update_fn(_nest(grads), state, p)
        got = _flatten(updates)
        for key, expected in ref[step].items():
            assert np.all(np.isfinite(got[key])), (step, key)
            np.testing.assert_allclose(
                got[key], expected, rtol=2e-5, atol=1e-9, err_msg=f"step {step} {key}"
            )
        p = optax.apply_updates(p, updates)


def _schedule(count):
    # A changing learning rate: lr must sit inside the momentum buffer.
    return jnp.asarray(LRS, jnp.float32)[count]


def test_lars_matches_numpy_with_exclusions_and_zero_weights():
    rng = np.random.default_rng(0)
    # The head kernel starts at zero: |w| = 0 must give trust ratio 1, not 0.
    params = _random_tree(rng, zero={("head", "dense", "kernel")})
    grads = [_random_tree(rng) for _ in LRS]
    wd, momentum, eta = 0.05, 0.9, 0.001
    flags = {k: (decay, adapt) for k, (_, decay, adapt) in LEAVES.items()}
    tx = optim.lars(
        _schedule,
        weight_decay=wd,
        momentum=momentum,
        trust_coefficient=eta,
        weight_decay_mask=optim.lars_exclusion_mask,
        trust_ratio_mask=optim.lars_exclusion_mask,
    )
    _run_and_compare(tx, params, grads, flags, wd, momentum, eta)


def test_lars_zero_gradient_is_finite():
    rng = np.random.default_rng(1)
    params = _random_tree(rng)
    # |g| = 0 for the conv kernel at the first step (no weight decay): ratio 1, no NaN.
    grads = [_random_tree(rng, zero={("encoder", "conv", "kernel")})]
    grads += [_random_tree(rng) for _ in LRS[1:]]
    flags = {k: (decay, adapt) for k, (_, decay, adapt) in LEAVES.items()}
    tx = optim.lars(
        _schedule, weight_decay=0.0, momentum=0.8, trust_coefficient=0.01,
        weight_decay_mask=optim.lars_exclusion_mask,
    )  # fmt: skip
    _run_and_compare(tx, params, grads, flags, 0.0, 0.8, 0.01)


def test_lars_default_masks_apply_everywhere():
    """No masks: every parameter is decayed and adapted (optax default semantics)."""
    rng = np.random.default_rng(2)
    params = _random_tree(rng)
    grads = [_random_tree(rng) for _ in LRS]
    flags = {k: (True, True) for k in LEAVES}
    tx = optim.lars(_schedule, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    _run_and_compare(tx, params, grads, flags, 0.01, 0.9, 0.001)


def test_create_optimizer_lars_probe_weight_decay_option():
    """probe_weight_decay=True (the reference's loss-side L2): decay, but no adaptation.

    The default (False) excludes the probe from both, checked second.
    """
    cfg = _cfg(name="lars", base_lr=1.0, lr_scaling="linear", weight_decay=0.05)
    cfg.probe_weight_decay = True
    # Schedule: 3 steps of warmup out of 6, peak 1.0 * 256 / 256.
    tx, schedule = optim.create_optimizer(cfg, batch_size=256, total_steps=6, warmup_steps=3)
    rng = np.random.default_rng(3)
    params = _random_tree(rng)
    grads = [_random_tree(rng) for _ in range(4)]
    flags = {k: (decay, adapt) for k, (_, decay, adapt) in LEAVES.items()}
    flags[("probe", "kernel")] = (True, False)
    lrs = [float(schedule(s)) for s in range(4)]
    np.testing.assert_allclose(lrs, [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)
    ref = np_lars_updates(params, grads, lrs, 0.05, 0.9, 0.001, flags)
    p, state = _nest(params), tx.init(_nest(params))
    for step, g in enumerate(grads):
        updates, state = tx.update(_nest(g), state, p)
        for key, expected in ref[step].items():
            np.testing.assert_allclose(_flatten(updates)[key], expected, rtol=2e-5, atol=1e-9)
        p = optax.apply_updates(p, updates)

    del cfg["probe_weight_decay"]  # the default
    tx, _ = optim.create_optimizer(cfg, batch_size=256, total_steps=6, warmup_steps=3)
    flags[("probe", "kernel")] = (False, False)
    ref = np_lars_updates(params, grads[:2], lrs[:2], 0.05, 0.9, 0.001, flags)
    p, state = _nest(params), tx.init(_nest(params))
    for step, g in enumerate(grads[:2]):
        updates, state = tx.update(_nest(g), state, p)
        for key, expected in ref[step].items():
            np.testing.assert_allclose(_flatten(updates)[key], expected, rtol=2e-5, atol=1e-9)
        p = optax.apply_updates(p, updates)


# ----------------------------------------------------------------------------
# SGD / AdamW (evaluation): weight decay only on kernels.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_numpy(nesterov):
    cfg = _cfg(name="sgd", base_lr=0.1, lr_scaling="linear", weight_decay=1e-2, nesterov=nesterov)
    tx, schedule = optim.create_optimizer(cfg, batch_size=512, total_steps=10, warmup_steps=0)
    rng = np.random.default_rng(4)
    params = _random_tree(rng)
    grads = [_random_tree(rng) for _ in range(2)]
    w = {k: v.astype(np.float64) for k, v in params.items()}
    trace = {k: np.zeros_like(x) for k, x in w.items()}
    p, state = _nest(params), tx.init(_nest(params))
    for step, g in enumerate(grads):
        lr = 0.1 * 512 / 256 * 0.5 * (1 + math.cos(math.pi * step / 10))
        np.testing.assert_allclose(schedule(step), lr, rtol=1e-6)
        updates, state = tx.update(_nest(g), state, p)
        for key in w:
            gk = g[key] + (1e-2 * w[key] if len(LEAVES[key][0]) >= 2 else 0.0)
            trace[key] = 0.9 * trace[key] + gk
            direction = gk + 0.9 * trace[key] if nesterov else trace[key]
            expected = -lr * direction
            np.testing.assert_allclose(_flatten(updates)[key], expected, rtol=2e-5, atol=1e-9)
            w[key] = w[key] + expected
        p = optax.apply_updates(p, updates)


def test_adamw_decays_kernels_only():
    cfg = _cfg(name="adamw", base_lr=1e-3, lr_scaling="sqrt", weight_decay=0.1, b1=0.8, b2=0.99)
    tx, schedule = optim.create_optimizer(cfg, batch_size=64, total_steps=10, warmup_steps=2)
    rng = np.random.default_rng(5)
    params = _random_tree(rng)
    zero_grads = {k: np.zeros_like(v) for k, v in params.items()}
    p = _nest(params)
    state = tx.init(p)
    # Two steps so the learning rate is non-zero (step 0 of warmup has lr 0).
    for _ in range(2):
        updates, state = tx.update(_nest(zero_grads), state, p)
    lr = 1e-3 * math.sqrt(64) * 1 / 2
    np.testing.assert_allclose(schedule(1), lr, rtol=1e-6)
    for key, value in _flatten(updates).items():
        # Zero gradients: Adam's own step is 0; only decoupled decay -lr * wd * w is left.
        expected = -lr * 0.1 * params[key] if len(LEAVES[key][0]) >= 2 else np.zeros_like(value)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-10, err_msg=str(key))


# ----------------------------------------------------------------------------
# Masks on a SimCLR-shaped Flax parameter tree.
# ----------------------------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=False, name="bn1")(y))
        y = nn.Conv(8, (3, 3), use_bias=False, name="conv2")(y)
        y = nn.BatchNorm(use_running_average=False, scale_init=nn.initializers.zeros, name="bn2")(y)
        return nn.relu(x + y)


class _Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False, name="bn_init")(x))
        x = _Block(name="stage1_block1")(x)
        return jnp.mean(x, axis=(1, 2))


class _Head(nn.Module):
    @nn.compact
    def __call__(self, h):
        for i in range(2):
            h = nn.Dense(8, use_bias=False, name=f"dense_{i}")(h)
            h = nn.relu(nn.BatchNorm(use_running_average=False, name=f"bn_{i}")(h))
        h = nn.Dense(4, use_bias=False, name="dense_2")(h)
        return nn.BatchNorm(use_running_average=False, use_bias=False, name="bn_2")(h)


class _SimCLRLike(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _Encoder(name="encoder")(x)
        z = _Head(name="head")(h)
        logits = nn.Dense(10, name="probe")(jax.lax.stop_gradient(h))
        return z, logits


def _path_names(path):
    return tuple(getattr(k, "key", k) for k in path)


def test_masks_on_simclr_like_tree():
    variables = jax.eval_shape(
        _SimCLRLike().init, jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.float32)
    )
    params = variables["params"]
    assert set(params) == {"encoder", "head", "probe"}
    leaves = {_path_names(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    lars_mask = {
        _path_names(path): m
        for path, m in jax.tree_util.tree_leaves_with_path(optim.lars_exclusion_mask(params))
    }
    wd_mask = {
        _path_names(path): m
        for path, m in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))
    }
    assert lars_mask.keys() == leaves.keys() == wd_mask.keys()
    for path in leaves:
        is_kernel = path[-1] == "kernel"
        assert lars_mask[path] == (is_kernel and path[0] != "probe"), path
        assert wd_mask[path] == is_kernel, path
    # 3 encoder convs + 3 head denses are adapted; BN scale/bias and the probe are not.
    assert sum(lars_mask.values()) == 6
    assert sum(wd_mask.values()) == 7
    # With the collection key still on top, the probe is recognised all the same.
    wrapped = optim.lars_exclusion_mask({"params": params})
    assert wrapped["params"]["probe"]["kernel"] is False
    assert wrapped["params"]["head"]["dense_2"]["kernel"] is True


# ----------------------------------------------------------------------------
# Schedules and peak learning rate.
# ----------------------------------------------------------------------------


def test_peak_learning_rate():
    # The paper's ImageNet default: 0.3 linear == 0.075 sqrt == 4.8 at B = 4096.
    assert optim.peak_learning_rate(0.3, 4096, "linear") == pytest.approx(0.3 * 4096 / 256)
    assert optim.peak_learning_rate(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    assert optim.peak_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert optim.peak_learning_rate(0.2, 100, "sqrt") == pytest.approx(0.2 * 10)
    with pytest.raises(ValueError, match=r"lr_scaling.*'cubic'"):
        optim.peak_learning_rate(0.3, 256, "cubic")
    with pytest.raises(ValueError, match=r"batch_size.*0"):
        optim.peak_learning_rate(0.3, 0, "linear")


@pytest.mark.parametrize("warmup,total", [(10, 110), (0, 50), (7, 7)])
def test_warmup_cosine_schedule(warmup, total):
    peak = 2.5
    schedule = optim.warmup_cosine_schedule(peak, warmup, total)

    def formula(step):
        if step >= total:
            return 0.0
        if step < warmup:
            return peak * step / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    decay = total - warmup
    steps = [0, warmup // 2, warmup, warmup + decay // 3, warmup + decay // 2, total, total + 5]
    jitted = jax.jit(schedule)
    for step in steps:
        np.testing.assert_allclose(schedule(step), formula(step), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(jitted(jnp.int32(step)), formula(step), rtol=1e-6, atol=1e-7)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-7)
    # Explicit landmarks: 0 at step 0, the peak at the end of warmup.
    assert float(schedule(0)) == (0.0 if warmup else pytest.approx(peak))
    if warmup < total:
        assert float(schedule(warmup)) == pytest.approx(peak)
    else:
        assert float(schedule(warmup - 1)) == pytest.approx(peak * (warmup - 1) / warmup)
    if decay >= 2 and decay % 2 == 0:
        assert float(schedule(warmup + decay // 2)) == pytest.approx(peak / 2, rel=1e-6)


@pytest.mark.parametrize(
    "args,match",
    [
        ((1.0, 11, 10), r"warmup_steps \(11\).*total_steps \(10\)"),
        ((1.0, -1, 10), r"warmup_steps.*-1"),
        ((1.0, 0, -5), r"total_steps.*-5"),
        ((1.0, 0, 0), r"total_steps.*0"),
        ((-1.0, 0, 10), r"peak_lr.*-1\.0"),
    ],
)
def test_schedule_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        optim.warmup_cosine_schedule(*args)


# ----------------------------------------------------------------------------
# Config validation.
# ----------------------------------------------------------------------------


def _cfg(**fields):
    base = {"name": "lars", "base_lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-6}
    base.update(fields)
    return mlc.ConfigDict(base)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"name": "adam"}, r"config\.optim\.name.*'adam'"),
        ({"lr_scaling": "log"}, r"lr_scaling.*'log'"),
        ({"weight_decay": -1e-4}, r"config\.optim\.weight_decay.*-0\.0001"),
        ({"base_lr": -0.1}, r"config\.optim\.base_lr.*-0\.1"),
        ({"base_lr": None}, r"config\.optim\.base_lr.*None"),
        ({"momentum": 1.0}, r"config\.optim\.momentum.*1\.0"),
        ({"trust_coefficient": 0.0}, r"config\.optim\.trust_coefficient.*0\.0"),
        ({"nesterov": True}, r"config\.optim\.nesterov.*'lars'"),
        ({"name": "adamw", "b2": 1.5}, r"config\.optim\.b2.*1\.5"),
        ({"probe_weight_decay": "yes"}, r"config\.optim\.probe_weight_decay.*'yes'"),
    ],
)
def test_create_optimizer_bad_config(fields, match):
    with pytest.raises(ValueError, match=match):
        optim.create_optimizer(_cfg(**fields), batch_size=256, total_steps=100, warmup_steps=10)


def test_create_optimizer_bad_steps():
    with pytest.raises(ValueError, match=r"warmup_steps \(200\)"):
        optim.create_optimizer(_cfg(), batch_size=256, total_steps=100, warmup_steps=200)
    with pytest.raises(ValueError, match=r"batch_size.*-8"):
        optim.create_optimizer(_cfg(), batch_size=-8, total_steps=100, warmup_steps=10)


def test_lars_bad_arguments():
    with pytest.raises(ValueError, match=r"weight_decay.*-1"):
        optim.lars(0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match=r"momentum.*1\.5"):
        optim.lars(0.1, weight_decay=0.0, momentum=1.5)
    with pytest.raises(ValueError, match=r"trust_coefficient.*-0\.001"):
        optim.lars(0.1, weight_decay=0.0, trust_coefficient=-0.001)
