"""Native CPU kernels for XLA, compiled from source on first use (see `native`)."""

from simclr_jax.kernels.native import (
    KernelUnavailableError,
    available,
    conv_kernel_grad,
    unavailable_reason,
)

__all__ = ["KernelUnavailableError", "available", "conv_kernel_grad", "unavailable_reason"]
