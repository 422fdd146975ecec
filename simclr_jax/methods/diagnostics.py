"""The retrieval diagnostics every method logs: train/contrastive_acc and train/entropy.

For SimCLR they are NT-Xent's own (losses.nt_xent's aux at the loss's temperature). For the
other methods they are computed without gradient on what the method compares: how often each
view-1 output picks its own image's view-2 output among the global batch's view-2 outputs
(cosine similarity, softmax at DIAGNOSTIC_TEMPERATURE), and the entropy of that softmax. They
are not optimised, so one temperature serves every method and the figures are comparable
across runs of one method; a collapsed representation shows as accuracy near 1/N.
"""

import jax

from simclr_jax import losses

# Softmax temperature of the diagnostics of the methods that are not NT-Xent.
DIAGNOSTIC_TEMPERATURE = 0.1


def view_retrieval(
    a: jax.Array, b: jax.Array, axis_name: str | None, temperature: float = DIAGNOSTIC_TEMPERATURE
) -> dict[str, jax.Array]:
    """{'contrastive_acc', 'entropy'} (float32 scalars, global, no gradient) of a against b.

    Args:
      a: [n, d] this device's view-1 outputs (e.g. BYOL's predictions p(v1)).
      b: [n, d] the matching view-2 outputs (e.g. the target's z'(v2)); the candidates are
        every device's b.
      axis_name: the device axis, or None.
      temperature: the softmax temperature.
    """
    _, aux = losses.nt_xent(
        jax.lax.stop_gradient(a),
        jax.lax.stop_gradient(b),
        temperature=temperature,
        axis_name=axis_name,
    )
    return {"contrastive_acc": aux["contrastive_acc_ab"], "entropy": aux["entropy_ab"]}
