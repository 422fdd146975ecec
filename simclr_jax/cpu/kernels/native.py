"""conv_kernels.cc as XLA:CPU FFI targets: a convolution and its kernel gradient.

The source is compiled with the system C++ compiler ($CXX, else g++ or c++) the first time a
process needs it, into $SIMCLR_JAX_KERNEL_CACHE (default $XDG_CACHE_HOME/simclr_jax/kernels,
i.e. ~/.cache/simclr_jax/kernels), under a name that hashes the source, the flags, the
compiler's version and jaxlib's version. Later processes load the cached library in
milliseconds; concurrent first builds (e.g. pytest-xdist workers) each write a temporary file
and rename it into place, so they cannot corrupt each other.

It needs Linux on x86-64 with AVX-512F, a C++17 compiler and jaxlib's FFI headers
(jax.ffi.include_dir()). Where anything is missing, `available()` is False and
`unavailable_reason()` says what; the 'auto' CPU convolution then keeps XLA's own kernel
gradient (simclr_jax.cpu.conv_class).
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv_kernels.cc")
GRAD_TARGET = "simclr_jax_conv_kernel_grad"
FORWARD_TARGET = "simclr_jax_conv_forward"
CXXFLAGS = ("-O3", "-mavx512f", "-mfma", "-std=c++17", "-shared", "-fPIC")
# The kernel's vector width in float32 lanes: the output-channel count must be a multiple.
LANES = 16


class KernelUnavailableError(RuntimeError):
    """The native kernel cannot be built or loaded on this machine."""


def cache_dir() -> str:
    """Where compiled kernels are kept: $SIMCLR_JAX_KERNEL_CACHE, else the XDG cache."""
    if os.environ.get("SIMCLR_JAX_KERNEL_CACHE"):
        return os.environ["SIMCLR_JAX_KERNEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "simclr_jax", "kernels")


def _cpu_has_avx512f() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        return False
    return False


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str) -> str:
    """Compiles SOURCE (unless a build for this source/compiler/jaxlib exists); returns its path."""
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailableError(f"the C++ compiler {cxx} does not run: {e}") from e
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(
        b"\0".join([source, repr(CXXFLAGS).encode(), version.encode(), jaxlib.__version__.encode()])
    ).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"conv_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=cache_dir())
    os.close(fd)
    # -isystem: jaxlib's headers have warnings of their own that are not ours to show.
    cmd = [cxx, *CXXFLAGS, "-isystem", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    print(f"simclr_jax: compiling the native conv kernels into {path}", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise KernelUnavailableError(f"running {' '.join(cmd)} failed: {e}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailableError(
            f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}"
        )
    os.replace(tmp, path)
    return path


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the FFI target once per process; the reason on failure."""
    if not _cpu_has_avx512f():
        return "this CPU has no AVX-512F (or this is not Linux on x86-64)"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found ($CXX, g++ or c++)"
    try:
        lib = ctypes.cdll.LoadLibrary(_build(cxx))
    except (KernelUnavailableError, OSError) as e:
        return str(e)
    jax.ffi.register_ffi_target(
        GRAD_TARGET, jax.ffi.pycapsule(lib.SimclrConvKernelGrad), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        FORWARD_TARGET, jax.ffi.pycapsule(lib.SimclrConvForward), platform="cpu"
    )
    return None


def unavailable_reason() -> str | None:
    """None when the kernel is built and registered, else why not (builds on the first call)."""
    return _load()


def available() -> bool:
    """Whether the kernel is usable in this process (builds it on the first call)."""
    return _load() is None


def conv_kernel_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding_low: tuple[int, int],
) -> jax.Array:
    """Kernel gradient of a 2-D convolution, NHWC input and HWIO kernel, on XLA:CPU.

    dw[i, j, ci, co] = sum over n, ho, wo of x[n, ho * sh + i - ph, wo * sw + j - pw, ci] *
    dy[n, ho, wo, co], with x read as zero outside the image; (ph, pw) = padding_low. The high
    padding follows from dy's spatial size.

    Args:
      x: float32 [n, h, w, cin], the convolution's input.
      dy: float32 [n, ho, wo, cout], the cotangent of its output; cout a multiple of LANES.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding_low: padding before the first row and column, (ph, pw).

    Returns:
      float32 [kh, kw, cin, cout].

    Raises:
      KernelUnavailableError: when the kernel cannot be built here (see unavailable_reason).
      ValueError: for other dtypes, ranks or a cout that is not a multiple of LANES.
    """
    _check(x, dy, "x", "dy")
    _check_pairs(kernel_size=kernel_size, strides=strides)
    kh, kw = kernel_size
    out_shape = (kh, kw, x.shape[-1], dy.shape[-1])
    return _ffi_conv(GRAD_TARGET, out_shape, x, dy, strides, padding_low)


