"""oneDNN's convolutions as XLA:CPU FFI targets: forward, input gradient, kernel gradient.

oneDNN (Intel's deep-learning primitives library, the one PyTorch's CPU convolutions come from)
comes from PyPI as `onednn-cpu-gomp` (the library, GNU OpenMP threading) and
`onednn-devel-cpu-gomp` (its headers), version 2023.2 (oneDNN 3.2): the `cpu` extra of this
project. The shim onednn_conv.cc (three FFI handlers, one cached primitive per shape) is
compiled with the system C++ compiler ($CXX, else g++ or c++) the first time a process needs
it, into $SIMCLR_JAX_KERNEL_CACHE (default $XDG_CACHE_HOME/simclr_jax/kernels, i.e.
~/.cache/simclr_jax/kernels), under a name that hashes the source, the flags, the compiler's
version, jaxlib's version and the oneDNN found. Later processes load the cached library in
milliseconds; concurrent first builds (pytest-xdist workers) each write a temporary file and
rename it into place.

oneDNN is looked for under $SIMCLR_JAX_ONEDNN_ROOT, else where pip installed the headers wheel
(its include/ and lib/ share one prefix: the environment's, ~/.local for --user, ...), else
under this Python's prefix. Where the headers, the library, its OpenMP runtime
(libgomp) or a compiler is missing, `available()` is False and `unavailable_reason()` says
what; the 'auto' CPU convolution then falls back to XLA's (simclr_jax.cpu.conv_class).

Threads: oneDNN runs each call on its OpenMP team (OMP_NUM_THREADS, default: the CPUs this
process may use); the shim lets one convolution run at a time, so XLA devices of one process
that call it concurrently take turns rather than oversubscribe the cores.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
FORWARD_TARGET = "simclr_jax_onednn_conv_forward"
BACKWARD_DATA_TARGET = "simclr_jax_onednn_conv_backward_data"
BACKWARD_WEIGHTS_TARGET = "simclr_jax_onednn_conv_backward_weights"
_SYMBOLS = {
    FORWARD_TARGET: "SimclrOnednnConvForward",
    BACKWARD_DATA_TARGET: "SimclrOnednnConvBackwardData",
    BACKWARD_WEIGHTS_TARGET: "SimclrOnednnConvBackwardWeights",
}
CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")
ROOT_ENV = "SIMCLR_JAX_ONEDNN_ROOT"
_HEADERS_DIST = "onednn-devel-cpu-gomp"
INSTALL_HINT = (
    "install the project's cpu extra (pip install -e '.[cpu]': onednn-cpu-gomp and "
    "onednn-devel-cpu-gomp 2023.2)"
)
# The oneDNN major version the shim is written against (its C++ API changed at 3.0).
_DNNL_MAJOR = 3

Pads = tuple[tuple[int, int], tuple[int, int]]


class KernelUnavailableError(RuntimeError):
    """The oneDNN convolutions cannot be built or loaded on this machine."""


def cache_dir() -> str:
    """Where compiled shims are kept: $SIMCLR_JAX_KERNEL_CACHE, else the XDG cache."""
    if os.environ.get("SIMCLR_JAX_KERNEL_CACHE"):
        return os.environ["SIMCLR_JAX_KERNEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "simclr_jax", "kernels")


def onednn_root() -> str:
    """The prefix holding oneDNN's include/ and lib/: $SIMCLR_JAX_ONEDNN_ROOT, else the prefix
    the `onednn-devel-cpu-gomp` wheel was installed into, else sys.prefix."""
    if os.environ.get(ROOT_ENV):
        return os.environ[ROOT_ENV]
    try:
        files = importlib.metadata.files(_HEADERS_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "dnnl_version.h" and file.parent.name == "dnnl":
            # <prefix>/include/oneapi/dnnl/dnnl_version.h
            return str(pathlib.Path(os.path.abspath(file.locate())).parents[3])
    return sys.prefix


def _find_onednn(root: str) -> tuple[str, str, str]:
    """(include dir, library path, version header text) under root.

    Raises:
      KernelUnavailableError: when the headers or the library are not there, or another major
        version is.
    """
    include = os.path.join(root, "include")
    version_h = os.path.join(include, "oneapi", "dnnl", "dnnl_version.h")
    library = os.path.join(root, "lib", f"libdnnl.so.{_DNNL_MAJOR}")
    for path, what in ((version_h, "headers"), (library, "library")):
        if not os.path.exists(path):
            raise KernelUnavailableError(
                f"oneDNN {what} not found under {root} (no {path}); {INSTALL_HINT}, "
                f"or set {ROOT_ENV}"
            )
    with open(version_h) as f:
        version = f.read()
    if f"#define DNNL_VERSION_MAJOR {_DNNL_MAJOR}" not in version:
        raise KernelUnavailableError(f"{version_h} is not oneDNN {_DNNL_MAJOR}.x; {INSTALL_HINT}")
    return include, library, version


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str, root: str) -> str:
    """Compiles SOURCE against the oneDNN under root (unless this build exists); its path."""
    include, library, dnnl_version = _find_onednn(root)
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailableError(f"the C++ compiler {cxx} does not run: {e}") from e
    with open(SOURCE, "rb") as f:
        source = f.read()
    parts = [source, repr(CXXFLAGS), version, jaxlib.__version__, os.path.realpath(library)]
    key = hashlib.sha256(
        b"\0".join(p if isinstance(p, bytes) else p.encode() for p in [*parts, dnnl_version])
    ).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"onednn_conv-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=cache_dir())
    os.close(fd)
    lib_dir = os.path.dirname(library)
    # -isystem: jaxlib's and oneDNN's headers have warnings of their own that are not ours.
    cmd = [cxx, *CXXFLAGS, "-isystem", jax.ffi.include_dir(), "-isystem", include, SOURCE]
    cmd += ["-o", tmp, "-L", lib_dir, f"-l:{os.path.basename(library)}"]
    # RPATH, not RUNPATH: it also applies to the libraries oneDNN itself loads (a custom build's
    # threading runtime beside it; the wheel's libgomp is the system's).
    cmd += [f"-Wl,--disable-new-dtags,-rpath,{lib_dir}"]
    print(f"simclr_jax: compiling the oneDNN convolution shim into {path}", file=sys.stderr)
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
    os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache serves other users too
    os.replace(tmp, path)
    return path


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the FFI targets once per process; the reason on failure."""
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found ($CXX, g++ or c++)"
    try:
        lib = ctypes.cdll.LoadLibrary(_build(cxx, onednn_root()))
    except (KernelUnavailableError, OSError) as e:  # OSError: e.g. no libgomp.so.1
        return str(e)
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def unavailable_reason() -> str | None:
    """None when the shim is built and registered, else why not (builds on the first call)."""
    return _load()


