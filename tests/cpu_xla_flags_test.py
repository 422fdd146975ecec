"""simclr_jax.cpu.xla_flags and the 'auto' CPU convolution that depends on it."""

import json
import os
import subprocess
import sys

import pytest

from simclr_jax.cpu import xla_flags

_YNN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,+eltwise,+individual_dot"
_WIDTH = "--xla_cpu_prefer_vector_width=512"
_V = "0.10.2"  # the jaxlib the flags were validated on (independent of what is installed)


def test_apply_adds_recommended_flags_once():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    added = xla_flags.apply(env, avx512f=True, jaxlib_version=_V)
    assert added == [_YNN, _WIDTH]
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", _YNN, _WIDTH]
    # Idempotent: a second call (e.g. main.py under the test setup) adds nothing.
    assert xla_flags.apply(env, avx512f=True, jaxlib_version=_V) == []
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", _YNN, _WIDTH]


def test_add_flag_keeps_an_existing_setting():
    env = {}
    assert xla_flags.add_flag("xla_force_host_platform_device_count", "8", env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    assert not xla_flags.add_flag("xla_force_host_platform_device_count", "4", env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_apply_without_avx512_and_from_empty_environment():
    env = {}
    assert xla_flags.apply(env, avx512f=False, jaxlib_version=_V) == [_YNN]
    assert env["XLA_FLAGS"] == _YNN


def test_apply_keeps_the_users_value_and_can_be_disabled():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    assert xla_flags.apply(env, avx512f=True, jaxlib_version=_V) == [_WIDTH]
    assert env["XLA_FLAGS"].split() == [
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
        _WIDTH,
    ]
    env = {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}
    assert xla_flags.apply(env, avx512f=True, jaxlib_version=_V) == [_YNN]
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_prefer_vector_width=256", _YNN]
    env = {"XLA_FLAGS": "--foo=1", "SIMCLR_XLA_CPU_FLAGS": "0"}
    assert xla_flags.apply(env, avx512f=True, jaxlib_version=_V) == []
    assert env["XLA_FLAGS"] == "--foo=1"


def test_apply_only_for_the_validated_jaxlib():
    env = {"XLA_FLAGS": "--foo=1"}
    assert xla_flags.apply(env, avx512f=True, jaxlib_version="0.11.0") == []
    assert env["XLA_FLAGS"] == "--foo=1"
    assert xla_flags.apply(env, avx512f=False, jaxlib_version="0.10.2") == [_YNN]


def test_cpuinfo_detection(tmp_path):
    yes, no = tmp_path / "yes", tmp_path / "no"
    yes.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512bw\n")
    no.write_text("processor : 0\nflags : fpu sse2 avx2 avx512_bf16x\n")
    assert xla_flags._cpu_has_avx512f(str(yes))
    assert not xla_flags._cpu_has_avx512f(str(no))
    assert not xla_flags._cpu_has_avx512f(str(tmp_path / "missing"))


_PROBE = """
import json, os
import warnings
import jax
from simclr_jax.cpu import conv_class
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    auto = conv_class.resolve_choice("auto")
print(json.dumps({"own_kernel": conv_class.xla_uses_own_conv_kernel(), "auto": auto,
                  "warnings": [str(w.message) for w in caught],
                  "flags": os.environ.get("XLA_FLAGS", "")}))
"""


def _probe(xla_flags_env: str, apply_flags: bool, onednn_root: str | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags_env)
    env.pop("SIMCLR_XLA_CPU_FLAGS", None)
    if onednn_root is not None:
        env["SIMCLR_JAX_ONEDNN_ROOT"] = onednn_root
    code = "from simclr_jax.cpu import xla_flags; xla_flags.apply()\n" if apply_flags else ""
    code += _PROBE
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_auto_follows_the_flags_the_backend_started_with(tmp_path):
    """'auto' is oneDNN where it is usable; without it, one warning and the faster fallback for
    the flags the backend started with (the probe reads what XLA compiled)."""
    from simclr_jax.cpu import kernels

    with_flags = _probe("", apply_flags=True)
    assert _YNN in with_flags["flags"] and with_flags["own_kernel"]
    if kernels.available():
        assert with_flags["auto"] == "onednn" and with_flags["warnings"] == []
    missing = str(tmp_path / "no_onednn")
    fallback = _probe("", apply_flags=True, onednn_root=missing)
    assert fallback["auto"] == "xla"
    assert len(fallback["warnings"]) == 1 and missing in fallback["warnings"][0]
    # Convolutions sent to YNNPACK (jaxlib 0.10's default on this CPU; forced here so the case
    # does not depend on the CPU): im2col is the faster fallback, and 'auto' must see it.
    forced = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    without = _probe(forced, apply_flags=False, onednn_root=missing)
    assert without["flags"] == forced
    assert without == {**without, "own_kernel": False, "auto": "matmul"}
