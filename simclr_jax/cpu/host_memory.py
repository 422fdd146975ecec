"""glibc malloc settings that let XLA:CPU reuse its per-step buffer instead of faulting it anew.

XLA:CPU runs a compiled program with one temporary buffer holding all its intermediate values
(for the ResNet-18 CIFAR train step at batch 256: 1.2 GB at width 16, several GB at width 64),
allocated with posix_memalign when an execution starts and freed when it ends. The allocating
thread is one of XLA's workers, and glibc gives each such thread its own arena, whose heaps are
at most 64 MB: a larger request falls back to a fresh mmap whatever M_MMAP_THRESHOLD says, and
free unmaps it. So every step the kernel faults the whole buffer in again, 4 KiB at a time, and
zeroes it: 313,000 minor page faults and about 0.6 CPU-seconds of system time per width-16
step on the 2-core machine of docs/performance.md, where the step takes about 1.3 s on two
cores.

`apply()` sets, through mallopt(3) (glibc only), before any other thread exists:

- M_ARENA_MAX = 1: every thread allocates from the main arena, whose heap grows with brk and
  can hold the buffer;
- M_MMAP_MAX = 0: no allocation is served by its own mmap;
- M_TRIM_THRESHOLD = SIZE_MAX: free memory at the top of the heap is kept, not returned to the
  kernel, so the next step's buffer lands on pages that are already mapped.

The cost is memory: the process keeps its peak heap, and it settles at about three step
buffers (a step allocates its buffer before the previous step's is freed, and small
allocations split the free ones): the width-16 step's process grew from 2.0 to 4.3 GiB over
its first 3 steps and stayed there; the width-64 one reached 10.7-20.4 GB with no watchdog
(5.9 GB without the policy), 10.7-15.6 GB with it. So a
watchdog thread checks memory every second and, once the machine (or the tightest cgroup v2
limit over the process) has less than a quarter of its memory available, or the process's RSS passes
SIMCLR_CPU_MALLOC_BUDGET_GB where that is set, or the check itself fails, restores glibc's mmap
and trim defaults, logs one warning with the figures, and from then on returns the heap's free
pages every second (malloc_trim): the run goes on at about the default speed. The single arena
stays (threads keep their arena), and so does a fixed mmap threshold (glibc's dynamic one is off
after any of these mallopt calls). Also: all threads share one arena's lock (compiling the train
step took about 1.5 s longer), and the settings hold for the whole process (the input
pipeline's allocations included). Figures:
docs/performance.md ("Host memory: reusing XLA's step buffer").

Only for the CPU backend: nothing is set when JAX_PLATFORMS names another platform first or an
accelerator plugin (CUDA, ROCm, TPU) is installed and JAX_PLATFORMS does not ask for 'cpu' (set
JAX_PLATFORMS=cpu on a machine with a plugin but no accelerator), when SIMCLR_CPU_MALLOC=0, when
the user chose malloc settings (a glibc.malloc tunable in GLIBC_TUNABLES, a MALLOC_* variable,
a preloaded jemalloc/tcmalloc/mimalloc), or off glibc. Like `xla_flags.apply()`, call it first
thing, before jax, TensorFlow or anything else starts threads: an arena a thread already owns
keeps serving it.
"""

import ctypes
import importlib.util
import logging
import os
import platform
import threading
import time

DISABLE_ENV = "SIMCLR_CPU_MALLOC"
BUDGET_ENV = "SIMCLR_CPU_MALLOC_BUDGET_GB"
# The watchdog restores glibc's defaults once less than this share of the memory (the machine's,
# or the cgroup's limit where lower) is available.
MIN_AVAILABLE_FRACTION = 0.25
WATCH_INTERVAL_S = 1.0

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# mallopt's value is an int; glibc converts it to size_t for the trim threshold, so -1 means
# SIZE_MAX: never trim.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# The same parameters as glibc tunables (GLIBC_TUNABLES=glibc.malloc.NAME=VALUE:...).
TUNABLE_PREFIX = "glibc.malloc."
_TUNABLE_NAMES = {
    M_ARENA_MAX: "arena_max",
    M_MMAP_MAX: "mmap_max",
    M_TRIM_THRESHOLD: "trim_threshold",
}
# glibc's defaults (malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD), restored over budget.
# Not restored: the single arena (threads keep the arena they have) and the dynamic mmap
# threshold (any mallopt of these turns it off for good).
DEFAULTS = ((M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024))

