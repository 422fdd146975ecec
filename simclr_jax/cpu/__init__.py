"""CPU speed machinery, behind one boundary: nothing in the library imports this package.

main.py, the benchmarks and the test setup use it; with it deleted, every run still works, on
flax.linen.Conv with jaxlib's default XLA:CPU flags (slower on CPU), and checkpoints are the
same as ever: they load anywhere.

  host_memory   glibc malloc settings so XLA:CPU reuses its per-step buffer (set before any
                thread starts; imports no jax).
  xla_flags     XLA:CPU compiler flags, applied before jax starts its backend (imports no jax).
  kernels/      oneDNN's convolutions as XLA FFI targets (a small C++ shim built on first use).
  conv_layers   OneDnnConv (oneDNN for forward and both gradients) and MatmulConv (im2col + GEMM).
  shortcut_fork the identity fan-out that keeps XLA's own kernel on residual blocks' convs.
  conv_class    the one choice handed to the models: conv_class('auto') -> a conv class.

This file imports nothing, so `from simclr_jax.cpu import host_memory, xla_flags` does not start
jax.
"""
