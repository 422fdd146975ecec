"""Tests for finding, building and loading oneDNN's shim (simclr_jax.cpu.kernels.onednn) and
for the fallback when it cannot be used.

The finder and the build cache run against a fake oneDNN prefix and a fake compiler, so they
need neither oneDNN nor g++. Under SIMCLR_TESTS_REQUIRE_EXTRAS=1 (CI, which installs the
`cpu` extra) `test_onednn_is_usable_where_required` fails where oneDNN would not load, since
the tests that need it would otherwise skip.
"""

import os
import stat

import flax.linen as nn
import jax.numpy as jnp
import pytest
from optional_deps import REQUIRE_EXTRAS_ENV

from simclr_jax.cpu import conv_class, kernels
from simclr_jax.cpu.kernels import onednn


def test_onednn_is_usable_where_required():
    """Where CI installs the `cpu` extra (SIMCLR_TESTS_REQUIRE_EXTRAS=1), oneDNN must build and
    load, or every other test here would silently skip."""
    if os.environ.get(REQUIRE_EXTRAS_ENV) == "1":
        assert kernels.unavailable_reason() is None


def test_resolve_falls_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(onednn, "_load", lambda: "no C++ compiler found (test)")
    assert not kernels.available()
    with pytest.raises(ValueError, match="no C.. compiler found"):
        conv_class.resolve_choice("onednn", backend="cpu")
    with pytest.raises(ValueError, match="CPU library"):
        conv_class.resolve_choice("onednn", backend="gpu")
    # conftest applied simclr_jax.cpu.xla_flags: the fallback is XLA's own convolution.
    assert conv_class.xla_uses_own_conv_kernel()
    with pytest.warns(UserWarning, match="no C.. compiler found") as caught:
        assert conv_class.resolve_choice("auto", backend="cpu") == "xla"
    assert len(caught) == 1
    with pytest.warns(UserWarning, match="no C.. compiler found"):
        assert conv_class.conv_class("auto", backend="cpu").__mro__[1] is nn.Conv
    x = jnp.ones((1, 4, 4, 2))
    with pytest.raises(kernels.KernelUnavailableError, match="unavailable"):
        kernels.conv_backward_weights(x, jnp.ones((1, 4, 4, 16)), (3, 3), (1, 1), ((1, 1),) * 2)
    with pytest.raises(kernels.KernelUnavailableError, match="unavailable"):
        kernels.conv_forward(x, jnp.ones((3, 3, 2, 16)), (1, 1), ((1, 1),) * 2)


def _fake_onednn(root) -> str:
    """A prefix that looks like the oneDNN wheels' (version header and library file)."""
    (root / "include" / "oneapi" / "dnnl").mkdir(parents=True)
    (root / "include" / "oneapi" / "dnnl" / "dnnl_version.h").write_text(
        "#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 2\n"
    )
    (root / "lib").mkdir()
    (root / "lib" / "libdnnl.so.3").write_text("not a library")
    return str(root)


def test_finding_onednn_names_what_is_missing(tmp_path):
    with pytest.raises(kernels.KernelUnavailableError, match="headers not found.*pip install"):
        onednn._find_onednn(str(tmp_path))
    root = _fake_onednn(tmp_path / "prefix")
    include, library, _ = onednn._find_onednn(root)
    assert library == os.path.join(root, "lib", "libdnnl.so.3")
    header = tmp_path / "prefix" / "include" / "oneapi" / "dnnl" / "dnnl_version.h"
    header.write_text("#define DNNL_VERSION_MAJOR 2\n")
    with pytest.raises(kernels.KernelUnavailableError, match="not oneDNN 3"):
        onednn._find_onednn(root)
    os.unlink(os.path.join(root, "lib", "libdnnl.so.3"))
    with pytest.raises(kernels.KernelUnavailableError, match="library not found"):
        onednn._find_onednn(root)


def test_build_reports_compiler_errors_and_caches(monkeypatch, tmp_path):
    """A failing compiler gives KernelUnavailableError with its output; a good build is cached
    under a key of source, flags, compiler, jaxlib and oneDNN, and reused."""
    root = _fake_onednn(tmp_path / "prefix")
    fake = tmp_path / "fake-cxx"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo fake-cxx 1.0; exit 0; fi\n'
        'echo "error: no such thing" >&2; exit 1\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("SIMCLR_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(onednn.KernelUnavailableError, match="no such thing"):
        onednn._build(str(fake), root)
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".so")]

    # A compiler that writes its output file (the argument after -o): built once, then cached.
    calls = tmp_path / "calls"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo fake-cxx 1.0; exit 0; fi\n'
        f'echo "$@" >> "{calls}"\n'
        'while [ "$#" -gt 0 ]; do if [ "$1" = "-o" ]; then echo lib > "$2"; fi; shift; done\n'
    )
    first = onednn._build(str(fake), root)
    assert os.path.dirname(first) == str(tmp_path / "cache") and os.path.exists(first)
    assert onednn._build(str(fake), root) == first
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 and f"-Wl,--disable-new-dtags,-rpath,{root}/lib" in lines[0]
    # Another oneDNN (here: another version header) is another build.
    header = tmp_path / "prefix" / "include" / "oneapi" / "dnnl" / "dnnl_version.h"
    header.write_text(header.read_text() + "#define DNNL_VERSION_PATCH 1\n")
    assert onednn._build(str(fake), root) != first
