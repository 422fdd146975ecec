"""Orbax checkpoints of the train state: periodic, asynchronous, atomic, resumable.

Orbax writes each step into a temporary directory and renames it when the
save has finished, so a process killed mid-save leaves only an unfinished
temporary directory, which is ignored (and cleaned up) on restart: a restart
always resumes from the last complete checkpoint.

The state is saved replicated-free (one logical copy), so it can be restored
onto any number of devices: the caller passes the target shardings.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def create_manager(
    workdir: str, *, max_to_keep: int, asynchronous: bool = True
) -> ocp.CheckpointManager:
    """A CheckpointManager rooted at workdir/checkpoints.

    Args:
      workdir: the run's directory.
      max_to_keep: how many recent checkpoints to keep (older ones are deleted).
      asynchronous: write in a background thread while training continues.

    Returns:
      The manager. Call `wait_until_finished()` before exiting.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # The trainer decides when to save; the manager must not skip any.
        save_interval_steps=1,
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> bool:
    """Starts saving `state` at `step` (asynchronously when so configured)."""
    return manager.save(step, args=ocp.args.StandardSave(state), force=True)


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` with the given target shardings."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """Restores the latest (or the given) step into the target structure.

    Args:
      manager: the CheckpointManager.
      abstract_state: a pytree of jax.ShapeDtypeStruct with shardings, as the
        state should be laid out on this run's devices.
      step: which step; None for the latest.

    Returns:
      The restored state.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def latest_step(workdir: str) -> int | None:
    """The last complete checkpoint's step in workdir, or None (no manager needed)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return max(steps) if steps else None
