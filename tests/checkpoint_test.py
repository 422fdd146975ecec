"""simclr_jax.checkpoint: a checkpoint of another architecture fails with a one-line ConfigError
naming the first differing variable, before any array is read."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import checkpoint, config_checks, steps


def _state(params):
    """A TrainState as the trainer saves it: a dataclass holding dicts and optax namedtuples."""
    batch_stats = {"encoder": {"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
    opt_state = optax.sgd(0.1, momentum=0.9).init(params)
    return steps.TrainState(
        step=jnp.asarray(2), params=params, batch_stats=batch_stats, opt_state=opt_state
    )


def _params(**extra):
    params = {"encoder": {"conv": {"kernel": jnp.ones((3, 3, 3, 4))}, "bn": {"scale": jnp.ones(4)}}}
    params["encoder"].update(extra)
    return params


def _abstract(state):
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return checkpoint.abstract_like(state, jax.tree.map(lambda _: one, state))


@pytest.fixture
def manager(tmp_path):
    manager = checkpoint.create_manager(str(tmp_path), max_to_keep=2, asynchronous=False)
    checkpoint.save(manager, 2, _state(_params()))
    manager.wait_until_finished()
    yield manager
    manager.close()


def test_restore_of_the_same_architecture(manager):
    restored = checkpoint.restore(manager, _abstract(_state(_params())))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(_state(_params())), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "params,pattern,old_resnet",
    [
        # block1_0's projection shortcut missing: a ResNet-18/34 checkpoint written before the
        # first stage had one; the message says so.
        (
            _params(block1_0={"proj_conv": {"kernel": jnp.ones((1, 1, 4, 4))}}),
            r"params/encoder/block1_0/proj_conv/kernel is None in the checkpoint but "
            r"\(1, 1, 4, 4\) in the model",
            True,
        ),
        # Any other missing variable or shape: no such note.
        (
            _params(proj={"kernel": jnp.ones((1, 1, 4, 4))}),
            r"params/encoder/proj/kernel is None in the checkpoint but \(1, 1, 4, 4\) in the model",
            False,
        ),
        (
            {"encoder": {"conv": {"kernel": jnp.ones((3, 3, 3, 8))}, "bn": {"scale": jnp.ones(4)}}},
            r"params/encoder/conv/kernel is \(3, 3, 3, 4\) in the checkpoint but \(3, 3, 3, 8\)",
            False,
        ),
    ],
)
def test_restore_of_another_architecture_names_the_variable(manager, params, pattern, old_resnet):
    with pytest.raises(config_checks.ConfigError, match=pattern) as err:
        checkpoint.restore(manager, _abstract(_state(params)))
    message = str(err.value)
    assert "\n" not in message
    assert "checkpoints/2 does not match the model this run builds" in message
    assert ("projection shortcut" in message) == old_resnet


def test_shape_mismatch_reads_dataclass_fields_and_dict_keys_alike():
    state = _state(_params())
    as_dicts = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }
    assert checkpoint.shape_mismatch(state, as_dicts) is None
    other = _state(_params(x={"k": jnp.ones(2)}))
    assert checkpoint.shape_mismatch(other, as_dicts, ("params/",)) == (
        "params/encoder/x/k is None in the checkpoint but (2,) in the model (None = missing)"
    )
    # The first difference in path order: here the optimizer's copy of the new variable.
    assert checkpoint.shape_mismatch(other, as_dicts).startswith("opt_state/0/trace/encoder/x/k")
    # Only the prefixes asked for are compared.
    assert checkpoint.shape_mismatch(state, {"params": {}}, ("batch_stats/",)) is not None
    assert checkpoint.shape_mismatch(state, as_dicts | {"other": jnp.ones(3)}, ("params/",)) is None
