"""A tiny stand-in for the pretraining model: the outputs train_step reads, in milliseconds.

Per-example (no BatchNorm mixing rows, so a NumPy reference can encode examples one by one),
with a 'batch_stats' collection and an online probe of the real LinearHead.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class StubModel(nn.Module):
    """A per-example encoder (no BatchNorm mixing rows) with the pretraining model's outputs."""

    probe: nn.Module

    @nn.compact
    def __call__(self, images, train: bool):
        h = nn.Dense(8)(images.reshape(images.shape[0], -1))
        seen = self.variable("batch_stats", "mean", jnp.zeros, (8,))
        if train and not self.is_initializing():
            seen.value = h.mean(0)
        return {"h": h, "z": nn.Dense(4)(h), "probe_logits": self.probe(jax.lax.stop_gradient(h))}
