"""XLA:CPU compiler flags for a fast ResNet train step, set before JAX starts its CPU backend.

jaxlib 0.10's XLA:CPU routes convolutions through YNNPACK by default. On the 2-core AVX-512 CPU
this project is developed on, that path ran a 3x3 convolution's forward + backward at 30-105
GFLOP/s across the ResNet-18 CIFAR stages, XLA's own (Eigen) convolution with YNNPACK kept off
convolutions at 89-142 GFLOP/s, and PyTorch's oneDNN at 93-150 (benchmarks/conv_layer.py;
docs/performance.md has the table). The whole width-64 train step went from 0.67x to 0.92x
PyTorch's speed. The flags below:

- `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,+eltwise,+individual_dot`:
  convolutions back to XLA's own kernel; elementwise fusions to YNNPACK, whose kernels also make
  the batch/channel transposes of the kernel-gradient convolutions (with the BatchNorm/ReLU
  recomputation fused in) 3-4x cheaper; dots to YNNPACK.
- `--xla_cpu_prefer_vector_width=512`: 512-bit vectors for XLA's own loops (only added when the
  CPU has AVX-512F; XLA's default is 256).

XLA reads XLA_FLAGS once, when the first backend starts, so `apply()` must run before anything
touches devices: main.py, benchmarks/{train_step,conv_layer}.py and the test setup call it
first. It is not called at import time of the library. A flag whose name already appears in
XLA_FLAGS is left as the user set it, SIMCLR_XLA_CPU_FLAGS=0 turns the whole thing off, and
nothing is added under a jaxlib other than 0.10.x (XLA aborts on unknown flags; see
VALIDATED_JAXLIB_PREFIX). The flags only concern the CPU backend; on GPU/TPU hosts they touch
nothing but host-side CPU computations.

`simclr_jax.cpu.conv_class.resolve_choice('auto')` does not trust the environment: it compiles
a small convolution and looks at what XLA did with it, so a process that started its backend
without these flags falls back to the im2col convolution, which is the faster one there.
"""

import importlib.metadata
import os

# Name=value pairs appended to XLA_FLAGS (values checked against jaxlib 0.10.2's flag parser).
_YNN_FUSIONS = (
    "xla_cpu_experimental_ynn_fusion_type",
    "-individual_convolution,+eltwise,+individual_dot",
)
_VECTOR_WIDTH = ("xla_cpu_prefer_vector_width", "512")

DISABLE_ENV = "SIMCLR_XLA_CPU_FLAGS"
# XLA aborts the process on a flag it does not know, and these are experimental options: only
# add them for the jaxlib line they were checked against (setup.py pins 0.10.2).
VALIDATED_JAXLIB_PREFIX = "0.10."


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cpu_has_avx512f(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def add_flag(name: str, value: str, environ: dict[str, str] | None = None) -> bool:
    """Appends --name=value to XLA_FLAGS unless a --name flag is already there.

    Args:
      name: the XLA flag's name, without the leading '--'.
      value: its value.
      environ: the environment to edit (default os.environ).

    Returns:
      Whether the flag was added.
    """
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    if f"--{name}" in current:
        return False
    environ["XLA_FLAGS"] = f"{current.strip()} --{name}={value}".strip()
    return True


def recommended_flags(avx512f: bool | None = None) -> list[tuple[str, str]]:
    """The (name, value) XLA:CPU flags `apply` adds, for this CPU.

    Args:
      avx512f: whether the CPU has AVX-512F; None reads /proc/cpuinfo (False where unreadable).

    Returns:
      The flags as (name, value) pairs, without the leading '--'.
    """
    flags = [_YNN_FUSIONS]
    if _cpu_has_avx512f() if avx512f is None else avx512f:
        flags.append(_VECTOR_WIDTH)
    return flags


def apply(
    environ: dict[str, str] | None = None,
    avx512f: bool | None = None,
    jaxlib_version: str | None = None,
) -> list[str]:
    """Adds the recommended XLA:CPU flags to XLA_FLAGS, keeping any the user set.

    Must run before JAX starts a backend (first device query, first jit call); later it has no
    effect on the running process.

    Args:
      environ: the environment to edit (default os.environ).
      avx512f: as in `recommended_flags`.
      jaxlib_version: the installed jaxlib's version (None: read it). Nothing is added for a
        jaxlib other than 0.10.x, whose XLA may not know these flags.

    Returns:
      The flags added, as '--name=value' strings (empty if all were present,
      SIMCLR_XLA_CPU_FLAGS=0 or another jaxlib).
    """
    environ = os.environ if environ is None else environ
    if environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if not version.startswith(VALIDATED_JAXLIB_PREFIX):
        return []
    return [
        f"--{name}={value}"
        for name, value in recommended_flags(avx512f)
        if add_flag(name, value, environ)
    ]
