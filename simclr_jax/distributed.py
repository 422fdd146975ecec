"""Multi-host start-up: one jax.distributed.initialize call for TPU pods, GPU clusters and CPU.

Also the two things a multi-process run needs afterwards: a barrier after
compiling (compile_then_barrier) and which rows of a global batch this process
supplies (process_batch_rows).

Where the settings come from, first match wins:
1. explicit arguments (main.py's --coordinator_address, --num_processes, --process_id);
2. SIMCLR_COORDINATOR_ADDRESS, SIMCLR_NUM_PROCESSES, SIMCLR_PROCESS_ID;
3. SLURM (srun): SLURM_PROCID, SLURM_NTASKS, and the coordinator on the first
   host of SLURM_JOB_NODELIST at port SIMCLR_COORDINATOR_PORT (default 12355);
4. a Cloud TPU VM (TPU_* environment or /dev/accel*, /dev/vfio): JAX finds the
   pod's workers itself, so jax.distributed.initialize() is called without
   arguments;
5. none of these: a single process, nothing to initialise.

Why the reachability check: when a worker cannot reach the coordinator, JAX
aborts the whole process from C++ (SIGABRT) with a message that does not name
the address. Non-coordinator processes therefore first poll the coordinator's
TCP port for at most the timeout and raise a Python error naming it.

This must run before anything touches devices (jax.devices(), any jit), which is
why main.py calls it first.
"""

import dataclasses
import os
import re
import socket
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from simclr_jax import sharding
from simclr_jax.config_checks import ConfigError

DEFAULT_TIMEOUT_S = 300
DEFAULT_SLURM_PORT = 12355
ENV_ADDRESS = "SIMCLR_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SIMCLR_NUM_PROCESSES"
ENV_PROCESS_ID = "SIMCLR_PROCESS_ID"
ENV_PORT = "SIMCLR_COORDINATOR_PORT"
# Set on Cloud TPU VMs by the runtime image; any one of them means "TPU VM".
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID", "TPU_NAME")


class CoordinatorUnreachableError(ConnectionError):
    """The coordinator did not accept connections within the timeout."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins the job. mode: 'explicit', 'slurm', 'tpu' or 'single'."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[03-05,9],cpu1' -> 'gpu03').

    Args:
      nodelist: SLURM_JOB_NODELIST in its compressed form.

    Returns:
      The first hostname, zero padding kept.
    """
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]+)\]([^,\s]*))?", nodelist or "")
    if not match:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM node list")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    return prefix + first + suffix


def _int(value, name: str, minimum: int) -> int:
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name}={value!r} is not an integer; expected one >= {minimum}"
        ) from None
    if result < minimum:
        raise ConfigError(f"{name}={result} is out of range; expected an integer >= {minimum}")
    return result


