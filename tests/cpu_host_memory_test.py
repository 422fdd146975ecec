"""simclr_jax.cpu.host_memory: when the malloc policy holds, and that XLA:CPU then reuses memory.

The behaviour test runs a jitted program whose 256 MiB intermediates live in XLA's per-execution
temporary buffer, in a fresh process (the policy must be set before threads start), and counts
the minor page faults of its later executions: without the policy every execution faults the
buffer in anew (at least 65,536 4 KiB pages), with it the pages are reused; once the watchdog
trips, the free heap goes back to the kernel and the faults return.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from simclr_jax.cpu import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _env(**overrides: str) -> dict[str, str]:
    env = {"JAX_PLATFORMS": "cpu"}
    env.update(overrides)
    return env


@pytest.mark.skipif(not GLIBC, reason="the policy is for glibc's malloc")
def test_policy_applies_on_the_cpu_backend():
    assert host_memory.skip_reason(_env()) is None


@pytest.mark.parametrize(
    "env, reason",
    [
        (_env(SIMCLR_CPU_MALLOC="0"), "SIMCLR_CPU_MALLOC=0"),
        (_env(SIMCLR_CPU_MALLOC="off"), "SIMCLR_CPU_MALLOC=off"),
        (_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"), "GLIBC_TUNABLES"),
        (_env(MALLOC_ARENA_MAX="2"), "MALLOC_ARENA_MAX is set"),
        (_env(MALLOC_TRIM_THRESHOLD_="0"), "MALLOC_TRIM_THRESHOLD_ is set"),
        (_env(LD_PRELOAD="/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"), "LD_PRELOAD"),
        (_env(JAX_PLATFORMS="cuda"), "accelerator"),
        (_env(JAX_PLATFORMS="tpu,cpu"), "accelerator"),
    ],
)
def test_policy_is_skipped(env, reason):
    # (apply() in this process would report the policy conftest set; the subprocess test below
    # checks that SIMCLR_CPU_MALLOC=0 keeps apply() from setting anything.)
    assert reason in (host_memory.skip_reason(env) or "")


def test_glibc_tunables_of_other_subsystems_do_not_skip():
    env = _env(GLIBC_TUNABLES="glibc.cpu.hwcap_mask=0")
    assert host_memory.skip_reason(env) in (None, "not glibc")


# Runs a program with 256 MiB intermediates (dot outputs that a transpose and a reduction keep
# from fusing away) twice, optionally drops the RSS cap to 1 byte (the watchdog's next check
# trips), then counts the minor page faults of three more executions and reads the RSS.
_PROBE = r"""
import json, resource, sys, time
from simclr_jax.cpu import host_memory
applied = host_memory.apply()
import jax, jax.numpy as jnp
a = jnp.ones((4096, 64), jnp.float32)
b = jnp.ones((64, 16384), jnp.float32)
f = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b) * jnp.tanh(a @ b + 1.0).T.sum(), axis=0))
for _ in range(2):
    f(a, b).block_until_ready()
rss_warm = host_memory.rss_bytes()
policy_warm = host_memory.policy()
trip = sys.argv[1] == "trip"
if trip:
    host_memory._state["budget"] = 1