def conv_forward(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """A 2-D convolution, NHWC input and HWIO kernel, on XLA:CPU (the native kernel).

    y[n, ho, wo, co] = sum over i, j, ci of x[n, ho * sh + i - ph, wo * sw + j - pw, ci] *
    kernel[i, j, ci, co], x read as zero outside the image; equal to lax.conv_general_dilated
    with the same strides and padding up to float32 summation order.

    Args:
      x: float32 [n, h, w, cin].
      kernel: float32 [kh, kw, cin, cout]; cout a multiple of LANES.
      strides: (sh, sw).
      pads: ((low, high), (low, high)) per spatial dim.

    Returns:
      float32 [n, ho, wo, cout].

    Raises:
      KernelUnavailableError: when the kernel cannot be built here (see unavailable_reason).
      ValueError: for other dtypes, ranks, mismatched channels or an unsupported cout.
    """
    _check(x, kernel, "x", "kernel", batch=False)
    _check_pairs(strides=strides)
    if kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel {kernel.shape} does not take {x.shape[-1]} input channels.")
    kh, kw = kernel.shape[:2]
    (ph0, ph1), (pw0, pw1) = pads
    ho = (x.shape[1] + ph0 + ph1 - kh) // strides[0] + 1
    wo = (x.shape[2] + pw0 + pw1 - kw) // strides[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"no output: kernel {(kh, kw)} over padded input of {x.shape}.")
    out_shape = (x.shape[0], ho, wo, kernel.shape[-1])
    return _ffi_conv(FORWARD_TARGET, out_shape, x, kernel, strides, (ph0, pw0))


def _ffi_conv(target: str, out_shape, a: jax.Array, b: jax.Array, strides, padding_low):
    """Calls one of the two handlers: (a, b) -> float32 out_shape, attributes sh, sw, ph, pw.

    Under shard_map, both operands are first made to vary over the same mesh axes (one FFI call
    takes one type) and the result takes that type; a no-op elsewhere.
    """
    va, vb = jax.typeof(a).manual_axis_type.varying, jax.typeof(b).manual_axis_type.varying
    if vb - va:
        a = jax.lax.pcast(a, tuple(sorted(vb - va)), to="varying")
    if va - vb:
        b = jax.lax.pcast(b, tuple(sorted(va - vb)), to="varying")
    out = jax.typeof(a).update(shape=out_shape, dtype=jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        a,
        b,
        sh=np.int64(strides[0]),
        sw=np.int64(strides[1]),
        ph=np.int64(padding_low[0]),
        pw=np.int64(padding_low[1]),
    )


def _check_pairs(**pairs) -> None:
    for name, value in pairs.items():
        if len(value) != 2 or any(int(v) < 1 for v in value):
            raise ValueError(f"{name} must be two ints >= 1, got {value!r}.")


def _check(a: jax.Array, b: jax.Array, a_name: str, b_name: str, batch: bool = True) -> None:
    reason = _load()
    if reason is not None:
        raise KernelUnavailableError(f"the native conv kernels are unavailable: {reason}")
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"float32 only, got {a_name} {a.dtype} and {b_name} {b.dtype}.")
    if a.ndim != 4 or b.ndim != 4 or (batch and a.shape[0] != b.shape[0]):
        raise ValueError(
            f"{a_name} and {b_name} must be 4-D"
            + (" with one batch size" if batch else "")
            + f", got {a.shape} and {b.shape}."
        )
    if b.shape[-1] % LANES:
        raise ValueError(f"cout must be a multiple of {LANES}, got {b.shape[-1]}.")


def native_flops(closed_jaxpr) -> float:
    """FLOPs of the native kernel calls in a traced program (XLA's cost analysis cannot see
    inside FFI calls). Walks nested jaxprs (jit, shard_map, remat, ...); shapes are those seen
    inside them, i.e. one device's under shard_map or pmap.

    Args:
      closed_jaxpr: e.g. jax.jit(f).trace(*args).jaxpr.

    Returns:
      2 * (output positions) * kh * kw * cin * cout summed over the calls.
    """
    from jax import extend

    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            target = eqn.params.get("target_name") if eqn.primitive.name == "ffi_call" else None
            if target == GRAD_TARGET:  # (x, dy) -> dw
                positions = np.prod(eqn.invars[1].aval.shape[:3])
                total += 2.0 * positions * np.prod(eqn.params["result_avals"][0].shape)
            elif target == FORWARD_TARGET:  # (x, kernel) -> y
                positions = np.prod(eqn.params["result_avals"][0].shape[:3])
                total += 2.0 * positions * np.prod(eqn.invars[1].aval.shape)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    if isinstance(sub, extend.core.ClosedJaxpr):
                        total += walk(sub.jaxpr)
                    elif isinstance(sub, extend.core.Jaxpr):
                        total += walk(sub)
        return total

    return walk(closed_jaxpr.jaxpr)
