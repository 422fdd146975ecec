"""Which convolution class the ResNet runs with on this machine: the CPU boundary's one choice.

    from simclr_jax.cpu import conv_class
    conv = conv_class.conv_class("auto")  # a flax ModuleDef; nn.Conv on GPU/TPU
    train.train_and_evaluate(config, workdir, conv=conv)

The choice is an execution detail, like a thread count: it is a main.py flag (--cpu_conv), not
a config field, and is stored with no run. Every class has nn.Conv's parameter tree, so a
checkpoint written with one loads with any other, on any backend.

Choices (CONV_CHOICES):
  'auto'    nn.Conv on GPU/TPU. On CPU OneDnnConv where oneDNN is usable (the `cpu` extra and a
            C++ compiler); else, with one warning that says why, nn.Conv when XLA runs
            convolutions with its own kernel (`xla_uses_own_conv_kernel`: simclr_jax.cpu.xla_flags
            was applied before jax started, as main.py does), and MatmulConv without the
            flags (faster than YNNPACK's path).
  'xla'     flax.linen.Conv.
  'matmul'  conv_layers.MatmulConv (im2col + one GEMM).
  'onednn'  conv_layers.OneDnnConv; CPU only, and only where oneDNN is usable.
On the CPU backend the class also carries `fork_shortcut` (simclr_jax.cpu.shortcut_fork), which
the ResNet's identity blocks use to split their input; `shortcut_fork=False` leaves it out.
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from simclr_jax.cpu import kernels
from simclr_jax.cpu.conv_layers import MatmulConv, OneDnnConv
from simclr_jax.cpu.shortcut_fork import shortcut_fork as _shortcut_fork
from simclr_jax.models import ModuleDef

CONV_CHOICES: tuple[str, ...] = ("auto", "xla", "matmul", "onednn")
_CLASSES: dict[str, ModuleDef] = {"xla": nn.Conv, "matmul": MatmulConv, "onednn": OneDnnConv}


@functools.cache
def xla_uses_own_conv_kernel() -> bool:
    """Whether XLA:CPU runs convolutions with its own kernel rather than through YNNPACK.

    jaxlib 0.10 sends convolutions to YNNPACK unless XLA_FLAGS says otherwise
    (`simclr_jax.cpu.xla_flags`); that path is several times slower than XLA's own kernel here.
    The answer comes from compiling a tiny convolution and reading the optimised HLO, so it
    reflects the flags the running backend actually started with. Cached per process.

    Returns:
      True if the compiled convolution is a plain XLA convolution (no YNNPACK fusion).
    """
    # Only compiled, never run. XLA keeps very small convolutions (e.g. 1x8x8x8) off YNNPACK
    # either way, so the probe has a ResNet-like shape.
    # A device of this process: after jax.distributed.initialize, jax.devices() lists all hosts'.
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    x = jax.ShapeDtypeStruct((8, 16, 16, 64), jnp.float32, sharding=cpu)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32, sharding=cpu)

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    hlo = jax.jit(conv).lower(x, w).compile().as_text()
    return "ynn_fusion" not in hlo and "convolution(" in hlo


def resolve_choice(choice: str, backend: str | None = None) -> str:
    """Resolves 'auto' to 'xla', 'matmul' or 'onednn' for a backend, and checks 'onednn'.

    Args:
      choice: one of CONV_CHOICES.
      backend: jax backend name ('cpu', 'gpu', 'tpu'); None asks jax.default_backend().

    Returns:
      'xla', 'matmul' or 'onednn' (the rules are in the module docstring).

    Raises:
      ValueError: for an unknown choice, or 'onednn' off the CPU backend or where oneDNN
        cannot be used (the message says why).
    """
    if choice not in CONV_CHOICES:
        raise ValueError(f"the CPU convolution must be one of {CONV_CHOICES}, got {choice!r}.")
    backend = jax.default_backend() if backend is None else backend
    if choice == "onednn":
        if backend != "cpu":
            raise ValueError(
                f"the 'onednn' convolution is a CPU library; the backend is {backend!r}. "
                "Use 'auto' or 'xla'."
            )
        reason = kernels.unavailable_reason()
        if reason is not None:
            raise ValueError(
                f"the 'onednn' convolution is unavailable here ({reason}). Use 'auto' or 'xla'."
            )
        return choice
    if choice != "auto":
        return choice
    if backend != "cpu":
        return "xla"
    reason = kernels.unavailable_reason()
    if reason is None:
        return "onednn"
    fallback = "xla" if xla_uses_own_conv_kernel() else "matmul"
    warnings.warn(
        f"the 'auto' CPU convolution: oneDNN is unavailable ({reason}); using the slower "
        f"{fallback!r} convolution.",
        stacklevel=2,
    )
    return fallback


@functools.cache
def _forking(base: ModuleDef) -> ModuleDef:
    """`base` with `fork_shortcut` set (same fields, parameters and values)."""
    return type(
        f"Forking{base.__name__}",
        (base,),
        {
            "__doc__": f"{base.__name__} whose ResNet blocks fork identity shortcuts "
            "(simclr_jax.cpu.shortcut_fork).",
            "__module__": __name__,
            "fork_shortcut": staticmethod(_shortcut_fork),
        },
    )


def conv_class(
    choice: str = "auto", *, shortcut_fork: bool | None = None, backend: str | None = None
) -> ModuleDef:
    """The convolution class to hand the models (their `conv` argument).

    Args:
      choice: one of CONV_CHOICES (see the module docstring).
      shortcut_fork: give the class `fork_shortcut`; None = on the CPU backend only (elsewhere
        it would only add a scalar to an add XLA fuses anyway).
      backend: jax backend name; None asks jax.default_backend().

    Returns:
      A flax.linen.Conv subclass (or nn.Conv itself).

    Raises:
      ValueError: as `resolve_choice`.
    """
    backend = jax.default_backend() if backend is None else backend
    base = _CLASSES[resolve_choice(choice, backend)]
    if shortcut_fork is None:
        shortcut_fork = backend == "cpu"
    return _forking(base) if shortcut_fork else base


def describe(conv: ModuleDef) -> str:
    """'xla' | 'matmul' | 'onednn', plus '+fork' when the class forks shortcuts (for logs)."""
    names = {cls: name for name, cls in _CLASSES.items()}
    base = next((cls for cls in conv.__mro__ if cls in names), None)
    name = names.get(base, conv.__name__)
    return name + ("+fork" if getattr(conv, "fork_shortcut", None) else "")
