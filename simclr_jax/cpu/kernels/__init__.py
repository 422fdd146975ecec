"""oneDNN's CPU convolutions for XLA (FFI), the shim compiled on first use (see `onednn`)."""

from simclr_jax.cpu.kernels.onednn import (
    INSTALL_HINT,
    KernelUnavailableError,
    available,
    conv_backward_data,
    conv_backward_weights,
    conv_forward,
    onednn_flops,
    unavailable_reason,
)

__all__ = [
    "INSTALL_HINT",
    "KernelUnavailableError",
    "available",
    "conv_backward_data",
    "conv_backward_weights",
    "conv_forward",
    "onednn_flops",
    "unavailable_reason",
]
