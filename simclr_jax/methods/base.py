"""The step object of the methods without a target network (SimCLR, Barlow Twins, VICReg).

Their loss is a function of the two views' projections z alone, over the global batch: the
plain TrainState, no targets, nothing to update after the optimizer step, and gradient caching
(steps._micro_batch_grads) is exact for them. A subclass supplies `embedding_loss`.
"""

import dataclasses

import flax.linen as nn
import jax
import optax

from simclr_jax import train_state


@dataclasses.dataclass(frozen=True)
class EmbeddingLossMethod:
    """A method whose objective is embedding_loss(z1, z2) of the online model's z."""

    name: str = ""
    # Gradient caching (steps._micro_batch_grads) is exact for a loss of z alone.
    supports_micro_batching: bool = True

    def create_state(
        self, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
    ) -> train_state.TrainState:
        """The plain TrainState (train_state.create_train_state)."""
        return train_state.create_train_state(model, tx, rng, image_shape)

    def targets(self, model, state, images, *, axis_name, freeze_bn, index=None):
        """No target network: (None, None)."""
        del model, state, images, axis_name, freeze_bn, index
        return None, None

    def embedding_loss(self, z1: jax.Array, z2: jax.Array, axis_name: str | None):
        """(optimised objective, (reported loss, {'contrastive_acc', 'entropy'})).

        z1, z2: this device's [n, d] projections of views 1 and 2; the value is the global
        batch's, the gradient this device's share (method_losses' convention).
        """
        raise NotImplementedError

    def objective(self, outputs: dict, targets, *, n: int, axis_name: str | None):
        """(optimised objective, reported loss, diagnostics) of outputs['z'] [2n, d]: view 1's
        rows, then view 2's."""
        del targets
        z = outputs["z"]
        scaled, (loss, aux) = self.embedding_loss(z[:n], z[n:], axis_name)
        return scaled, loss, aux

    def after_step(
        self, new_state, *, step, target_batch_stats, targets=None, outputs=None, axis_name=None
    ):
        """Nothing to update."""
        del step, target_batch_stats, targets, outputs, axis_name
        return new_state
