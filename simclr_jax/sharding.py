"""Device meshes, state placement and global batches for both parallel modes.

Two ways to run the same per-device step (see steps.py):
- 'shard_map' (default): global jax.Arrays. The train state is replicated with
  NamedSharding(mesh, P()), the batch is sharded along the 'data' axis, and the
  step is jax.shard_map(...) under jax.jit with the state donated.
- 'pmap': the compatibility path. The state carries a leading device axis and
  the batch is reshaped to [local_devices, per_device, ...].

Both see the same DATA_AXIS name, so the loss and the global batch norm code
are shared.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from simclr_jax import config_checks

DATA_AXIS = "data"


def select_devices(num_devices: int = 0, field: str = "train.num_devices") -> list[jax.Device]:
    """Returns the devices a run uses: all of them, or the first `num_devices`.

    Args:
      num_devices: 0 for every device of every process; otherwise a count that
        must not exceed jax.device_count() (only supported on a single process,
        because other hosts' devices cannot be left out without leaving hosts
        idle).
      field: the config field num_devices came from (named in errors).

    Returns:
      A list of devices in the order jax.devices() gives.

    Raises:
      config_checks.ConfigError: for a count the run cannot use.
    """
    devices = jax.devices()
    if num_devices == 0:
        return devices
    if num_devices < 0 or num_devices > len(devices):
        config_checks.fail(
            field,
            num_devices,
            f"this run sees {len(devices)} devices: use 0 for all of them or a count in "
            f"[1, {len(devices)}].",
        )
    if jax.process_count() > 1:
        config_checks.fail(field, num_devices, "a multi-process run uses all devices: use 0.")
    return devices[:num_devices]


def create_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A 1-D data-parallel mesh with Auto axis types (shard_map picks the axis)."""
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def local_device_count(devices: Sequence[jax.Device]) -> int:
    """How many of `devices` belong to this process."""
    return sum(d.process_index == jax.process_index() for d in devices)


def make_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Builds global arrays, sharded on the data axis, from this host's batch.

    Every process passes its own local batch (global batch / process count
    examples); the result is one logical array spanning all hosts.
    """
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), batch
    )


def shard_for_pmap(batch: dict[str, np.ndarray], num_local_devices: int) -> dict[str, Any]:
    """Reshapes a local batch to [num_local_devices, per_device, ...] for jax.pmap."""

    def reshape(x: np.ndarray) -> np.ndarray:
        if x.shape[0] % num_local_devices:
            raise ValueError(
                f"local batch of {x.shape[0]} examples does not split over "
                f"{num_local_devices} local devices"
            )
        return x.reshape((num_local_devices, -1) + x.shape[1:])

    return jax.tree_util.tree_map(reshape, batch)


def replicate_for_pmap(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Stacks `tree` once per local device, laid out the way jax.pmap expects.

    The sharding is built on a mesh whose axis name is the pmap axis name, so
    the first call of the pmapped step does not re-layout (and re-compile for)
    its inputs.
    """
    local = [d for d in devices if d.process_index == jax.process_index()]
    mesh = Mesh(np.asarray(local), (DATA_AXIS,))
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def stack(x):
        x = np.asarray(jax.device_get(x))
        return jax.device_put(np.broadcast_to(x, (len(local),) + x.shape), sharding)

    return jax.tree_util.tree_map(stack, tree)


def unreplicate_from_pmap(tree: Any) -> Any:
    """Takes device 0's copy of a pmap-replicated tree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)