def _check_address(address: str, name: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={address!r} is not 'host:port' (e.g. 10.0.0.2:12355)")
    return address


def is_tpu_vm(env: Mapping[str, str] | None = None) -> bool:
    """Whether this looks like a Cloud TPU VM (TPU runtime environment or TPU device files)."""
    env = os.environ if env is None else env
    if any(env.get(k) for k in _TPU_ENV_VARS):
        return True
    return os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio/0")


def resolve_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Decides how this process joins the job (see the module docstring for the order).

    Args:
      coordinator_address: 'host:port' of process 0's coordinator, or None/''.
      num_processes: total processes, or None/0 to take it from the environment.
      process_id: this process's rank, or None/-1 to take it from the environment.
      env: the environment (default os.environ).

    Returns:
      The Settings.

    Raises:
      ValueError: an incomplete or inconsistent combination, naming the value.
    """
    env = os.environ if env is None else env
    address = coordinator_address or env.get(ENV_ADDRESS) or None
    count = num_processes if num_processes else env.get(ENV_NUM_PROCESSES) or None
    rank = process_id if process_id is not None and process_id >= 0 else None
    if rank is None:
        rank = env.get(ENV_PROCESS_ID) or None

    if address or count is not None or rank is not None:
        if address is None or count is None or rank is None:
            raise ConfigError(
                "a multi-process run needs all three of coordinator_address, num_processes and "
                f"process_id (flags or {ENV_ADDRESS}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); got "
                f"coordinator_address={address!r}, num_processes={count!r}, process_id={rank!r}"
            )
        return _explicit("explicit", address, count, rank)

    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        port = _int(env.get(ENV_PORT, DEFAULT_SLURM_PORT), ENV_PORT, 1)
        host = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        return _explicit("slurm", f"{host}:{port}", env["SLURM_NTASKS"], env["SLURM_PROCID"])

    if is_tpu_vm(env):
        return Settings(mode="tpu")
    return Settings(mode="single")


def _explicit(mode: str, address, count, rank) -> Settings:
    address = _check_address(str(address), "coordinator_address")
    count = _int(count, "num_processes", 1)
    rank = _int(rank, "process_id", 0)
    if rank >= count:
        raise ConfigError(f"process_id={rank} is out of range for num_processes={count}")
    return Settings(mode, address, count, rank)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls the coordinator's TCP port until it accepts a connection.

    Args:
      address: 'host:port'.
      timeout_s: give up after this many seconds.

    Raises:
      CoordinatorUnreachableError: naming the address, when the time is up.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last_error = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(remaining, 5)):
                return
        except OSError as e:  # refused, unresolvable or timed out: the coordinator is not up yet
            last_error = e
        time.sleep(min(0.5, max(remaining, 0)))
    raise CoordinatorUnreachableError(
        f"could not reach the JAX coordinator at {address} within {timeout_s:g}s "
        f"(last error: {last_error}). Check that process 0 is running, that the address "
        "and port are right and that the firewall allows it."
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Joins the multi-process job if there is one; a no-op for a single process.

    Call before anything touches devices. On CPU (JAX_PLATFORMS=cpu or unset),
    multi-process collectives use gloo: the default CPU backend has none across
    processes.

    Args:
      coordinator_address: 'host:port' of the coordinator (process 0), or None.
      num_processes: total number of processes, or None.
      process_id: this process's rank, or None.
      timeout_s: how long to wait for every process to join (seconds).
      env: the environment (default os.environ).

    Returns:
      The Settings used.

    Raises:
      ValueError: bad or incomplete settings.
      CoordinatorUnreachableError: the coordinator did not answer in time.
    """
    timeout_s = _int(timeout_s, "timeout_s", 1)
    settings = resolve_settings(coordinator_address, num_processes, process_id, env)
    if settings.mode == "single":
        return settings
    if settings.mode == "tpu":
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return settings
    if settings.num_processes > 1 and _platforms(env) in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    print(
        f"joining the JAX job at {settings.coordinator_address} as process "
        f"{settings.process_id} of {settings.num_processes} ({settings.mode}, "
        f"timeout {timeout_s}s)",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    if settings.process_id != 0:
        wait_for_coordinator(settings.coordinator_address, timeout_s)
    remaining = max(1, int(timeout_s - (time.monotonic() - start)))
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=remaining,
    )
    return settings


def _platforms(env: Mapping[str, str] | None) -> str:
    env = os.environ if env is None else env
    return (env.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").strip().lower()


def compile_then_barrier(fn, name: str, *args, timeout_s: int = DEFAULT_TIMEOUT_S):
    """Compiles `fn` for `args` ahead of time, then waits until every process has too.

    Hosts finish compiling at different times; the first collective of a host
    that finished early would wait for the others inside the collective
    library (gloo on CPU), whose timeout is short. The coordination service's
    barrier waits up to `timeout_s` instead. A no-op barrier for one process.

    Args:
      fn: a jax.jit or jax.pmap function.
      name: the barrier's name (the same on every process, used once per run).
      *args: example arguments (shapes, dtypes and shardings of the real call).
      timeout_s: how long to wait for the slowest process.

    Returns:
      The compiled function, called like `fn`.
    """
    compiled = fn.lower(*args).compile()
    if jax.process_count() > 1:
        # Not jax.experimental.multihost_utils.sync_global_devices: that is a
        # compiled all-gather over every device, i.e. itself a gloo collective
        # with gloo's short timeout, the very thing this barrier avoids. jax has
        # no public barrier on the coordination service; orbax exports one (the
        # service's wait_at_barrier, with a timeout). Imported here because
        # importing orbax is slow and this module runs before anything else.
        from orbax.checkpoint import multihost as ocp_multihost

        ocp_multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
    return compiled


def process_batch_rows(mesh, global_batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process supplies, in local-batch order.

    sharding.make_global_batch (jax.make_array_from_process_local_data, batch
    sharded over the mesh's data axis) fills this process's devices from its
    local batch in ascending global-row order, so these are the global rows of
    local rows 0, 1, ... . On a mesh that lists each process's devices together
    and in process order (jax.devices() on CPU, tested; GPU clusters number
    devices the same way) process p gets the block [p*b, (p+1)*b); a mesh that
    interleaves processes (possible on TPU pods, whose device order follows the
    chip topology) gives other rows. Pass the result to the pipeline's
    batch_rows so the data order follows the mesh.

    Args:
      mesh: the training mesh (sharding.create_mesh).
      global_batch_size: the global batch, divisible by the mesh size.

    Returns:
      An int64 array of global_batch_size / process_count row indices.
    """
    placement = sharding.batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    blocks = sorted({index[0].indices(global_batch_size)[:2] for index in placement.values()})
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in blocks])
