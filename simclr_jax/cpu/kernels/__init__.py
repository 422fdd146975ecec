"""Native CPU kernels for XLA, compiled from source on first use (see `native`)."""

from simclr_jax.cpu.kernels.native import (
    KernelUnavailableError,
    available,
    conv_forward,
    conv_kernel_grad,
    native_flops,
    unavailable_reason,
)

__all__ = [
    "KernelUnavailableError",
    "available",
    "conv_forward",
    "conv_kernel_grad",
    "native_flops",
    "unavailable_reason",
]
