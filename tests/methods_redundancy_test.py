"""Barlow Twins and VICReg on the generic train step (simclr_jax.methods.barlow_twins, .vicreg).

Their losses are tested against float64 NumPy formulas in method_losses_test.py; here: the
heads follow the papers (layers, biases), the step optimises exactly method_losses' loss of
the model's z (gradient against a hand-built reference), one step on 8 devices equals one on 1
device (global BN in encoder and projector, statistics over the global batch), gradient
caching is exact for them (micro-batched step == full-batch step with frozen BN), and their
config errors name the field.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from methods_test import TREE_TOL, _assert_trees_close, _batch, _TinyEncoder

from configs import barlow_twins_cifar10, vicreg_cifar10
from simclr_jax import config_checks, method_losses, methods, models, sharding, steps
from simclr_jax.methods import barlow_twins, vicreg
from simclr_jax.methods.heads import MLPHead, ProjectorModel

AXIS = sharding.DATA_AXIS
METHODS = {
    "barlow_twins": barlow_twins.BarlowTwins(lambd=0.05, loss_scale=0.5),
    "vicreg": vicreg.VICReg(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0),
}
BIASES = {"barlow_twins": (False, False), "vicreg": (True, False)}  # (hidden, output)


def _model(name, axis):
    use_bias, out_bias = BIASES[name]
    return ProjectorModel(
        encoder=_TinyEncoder(bn_axis_name=axis),
        projector=MLPHead(
            12, 10, num_layers=3, bn_axis_name=axis, use_bias=use_bias, out_bias=out_bias
        ),
        probe=models.LinearHead(num_classes=10),
    )


def _step(name, num_devices, *, micro=None, freeze_bn=False, batch=None):
    """One step with SGD(0.5); returns (old state, new state, metrics) as NumPy."""
    axis = AXIS if num_devices > 1 else None
    method = METHODS[name]
    tx = optax.sgd(0.5)
    state = method.create_state(_model(name, None), tx, jax.random.key(0), (8, 8, 3))
    step = functools.partial(
        steps.train_step,
        model=_model(name, axis),
        tx=tx,
        learning_rate_fn=lambda s: jnp.float32(0.5),
        method=method,
        axis_name=axis,
        sync_batch_stats=False,
        micro_batch_per_device=micro,
        freeze_bn=freeze_bn,
    )
    batch = _batch() if batch is None else batch
    old = jax.device_get(state)  # the compiled step donates the state
    if num_devices == 1:
        new, metrics = jax.jit(step)(state, batch)
    else:
        mesh = sharding.create_mesh(jax.devices()[:num_devices])
        fn = steps.compile_train_step(step, parallelism="shard_map", mesh=mesh)
        new, metrics = fn(state, sharding.make_global_batch(batch, mesh))
    return old, jax.device_get(new), jax.device_get(metrics.compute())


# The updates of one SGD step (largest entries 0.2-2.4 here) computed in two float32 orders
# (8 devices, micro-batches): measured worst differences 3.3e-5 of a tensor's largest update
# entry (Barlow Twins, micro-batched) and 3.8e-6 absolute on tensors whose update is ~0 (e.g.
# VICReg's pre-BN biases, whose exact gradient is 0: noise on both sides). Bounds: 2e-4 of the
# largest update entry + 1e-5 (6x and 2.6x margins).
UPDATE_RTOL, UPDATE_ATOL = 2e-4, 1e-5


def _assert_updates_close(new_a, new_b, old):
    """Each tensor's update new_a - old within UPDATE_RTOL of new_b - old's largest entry."""
    for (path, a), b, o in zip(
        jax.tree_util.tree_flatten_with_path(new_a)[0],
        jax.tree_util.tree_leaves(new_b),
        jax.tree_util.tree_leaves(old),
        strict=True,
    ):
        da, db = np.float64(a) - np.float64(o), np.float64(b) - np.float64(o)
        error, bound = np.abs(da - db).max(), UPDATE_RTOL * np.abs(db).max() + UPDATE_ATOL
        assert error <= bound, f"{jax.tree_util.keystr(path)}: {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_heads_follow_the_papers(name):
    """3-layer projector, BN + ReLU on the hidden layers; Barlow Twins without biases, VICReg
    without a bias on the output layer only; BN over the global batch with the encoder's axis."""
    config = {"barlow_twins": barlow_twins_cifar10, "vicreg": vicreg_cifar10}[name].get_config(
        "runlocal"
    )
    model = methods.build_model(config, num_classes=10, bn_axis_name=AXIS)
    assert model.projector.num_layers == 3 and model.projector.bn_axis_name == AXIS
    variables = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((2, 32, 32, 3)), train=False), jax.random.key(0)
    )
    projector = variables["params"]["projector"]
    assert set(projector) == {"dense_0", "bn_0", "dense_1", "bn_1", "dense_2"}
    hidden, out = BIASES[name]
    assert ("bias" in projector["dense_0"]) == hidden and ("bias" in projector["dense_1"]) == hidden
    assert ("bias" in projector["dense_2"]) == out
    assert projector["dense_2"]["kernel"].shape == (64, config.method.projector_dim)
    assert set(variables["params"]) == {"encoder", "projector", "probe"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step_optimises_the_method_loss_of_the_model_outputs(name):
    """The parameter update is -lr * the gradient of loss_scale * method_losses' loss of z
    (plus the probe's cross-entropy, which reaches only the probe), computed by hand."""
    old, new, metrics = _step(name, 1)
    method, model, batch = METHODS[name], _model(name, None), _batch()
    images = jnp.concatenate([batch["view1"], batch["view2"]])

    def reference_loss(params):
        out = model.apply(
            {"params": params, "batch_stats": old.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )[0]
        z1, z2 = out["z"][:16], out["z"][16:]
        if name == "barlow_twins":
            loss = method_losses.barlow_twins_loss(z1, z2, method.lambd)[0] * method.loss_scale
        else:
            loss = method_losses.vicreg_loss(z1, z2, 25.0, 25.0, 1.0)[0]
        return loss

    value, grads = jax.value_and_grad(reference_loss)(old.params)
    scale = method.loss_scale if name == "barlow_twins" else 1.0
    np.testing.assert_allclose(metrics["loss"] * scale, value, rtol=1e-6)
    for part in ("encoder", "projector"):
        expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, old.params[part], grads[part])
        # VICReg's hidden biases feed a BN: their exact gradient is 0 and both sides hold
        # float32 noise only (measured 1.4e-6 apart after the step); atol 1e-5.
        _assert_trees_close(new.params[part], expected, 1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step_on_eight_devices_equals_one_device(name):
    """Global BN and the loss's statistics over every device: the same parameters and BN
    statistics as one device with the whole batch."""
    old, one, one_metrics = _step(name, 1)
    _, eight, eight_metrics = _step(name, 8)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"], rtol=1e-5)
    _assert_updates_close(eight.params, one.params, old.params)
    _assert_trees_close(eight.batch_stats, one.batch_stats, TREE_TOL)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_micro_batched_step_equals_the_full_batch_step_with_frozen_bn(name):
    """Gradient caching is exact for a loss of z alone: 4 micro-batches of 4 == one batch."""
    old, full, full_metrics = _step(name, 1, freeze_bn=True)
    _, micro, micro_metrics = _step(name, 1, micro=4, freeze_bn=True)
    np.testing.assert_allclose(micro_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    _assert_updates_close(micro.params, full.params, old.params)


def test_config_errors_name_the_field():
    for module, field, value in (
        (barlow_twins_cifar10, "lambd", -0.1),
        (barlow_twins_cifar10, "loss_scale", 0.0),
        (barlow_twins_cifar10, "projector_dim", 0),
        (vicreg_cifar10, "std_coeff", -1.0),
        (vicreg_cifar10, "cov_coeff", float("nan")),
        (vicreg_cifar10, "projector_hidden_dim", 0),
    ):
        config = module.get_config("runlocal")
        config.method[field] = value
        with pytest.raises(config_checks.ConfigError, match=rf"method\.{field}"):
            methods.check_config(config)
    # Micro-batching is allowed for both (their losses are functions of z alone).
    for module in (barlow_twins_cifar10, vicreg_cifar10):
        config = module.get_config("runlocal")
        config.train.micro_batch_size = 16
        methods.check_config(config)


@pytest.mark.parametrize("name", ["byol", "mocov3", "barlow_twins", "vicreg"])
@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_recipe_configs_pass_every_check_and_name_their_method(name, dataset):
    """Each recipe (and its smoke-test variant) passes the up-front checks with its method."""
    module = importlib.import_module(f"configs.{name}_{dataset}")
    for arg in (None, "runlocal"):
        config = module.get_config(arg)
        config_checks.validate_pretrain_config(config)
        methods.check_config(config)
        assert config.method.name == name
    # The papers' ImageNet recipes: the EMA rate and batch each paper's headline run used.
    if dataset == "imagenet":
        config = module.get_config()
        assert config.model.depth == 50 and config.train.epochs == 1000
        expected_batch = {"byol": 4096, "mocov3": 4096, "barlow_twins": 2048, "vicreg": 2048}
        assert config.train.batch_size == expected_batch[name]
        if name in ("byol", "mocov3"):
            assert config.method.tau_base == 0.996
        assert config.augment.view1.blur_prob == 1.0 and config.augment.view2.blur_prob == 0.1