time.sleep(3 * host_memory.WATCH_INTERVAL_S)  # the watchdog's turn (and one trim)
rss_after = host_memory.rss_bytes()
faults = 0
for _ in range(3):
    if trip:  # after a trip, free pages go back once a second: let each call find them gone
        time.sleep(1.5 * host_memory.WATCH_INTERVAL_S)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({
    "applied": applied, "policy": host_memory.policy(), "policy_warm": policy_warm,
    "faults_per_call": faults / 3, "rss_warm": rss_warm, "rss_after": rss_after,
}))
"""
PAGES = 4096 * 16384 * 4 // 4096  # one 256 MiB intermediate, in 4 KiB pages


def _probe(policy: str, mode: str = "", tunables: str | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", SIMCLR_CPU_MALLOC=policy)
    for name in ("GLIBC_TUNABLES", "XLA_FLAGS", "LD_PRELOAD", host_memory.BUDGET_ENV):
        env.pop(name, None)  # glibc's malloc, one device, no RSS cap
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    for name in [name for name in env if name.startswith("MALLOC_")]:
        env.pop(name)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if policy != "0" and result["applied"] and result["policy_warm"] != "reuse":
        pytest.skip("the watchdog tripped on its own: memory is short on this machine")
    return result


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


needs_glibc = pytest.mark.skipif(not GLIBC, reason="the policy is for glibc's malloc")


@needs_glibc
def test_xla_reuses_its_temporary_buffer_under_the_policy():
    with_policy = _probe("1")
    assert with_policy["applied"] and with_policy["policy"] == "reuse", with_policy
    # The same heap pages every call.
    assert with_policy["faults_per_call"] < 0.05 * PAGES, with_policy
    without = _probe("0")
    assert not without["applied"] and without["policy"] == "default", without
    if not _thp_always():  # with THP 'always', a fresh mmap faults in 2 MiB pages
        # glibc's default: the buffer is a fresh mmap every call, faulted in page by page.
        assert without["faults_per_call"] > 0.5 * PAGES, without


@needs_glibc
def test_the_policy_as_glibc_tunables_lets_xla_reuse_its_buffer():
    # The value compare.sh hands PyTorch: glibc ignores a tunable it does not accept, so check
    # its effect. With GLIBC_TUNABLES set, apply() stands back and the tunables alone act.
    tuned = _probe("1", tunables=host_memory.glibc_tunables())
    assert not tuned["applied"] and tuned["policy"] == "default", tuned
    assert tuned["faults_per_call"] < 0.05 * PAGES, tuned
    # Also where THP 'always' makes fresh mmaps fault few pages: the heap keeps the freed
    # intermediates resident, glibc's default unmaps them.
    without = _probe("0")
    assert tuned["rss_after"] > without["rss_after"] + 0.5 * PAGES * 4096, (tuned, without)


@needs_glibc
def test_over_budget_the_watchdog_restores_glibc_defaults_and_returns_memory():
    result = _probe("1", "trip")
    assert result["applied"] and result["policy"] == "over budget", result
    # The free heap went back to the kernel (the 256 MiB intermediates were in it) ...
    assert result["rss_after"] < result["rss_warm"] - 0.5 * PAGES * 4096, result
    # ... and later calls fault their buffers in again, as without the policy.
    if not _thp_always():
        assert result["faults_per_call"] > 0.5 * PAGES, result


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_budget_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=host_memory.BUDGET_ENV):
        host_memory.budget_bytes({host_memory.BUDGET_ENV: value})


def test_budget_is_unset_by_default():
    assert host_memory.budget_bytes({}) is None
    assert host_memory.budget_bytes({host_memory.BUDGET_ENV: "1.5"}) == int(1.5 * 2**30)


_MEMINFO = "MemTotal:       16000000 kB\nMemFree:  1000 kB\nMemAvailable:    6000000 kB\n"
_MACHINE = (6_000_000 * 1024, 16_000_000 * 1024)


@pytest.mark.parametrize(
    "cgroup_max, cgroup_current, cgroup_stat, expected",
    [
        (None, None, None, _MACHINE),  # no cgroup files: the machine's
        ("max\n", "123\n", None, _MACHINE),  # a cgroup without a limit
        ("68719476736\n", "0\n", None, _MACHINE),  # a limit above the machine's memory
        ("4294967296\n", "1073741824\n", None, (3 * 2**30, 4 * 2**30)),  # a lower limit
        ("4294967296\n", "5000000000\n", None, (0, 4 * 2**30)),  # past its limit
        # Inactive page cache is reclaimable: not counted as used.
        (
            "4294967296\n",
            "3221225472\n",
            "anon 1073741824\ninactive_file 2147483648\nactive_file 0\n",
            (3 * 2**30, 4 * 2**30),
        ),
    ],
)
def test_memory_headroom(cgroup_max, cgroup_current, cgroup_stat, expected):
    assert (
        host_memory.memory_headroom(_MEMINFO, cgroup_max, cgroup_current, cgroup_stat) == expected
    )


def test_memory_headroom_needs_memtotal():
    with pytest.raises(ValueError, match="MemTotal"):
        host_memory.memory_headroom("MemFree: 1000 kB\n")


def test_the_tightest_cgroup_limit_over_the_process_counts(monkeypatch):
    files = {
        "/proc/self/cgroup": "0::/job_1/step_0/task\n",
        "/sys/fs/cgroup/memory.max": None,  # the root has no memory.max
        "/sys/fs/cgroup/job_1/memory.max": "4294967296\n",
        "/sys/fs/cgroup/job_1/memory.current": "1073741824\n",
        "/sys/fs/cgroup/job_1/memory.stat": "inactive_file 0\n",
        "/sys/fs/cgroup/job_1/step_0/memory.max": "max\n",
        "/sys/fs/cgroup/job_1/step_0/task/memory.max": "8589934592\n",
    }
    monkeypatch.setattr(host_memory, "_read", files.get)
    assert host_memory._cgroup_files() == ("4294967296\n", "1073741824\n", "inactive_file 0\n")
    files["/sys/fs/cgroup/job_1/memory.max"] = "max\n"
    assert host_memory._cgroup_files()[0] == "8589934592\n"
    files["/sys/fs/cgroup/job_1/step_0/task/memory.max"] = "max\n"
    assert host_memory._cgroup_files() == (None, None, None)