def available() -> bool:
    """Whether the oneDNN convolutions are usable in this process (builds on the first call)."""
    return _load() is None


def output_size(x_shape, kernel_size, strides, pads: Pads) -> tuple[int, int]:
    """(ho, wo) of a convolution of x [n, h, w, c]; ValueError when there is no output."""
    (ph0, ph1), (pw0, pw1) = pads
    ho = (x_shape[1] + ph0 + ph1 - kernel_size[0]) // strides[0] + 1
    wo = (x_shape[2] + pw0 + pw1 - kernel_size[1]) // strides[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"no output: kernel {tuple(kernel_size)} over padded input of {x_shape}.")
    return ho, wo


def conv_forward(x: jax.Array, kernel: jax.Array, strides, pads: Pads) -> jax.Array:
    """A 2-D convolution with oneDNN: NHWC input, HWIO kernel, float32.

    y[n, ho, wo, co] = sum over i, j, ci of x[n, ho * sh + i - ph, wo * sw + j - pw, ci] *
    kernel[i, j, ci, co], x read as zero in the padding; lax.conv_general_dilated with the same
    strides and padding, up to float32 summation order.

    Args:
      x: float32 [n, h, w, cin].
      kernel: float32 [kh, kw, cin, cout].
      strides: (sh, sw), each >= 1.
      pads: ((low, high), (low, high)), each >= 0.

    Returns:
      float32 [n, ho, wo, cout].

    Raises:
      KernelUnavailableError: when oneDNN cannot be used here (see unavailable_reason).
      ValueError: for other dtypes or ranks, mismatched channels, bad strides or padding.
    """
    _check(x, kernel, "x", "kernel", strides, pads)
    if kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel {kernel.shape} does not take {x.shape[-1]} input channels.")
    ho, wo = output_size(x.shape, kernel.shape[:2], strides, pads)
    out_shape = (x.shape[0], ho, wo, kernel.shape[-1])
    return _ffi_conv(FORWARD_TARGET, out_shape, x, kernel, strides, pads)


def conv_backward_data(
    dy: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...], strides, pads: Pads
) -> jax.Array:
    """The input gradient of `conv_forward(x, kernel, strides, pads)`: dL/dx from dy = dL/dy.

    Args:
      dy: float32 [n, ho, wo, cout].
      kernel: float32 [kh, kw, cin, cout].
      x_shape: the input's shape (n, h, w, cin): with strides > 1 several sizes give one ho.
      strides, pads: as conv_forward.

    Returns:
      float32 x_shape.

    Raises:
      KernelUnavailableError, ValueError: as conv_forward; also when dy is not the output
        shape of a convolution of x_shape.
    """
    _check(dy, kernel, "dy", "kernel", strides, pads)
    expected = (x_shape[0], *output_size(x_shape, kernel.shape[:2], strides, pads), kernel.shape[3])
    if tuple(dy.shape) != expected or kernel.shape[2] != x_shape[3]:
        raise ValueError(f"dy {dy.shape} and kernel {kernel.shape} do not fit an input {x_shape}.")
    return _ffi_conv(BACKWARD_DATA_TARGET, tuple(x_shape), dy, kernel, strides, pads)


