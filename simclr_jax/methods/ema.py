"""The EMA target network: its rate schedule and its update (BYOL, MoCo v3).

Grill et al. 2020 ("Bootstrap your own latent", arXiv 2006.07733), section 3.1: after each
optimizer step the target parameters become xi <- tau xi + (1 - tau) theta, with theta the
online parameters after the step, and tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 for
step k of K, rising from tau_base at k = 0 to 1 at k = K. MoCo v3 (Chen, Xie, He 2021) raises
its momentum to 1 by the same cosine schedule. MoCo v2 (Chen, Fan, Girshick, He 2020) keeps
its key encoder's momentum constant.
"""

from typing import Any

import jax
import jax.numpy as jnp


def ema_rate(step: jax.Array | int, total_steps: int, tau_base: float) -> jax.Array:
    """BYOL's target decay rate tau_k (Grill et al. 2020, section 3.1 and appendix J).

    Args:
      step: k, the 0-based index of the step whose update is being averaged in (the step
        count before the step: 0 for the first step).
      total_steps: K, the run's total number of steps (> 0).
      tau_base: the rate at k = 0, in [0, 1].

    Returns:
      tau_k as a float32 scalar: 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2.
    """
    k = jnp.asarray(step, jnp.float32)
    cosine = (jnp.cos(jnp.pi * k / total_steps) + 1.0) / 2.0
    return 1.0 - (1.0 - jnp.float32(tau_base)) * cosine


def ema_update(target: Any, online: Any, tau: jax.Array) -> Any:
    """tau * target + (1 - tau) * online, leaf by leaf (float32).

    Args:
      target: the target's parameter tree.
      online: the online parameters of the same structure (after the optimizer step).
      tau: the rate from ema_rate.

    Returns:
      The new target tree.
    """
    return jax.tree_util.tree_map(lambda t, o: tau * t + (1.0 - tau) * o, target, online)


def select(tree: dict, modules: tuple[str, ...]) -> dict:
    """The entries of a params or batch_stats tree for the named submodules present in it."""
    return {name: tree[name] for name in modules if name in tree}


def init_target(state: Any, modules: tuple[str, ...]) -> dict[str, Any]:
    """A target network equal to the online one's `modules` (BYOL section 3.1, MoCo's key
    encoder): {'target_params', 'target_batch_stats'}, copies of `state`'s, for
    train_state.extend."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, select(tree, modules))  # noqa: E731
    return {"target_params": copy(state.params), "target_batch_stats": copy(state.batch_stats)}


def target_after_step(
    state: Any, modules: tuple[str, ...], tau: jax.Array, target_batch_stats: Any | None
) -> dict[str, Any]:
    """The target's fields after an optimizer step, for state.replace.

    Args:
      state: a TargetTrainState after the optimizer step.
      modules: the online submodules the target averages.
      tau: the EMA rate of this step.
      target_batch_stats: the target's BN statistics from its own forward pass this step
        (None: kept as they are).

    Returns:
      {'target_params': ema_update(target, online, tau), 'target_batch_stats': ...}.
    """
    return {
        "target_params": ema_update(state.target_params, select(state.params, modules), tau),
        "target_batch_stats": (
            state.target_batch_stats if target_batch_stats is None else target_batch_stats
        ),
    }
