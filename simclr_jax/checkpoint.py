"""Orbax checkpoints of the train state: periodic, asynchronous, atomic, resumable.

Orbax writes each step into a temporary directory and renames it when the
save has finished, so a process killed mid-save leaves only an unfinished
temporary directory, which is ignored (and cleaned up) on restart: a restart
always resumes from the last complete checkpoint.

The state is saved replicated-free (one logical copy), so it can be restored
onto any number of devices: the caller passes the target shardings.

The workdir may be local or on cloud storage (gs://): Orbax handles both. On
GCS, where directories cannot be renamed, Orbax writes the step directory in
place and marks it complete with a commit_success.txt file instead; reading
finished steps through Orbax (latest_step) covers both conventions.
"""

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from simclr_jax import files

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    """workdir/checkpoints, absolute for local paths (gs:// paths are kept as they are)."""
    return files.join(files.abspath(workdir), CHECKPOINT_SUBDIR)


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


def restore_to_host(directory: str, step: int) -> Any:
    """One saved step as NumPy arrays on this host, whatever devices and processes wrote it.

    The restore targets this process's first local device (explicit shardings:
    orbax would otherwise try to lay the arrays out as they were saved, which
    fails on another device count), then copies to the host.

    Args:
      directory: a checkpoints directory (checkpoint_dir(workdir)).
      step: the step to restore.

    Returns:
      The saved pytree (params, batch_stats, opt_state, step) with NumPy leaves.

    Raises:
      FileNotFoundError: if that step was not saved completely.
    """
    # Orbax's own test of completeness (a finished rename locally, commit_success.txt on GCS).
    if not files.isdir(directory) or step not in ocp.utils.checkpoint_steps(directory):
        raise FileNotFoundError(f"no complete checkpoint of step {step} in {directory}")
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # A manager (it saves nothing) over the directory the trainer's manager wrote: it reads
    # the step's metadata where that manager put it (a checkpointer opened on <step>/default
    # would log a warning about a missing metadata file at every restore).
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(
        directory, item_handlers=ocp.StandardCheckpointHandler(), options=options
    ) as manager:
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
            manager.item_metadata(step),
        )
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return jax.tree_util.tree_map(np.asarray, restored)


def latest_step(workdir: str) -> int | None:
    """The last complete checkpoint's step in workdir, or None (no manager needed)."""
    directory = checkpoint_dir(workdir)
    if not files.isdir(directory):
        return None
    # Orbax's own test of completeness: not a temporary directory (local disk) and,
    # on GCS, a commit_success.txt marker.
    steps = ocp.utils.checkpoint_steps(directory)
    return max(steps) if steps else None
