"""simclr_jax.cpu.host_memory: when the malloc policy holds, and that XLA:CPU then reuses memory.

The behaviour test runs a jitted program whose 256 MiB intermediates live in XLA's per-execution
temporary buffer, in a fresh process (the policy must be set before threads start), and counts
the minor page faults of its later executions: without the policy every execution faults the
buffer in anew (at least 65,536 4 KiB pages), with it the pages are reused.
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
        (_env(SIMCLR_CPU_MALLOC="off"), "SIMCLR_CPU_MALLOC=0"),
        (_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"), "GLIBC_TUNABLES"),
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


# Counts the minor page faults of the 3rd-5th executions of a program with 256 MiB
# intermediates (dot outputs that a transpose and a reduction keep from fusing away).
_PROBE = r"""
import json, os, resource, sys, time
from simclr_jax.cpu import host_memory
applied = host_memory.apply()
import jax, jax.numpy as jnp
a = jnp.ones((4096, 64), jnp.float32)
b = jnp.ones((64, 16384), jnp.float32)
f = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b) * jnp.tanh(a @ b + 1.0).T.sum(), axis=0))
for _ in range(2):
    f(a, b).block_until_ready()
time.sleep(2 * host_memory.WATCH_INTERVAL_S)  # the watchdog's turn
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(a, b).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": applied, "faults_per_call": faults, "policy": host_memory.policy()}))
"""


def _faults_per_call(policy: str, budget_gb: str = "") -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", SIMCLR_CPU_MALLOC=policy)
    env[host_memory.BUDGET_ENV] = budget_gb
    env.pop("GLIBC_TUNABLES", None)
    env.pop("XLA_FLAGS", None)  # one device is enough
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the policy is for glibc's malloc")
def test_xla_reuses_its_temporary_buffer_under_the_policy():
    pages = 4096 * 16384 * 4 // 4096  # one 256 MiB intermediate, in 4 KiB pages
    without = _faults_per_call("0")
    with_policy = _faults_per_call("1")
    assert not without["applied"] and with_policy["applied"]
    # glibc's default: the buffer is a fresh mmap every call, faulted in page by page.
    assert without["faults_per_call"] > 0.5 * pages, without
    # The policy: the same heap pages every call.
    assert with_policy["faults_per_call"] < 0.05 * pages, with_policy
    assert with_policy["policy"] == "reuse"


@pytest.mark.skipif(not GLIBC, reason="the policy is for glibc's malloc")
def test_over_budget_the_watchdog_restores_glibc_defaults():
    pages = 4096 * 16384 * 4 // 4096
    # An RSS cap of 10 MiB: far below what the process holds once jax is up.
    result = _faults_per_call("1", budget_gb="0.01")
    assert result["applied"] and result["policy"] == "over budget", result
    assert result["faults_per_call"] > 0.5 * pages, result


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_budget_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=host_memory.BUDGET_ENV):
        host_memory.budget_bytes({host_memory.BUDGET_ENV: value})


def test_budget_is_unset_by_default():
    assert host_memory.budget_bytes({}) is None
    assert host_memory.budget_bytes({host_memory.BUDGET_ENV: "1.5"}) == int(1.5 * 2**30)


_MEMINFO = "MemTotal:       16000000 kB\nMemFree:  1000 kB\nMemAvailable:    6000000 kB\n"


@pytest.mark.parametrize(
    "cgroup_max, cgroup_current, expected",
    [
        (None, None, (6_000_000 * 1024, 16_000_000 * 1024)),  # no cgroup file: the machine's
        ("max\n", "123\n", (6_000_000 * 1024, 16_000_000 * 1024)),  # cgroup without a limit
        ("4294967296\n", "1073741824\n", (3 * 2**30, 4 * 2**30)),  # the limit is lower
        ("4294967296\n", "5000000000\n", (0, 4 * 2**30)),  # past its limit: nothing left
        ("68719476736\n", "0\n", (6_000_000 * 1024, 16_000_000 * 1024)),  # higher limit
    ],
)
def test_memory_headroom(cgroup_max, cgroup_current, expected):
    assert host_memory.memory_headroom(_MEMINFO, cgroup_max, cgroup_current) == expected
