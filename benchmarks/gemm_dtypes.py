r"""GEMM speed by dtype on the default JAX device, at the shapes of ResNet-18 CIFAR convs.

  python benchmarks/gemm_dtypes.py

For each [M, K] x [K, N] (the im2col GEMM of a 3x3 conv in each of ResNet-18's
four CIFAR stages, for 32 views at 32 px: M = views x pixels, K = 9 x input
channels, N = output channels) it times (best of 5) three variants of one dot:
  * float32 x float32 -> float32;
  * bfloat16 x bfloat16 -> float32 (preferred_element_type=float32);
  * bfloat16 x bfloat16 -> bfloat16.
On CPUs with AVX-512 BF16 / AMX, XLA gives the second form a fast bfloat16
kernel while the third runs slower than float32; this script shows which holds
on the machine at hand.
"""

import time

import jax
import jax.numpy as jnp

SHAPES = ((32768, 576, 64), (8192, 1152, 128), (2048, 2304, 256), (512, 4608, 512))
VARIANTS = (
    ("float32", jnp.float32, None),
    ("bf16->f32", jnp.bfloat16, jnp.float32),
    ("bf16", jnp.bfloat16, None),
)


def best_seconds(fn, *args, repeats: int = 5) -> float:
    """Best wall time of fn(*args) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'M x K x N':<22}{'variant':<12}{'ms':>9}{'GFLOP/s':>10}")
    for m, k, n in SHAPES:
        for name, dtype, preferred in VARIANTS:
            a = jax.random.normal(jax.random.key(0), (m, k), dtype)
            b = jax.random.normal(jax.random.key(1), (k, n), dtype)
            dot = jax.jit(lambda a, b, p=preferred: jax.lax.dot(a, b, preferred_element_type=p))
            seconds = best_seconds(dot, a, b)
            shape = f"{m} x {k} x {n}"
            print(
                f"{shape:<22}{name:<12}{seconds * 1e3:>9.2f}{2 * m * k * n / seconds / 1e9:>10.0f}"
            )


if __name__ == "__main__":
    main()