# policy: 'default', 'reuse' or 'over budget'; budget: the RSS cap in bytes or None (read by
# the watchdog at every check).
_state: dict = {"policy": "default", "budget": None}

# Modules whose presence means jax will pick an accelerator backend by default.
_ACCELERATOR_MODULES = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)
# glibc's older malloc environment variables (MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_, ...,
# mallopt(3)) start with this; one set means the user chose.
_MALLOC_ENV_PREFIX = "MALLOC_"
# Allocators that replace glibc's malloc when preloaded; mallopt would not reach them.
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _accelerator_expected(environ: dict[str, str]) -> bool:
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES)


def skip_reason(environ: dict[str, str] | None = None) -> str | None:
    """Why `apply` would set nothing here, or None if it would set the policy.

    Args:
      environ: the environment to read (default os.environ).
    """
    environ = os.environ if environ is None else environ
    disable = environ.get(DISABLE_ENV, "1").strip().lower()
    if disable in ("0", "false", "no", "off"):
        return f"{DISABLE_ENV}={disable}"
    if _accelerator_expected(environ):
        return "an accelerator backend is expected (JAX_PLATFORMS or an installed plugin)"
    if TUNABLE_PREFIX in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc tunables"
    chosen = sorted(name for name in environ if name.startswith(_MALLOC_ENV_PREFIX))
    if chosen:
        return f"{chosen[0]} is set"
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _PRELOADED_ALLOCATORS):
        return "another allocator is preloaded (LD_PRELOAD)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def glibc_tunables() -> str:
    """The policy as a GLIBC_TUNABLES value, for a process that should run with it from its start.

    For like-for-like comparisons: benchmarks/compare.sh runs PyTorch with it when
    TORCH_MALLOC=policy. It comes without the watchdog: nothing hands memory back when it gets
    short. glibc ignores unknown or out-of-range tunables without a word, so
    tests/cpu_host_memory_test.py checks that XLA reuses its buffer under this value alone.

    Returns:
      'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=N', built
      from `SETTINGS`: N = SIZE_MAX bytes (mallopt's -1 read as size_t, as glibc does).
    """
    return ":".join(
        f"{TUNABLE_PREFIX}{_TUNABLE_NAMES[param]}={ctypes.c_size_t(value).value}"
        for param, value in SETTINGS
    )