def conv_backward_weights(
    x: jax.Array, dy: jax.Array, kernel_size: tuple[int, int], strides, pads: Pads
) -> jax.Array:
    """The kernel gradient of `conv_forward(x, kernel, strides, pads)`: dL/dkernel from dy.

    dw[i, j, ci, co] = sum over n, ho, wo of x[n, ho * sh + i - ph, wo * sw + j - pw, ci] *
    dy[n, ho, wo, co], x read as zero in the padding.

    Args:
      x: float32 [n, h, w, cin].
      dy: float32 [n, ho, wo, cout].
      kernel_size: (kh, kw).
      strides, pads: as conv_forward.

    Returns:
      float32 [kh, kw, cin, cout].

    Raises:
      KernelUnavailableError, ValueError: as conv_backward_data.
    """
    _check(x, dy, "x", "dy", strides, pads)
    expected = (x.shape[0], *output_size(x.shape, kernel_size, strides, pads))
    if tuple(dy.shape[:3]) != expected:
        raise ValueError(f"dy {dy.shape} is not the output of kernel {kernel_size} over {x.shape}.")
    out_shape = (*kernel_size, x.shape[-1], dy.shape[-1])
    return _ffi_conv(BACKWARD_WEIGHTS_TARGET, out_shape, x, dy, strides, pads)


def _ffi_conv(target: str, out_shape, a: jax.Array, b: jax.Array, strides, pads: Pads):
    """Calls one handler: (a, b) -> float32 out_shape; attributes sh, sw, ph0, ph1, pw0, pw1.

    Under shard_map, both operands are first made to vary over the same mesh axes (one FFI call
    takes one type) and the result takes that type; a no-op elsewhere.
    """
    va, vb = jax.typeof(a).manual_axis_type.varying, jax.typeof(b).manual_axis_type.varying
    if vb - va:
        a = jax.lax.pcast(a, tuple(sorted(vb - va)), to="varying")
    if va - vb:
        b = jax.lax.pcast(b, tuple(sorted(va - vb)), to="varying")
    out = jax.typeof(a).update(shape=tuple(out_shape), dtype=jnp.float32)
    (ph0, ph1), (pw0, pw1) = pads
    geometry = dict(sh=strides[0], sw=strides[1], ph0=ph0, ph1=ph1, pw0=pw0, pw1=pw1)
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(a, b, **{name: np.int64(v) for name, v in geometry.items()})


def _check(a: jax.Array, b: jax.Array, a_name: str, b_name: str, strides, pads: Pads) -> None:
    reason = _load()
    if reason is not None:
        raise KernelUnavailableError(f"the oneDNN convolutions are unavailable: {reason}")
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"float32 only, got {a_name} {a.dtype} and {b_name} {b.dtype}.")
    if a.ndim != 4 or b.ndim != 4:
        raise ValueError(f"{a_name} and {b_name} must be 4-D, got {a.shape} and {b.shape}.")
    if len(strides) != 2 or any(int(s) < 1 for s in strides):
        raise ValueError(f"strides must be two ints >= 1, got {strides!r}.")
    if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise ValueError(f"pads must be two (low, high) pairs of ints >= 0, got {pads!r}.")


def onednn_flops(closed_jaxpr) -> float:
    """FLOPs of the oneDNN calls in a traced program (XLA's cost analysis cannot see inside FFI
    calls). Walks nested jaxprs (jit, shard_map, remat, ...); shapes are those seen inside
    them, i.e. one device's under shard_map or pmap.

    Args:
      closed_jaxpr: e.g. jax.jit(f).trace(*args).jaxpr.

    Returns:
      2 * (output positions) * kh * kw * cin * cout summed over the calls as traced, whatever
      the direction (a gradient the program then drops, which XLA removes, is counted too).
    """
    from jax import extend

    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            target = eqn.params.get("target_name") if eqn.primitive.name == "ffi_call" else None
            if target in _SYMBOLS:  # shapes: (first operand, second operand, result)
                shapes = [v.aval.shape for v in eqn.invars] + [eqn.params["result_avals"][0].shape]
            if target == FORWARD_TARGET:  # (x, kernel) -> y
                total += 2.0 * np.prod(shapes[2][:3]) * np.prod(shapes[1])
            elif target == BACKWARD_DATA_TARGET:  # (dy, kernel) -> dx
                total += 2.0 * np.prod(shapes[0][:3]) * np.prod(shapes[1])
            elif target == BACKWARD_WEIGHTS_TARGET:  # (x, dy) -> dw
                total += 2.0 * np.prod(shapes[1][:3]) * np.prod(shapes[2])
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    if isinstance(sub, extend.core.ClosedJaxpr):
                        total += walk(sub.jaxpr)
                    elif isinstance(sub, extend.core.Jaxpr):
                        total += walk(sub)
        return total

    return walk(closed_jaxpr.jaxpr)
