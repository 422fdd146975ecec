"""The train state a run checkpoints: the online network, its optimizer and any method state.

`TrainState` is SimCLR's state (and the base of every method's): its checkpoint tree is
{'step', 'params', 'batch_stats', 'opt_state'}. Methods with an EMA target network (BYOL,
MoCo v3) use `TargetTrainState`, which adds the target's parameters and BN statistics; methods
with a queue as well (MoCo v2) use `QueueTrainState`, which adds the queue and its write
position; NNCLR's `SupportSetTrainState` has a queue without a target, InstDisc's
`MemoryBankTrainState` a memory bank. orbax saves and restores the added fields with the rest,
so a resumed run continues the EMA, the queue and the bank exactly.
"""

from typing import Any, TypeVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

State = TypeVar("State", bound="TrainState")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: the step and all trainable state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class TargetTrainState(TrainState):
    """TrainState plus an EMA target network (not trained by the optimizer).

    Attributes:
      target_params: the target's parameters, an exponential moving average of the online
        network's parameters of the same submodules (e.g. {'encoder', 'projector'}).
      target_batch_stats: the target's BatchNorm running statistics (updated by the target's
        own forward pass in training mode, as PyTorch buffers are in BYOL implementations).
    """

    target_params: Any
    target_batch_stats: Any


@flax.struct.dataclass
class QueueTrainState(TargetTrainState):
    """TargetTrainState plus a FIFO queue (simclr_jax.methods.queue), replicated on every device.

    Attributes:
      queue: float32 [K, d], e.g. MoCo v2's K most recent keys (the negatives).
      queue_ptr: int32 [], the row the next global batch is written at.
    """

    queue: Any
    queue_ptr: Any


@flax.struct.dataclass
class SupportSetTrainState(TrainState):
    """TrainState plus a FIFO queue of the method's own projections (NNCLR's support set;
    simclr_jax.methods.queue), replicated on every device; no target network.

    Attributes:
      queue: float32 [K, d], the K most recent unit projections.
      queue_ptr: int32 [], the row the next global batch is written at.
    """

    queue: Any
    queue_ptr: Any


@flax.struct.dataclass
class MemoryBankTrainState(TrainState):
    """TrainState plus a memory bank (InstDisc; simclr_jax.methods.memory_bank), replicated.

    Attributes:
      bank: float32 [N, d], one unit vector per training example, row = the example's
        position in the training split.
    """

    bank: Any


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
) -> TrainState:
    """Initialises parameters, batch statistics and optimizer state.

    Args:
      model: the pretraining model.
      tx: the optimizer.
      rng: PRNG key for the parameters.
      image_shape: (height, width, channels) of one view.

    Returns:
      A TrainState at step 0.
    """
    dummy = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
    variables = model.init(rng, dummy, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def extend(base: TrainState, state_class: type[State], **fields: Any) -> State:
    """A method's state: `base`'s step, params, batch_stats and opt_state, plus `fields`.

    Args:
      base: a TrainState, usually fresh from create_train_state.
      state_class: a subclass of TrainState (TargetTrainState, QueueTrainState, ...).
      **fields: the fields the subclass adds (e.g. target_params, queue, bank).

    Returns:
      state_class(step=base.step, ..., **fields).
    """
    return state_class(
        step=base.step,
        params=base.params,
        batch_stats=base.batch_stats,
        opt_state=base.opt_state,
        **fields,
    )