def budget_bytes(environ: dict[str, str] | None = None) -> int | None:
    """The RSS cap SIMCLR_CPU_MALLOC_BUDGET_GB sets, in bytes; None where it is unset.

    Raises:
      ValueError: SIMCLR_CPU_MALLOC_BUDGET_GB is not a positive number.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(BUDGET_ENV, "").strip()
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ValueError(f"{BUDGET_ENV}={value!r}: expected a positive number of GiB.")
    return int(gib * 2**30)


def memory_headroom(
    meminfo: str,
    cgroup_max: str | None = None,
    cgroup_current: str | None = None,
    cgroup_stat: str | None = None,
) -> tuple[int, int]:
    """(available, total) bytes from /proc/meminfo's text and the process's cgroup v2 files.

    Args:
      meminfo: the text of /proc/meminfo (MemTotal and MemAvailable, in kB).
      cgroup_max: the text of the cgroup's memory.max ('max' or bytes); None if unreadable.
      cgroup_current: the text of its memory.current (bytes); None if unreadable.
      cgroup_stat: the text of its memory.stat; its inactive_file (page cache the kernel
        reclaims first) does not count as used. None if unreadable.

    Returns:
      The available and total bytes; the cgroup's limit and use where the limit is lower.

    Raises:
      ValueError: meminfo has no MemTotal line.
    """
    fields = {}
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if rest.split():
            fields[name.strip()] = int(rest.split()[0]) * 1024
    if "MemTotal" not in fields:
        raise ValueError("/proc/meminfo has no MemTotal line.")
    total, available = fields["MemTotal"], fields.get("MemAvailable", fields["MemTotal"])
    if cgroup_max is not None and cgroup_max.strip().isdigit() and int(cgroup_max) < total:
        limit = int(cgroup_max)
        used = int(cgroup_current) if cgroup_current and cgroup_current.strip().isdigit() else 0
        for line in (cgroup_stat or "").splitlines():
            name, _, value = line.partition(" ")
            if name == "inactive_file" and value.strip().isdigit():
                used -= int(value)
        total, available = limit, min(available, max(limit - max(used, 0), 0))
    return available, total


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cgroup_files() -> tuple[str | None, str | None, str | None]:
    """memory.max, memory.current and memory.stat of the cgroup v2 level with the lowest limit.

    Walks from the process's own cgroup (/proc/self/cgroup's '0::' line) up to the root: a
    limit often sits on a parent (a Slurm job above its steps, a container above its
    processes). (None, None, None) where no level has a numeric memory.max.
    """
    root = "/sys/fs/cgroup"
    own = next(
        (
            line[3:].strip().strip("/")
            for line in (_read("/proc/self/cgroup") or "").splitlines()
            if line.startswith("0::")
        ),
        "",
    )
    best, best_limit = None, None
    parts = own.split("/") if own else []
    for depth in range(len(parts), -1, -1):
        path = os.path.join(root, *parts[:depth])
        limit = (_read(os.path.join(path, "memory.max")) or "").strip()
        if limit.isdigit() and (best_limit is None or int(limit) < best_limit):
            best, best_limit = path, int(limit)
    if best is None:
        return None, None, None
    return tuple(
        _read(os.path.join(best, name)) for name in ("memory.max", "memory.current", "memory.stat")
    )


def _memory_short() -> str | None:
    """Why memory is short (a message with the figures), or None."""
    budget = _state["budget"]
    rss = rss_bytes()
    if budget is not None and rss > budget:
        return f"the process's RSS {rss / 2**30:.1f} GiB passed {BUDGET_ENV}={budget / 2**30:g}"
    available, total = memory_headroom(_read("/proc/meminfo") or "", *_cgroup_files())
    if available < MIN_AVAILABLE_FRACTION * total:
        return (
            f"{available / 2**30:.1f} of {total / 2**30:.1f} GiB available (under "
            f"{MIN_AVAILABLE_FRACTION:.0%}; the process's RSS {rss / 2**30:.1f} GiB)"
        )
    return None


def policy() -> str:
    """'reuse' while the policy holds, 'over budget' once the watchdog restored glibc's
    defaults, 'default' if `apply` set nothing."""
    return _state["policy"]


def _libc():
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watch(libc) -> None:
    try:
        while (reason := _memory_short()) is None:
            time.sleep(WATCH_INTERVAL_S)
    except Exception as error:  # noqa: BLE001 (unguarded reuse is the one outcome to avoid)
        reason = f"the memory check failed ({error!r})"
    for param, value in DEFAULTS:
        libc.mallopt(param, value)
    _state["policy"] = "over budget"
    logging.getLogger(__name__).warning(
        "%s: XLA's step buffers are no longer kept between steps (glibc's mmap and trim "
        "defaults restored, free heap returned every second; slower on CPU).",
        reason,
    )
    # Step buffers freed into the heap before the trip would be reused (and stay resident)
    # by later steps: hand their free pages back from now on.
    while True:
        libc.malloc_trim(0)
        time.sleep(WATCH_INTERVAL_S)


def apply(environ: dict[str, str] | None = None) -> bool:
    """Sets the malloc policy above for this process unless `skip_reason` says not to.

    Also starts the watchdog (a daemon thread) that restores glibc's defaults once memory gets
    short (module docstring).

    Args:
      environ: the environment to read (default os.environ).

    Returns:
      Whether the policy was set (every mallopt call accepted).

    Raises:
      ValueError: SIMCLR_CPU_MALLOC_BUDGET_GB is not a positive number.
    """
    if _state["policy"] != "default":
        return _state["policy"] == "reuse"  # set already (one watchdog per process)
    if skip_reason(environ) is not None:
        return False
    _state["budget"] = budget_bytes(environ)
    libc = _libc()
    if not all([libc.mallopt(param, value) == 1 for param, value in SETTINGS]):
        # No half-set policy without its watchdog. (An accepted M_ARENA_MAX stays, and glibc's
        # dynamic mmap threshold stays off: mallopt cannot undo either.)
        for param, value in DEFAULTS:
            libc.mallopt(param, value)
        return False
    _state["policy"] = "reuse"
    threading.Thread(
        target=_watch, args=(libc,), name="simclr_jax-malloc-budget", daemon=True
    ).start()
    return True
