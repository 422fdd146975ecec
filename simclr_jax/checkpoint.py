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
from simclr_jax.config_checks import ConfigError

CHECKPOINT_SUBDIR = "checkpoints"
# Why a checkpoint's shapes can differ from the model its own config builds.
OLD_ARCHITECTURE_NOTE = (
    "ResNet-18/34 checkpoints written before the first stage got its projection shortcut (as "
    "the reference SimCLR code has) lack block1_0's proj_conv and proj_bn and cannot be loaded "
    "(docs/model_and_loss.md)"
)


def old_architecture_hint(mismatch: str) -> str:
    """'; <OLD_ARCHITECTURE_NOTE>' when a shape_mismatch message is that of an older
    ResNet-18/34 checkpoint (block1_0's projection shortcut missing), else ''."""
    if "block1_0/proj_" in mismatch and " is None in the checkpoint" in mismatch:
        return f"; {OLD_ARCHITECTURE_NOTE}"
    return ""


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


def _path_name(path: tuple) -> str:
    """'params/encoder/block1_0/conv1/kernel': a pytree path as names, whether its nodes are
    dicts, dataclass fields or sequences (a saved state's metadata has dicts where the state
    has dataclasses)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def shape_mismatch(expected: Any, saved: Any, prefixes: tuple[str, ...] = ("",)) -> str | None:
    """The first (sorted) difference between two pytrees' array shapes, or None.

    Args:
      expected: the tree the model builds (arrays or jax.ShapeDtypeStruct).
      saved: the tree in the checkpoint (arrays or orbax array metadata).
      prefixes: compare only the leaves whose path starts with one of these.

    Returns:
      '<path> is <shape> in the checkpoint but <shape> in the model (None = missing)', or
      None when every leaf has the same shape in both.
    """

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        named = {_path_name(path): tuple(np.shape(leaf)) for path, leaf in leaves}
        return {k: v for k, v in named.items() if k.startswith(prefixes)}

    exp, got = shapes(expected), shapes(saved)
    for key in sorted(set(exp) | set(got)):
        if exp.get(key) != got.get(key):
            return (
                f"{key} is {got.get(key)} in the checkpoint but {exp.get(key)} in the model "
                "(None = missing)"
            )
    return None


def _step_metadata(directory: str, step: int) -> Any:
    """The saved pytree's metadata (shapes, dtypes) of one step, without reading its arrays."""
    # A manager (it saves nothing) over the directory the trainer's manager wrote: it reads
    # the step's metadata where that manager put it (a checkpointer opened on <step>/default
    # would log a warning about a missing metadata file at every restore).
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager(
        directory, item_handlers=ocp.StandardCheckpointHandler(), options=options
    ) as manager:
        return manager.item_metadata(step)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """Restores the latest (or the given) step into the target structure.

    Args:
      manager: the CheckpointManager.
      abstract_state: a pytree of jax.ShapeDtypeStruct with shardings, as the
        state should be laid out on this run's devices.
      step: which step; None for the latest.

    Returns:
      The restored state.

    Raises:
      ConfigError: the saved parameters or BN statistics differ in shape from the model's
        (a checkpoint of another architecture), before any array is read.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    # Only the parameters and BN statistics (plain dicts in both trees): they describe the
    # architecture; orbax still checks the rest (the optimizer state) itself.
    mismatch = shape_mismatch(
        abstract_state, _step_metadata(manager.directory, step), ("params/", "batch_stats/")
    )
    if mismatch:
        raise ConfigError(
            f"the checkpoint at {files.join(str(manager.directory), str(step))} does not match "
            f"the model this run builds: {mismatch}. Resume it with the config.model it was "
            f"written with, or start a new workdir{old_architecture_hint(mismatch)}."
        )
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
    # As _step_metadata: a manager that saves nothing, over the trainer's directory.
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
