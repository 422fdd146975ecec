"""BatchNorm + residual add + ReLU, forward and backward, on one activation: JAX or PyTorch.

  python benchmarks/batchnorm_relu.py --impl=jax --threads=2
  python benchmarks/batchnorm_relu.py --impl=torch --threads=2

The elementwise work around a ResNet block's last convolution, relu(BN(x) + shortcut), in
training mode (batch statistics), at the width-16 first stage's shape by default ([512, 32, 32,
16] float32: 256 images x 2 views). JAX: jax.grad through flax's BatchNorm as the models use it
(two-pass variance) with respect to the BN parameters, x and the shortcut, under jit, with
simclr_jax.cpu's malloc policy and XLA flags (as main.py); PyTorch: BatchNorm2d + add + relu on
channels_last tensors, then backward. Prints the median of --repeats timings of the forward pass
alone and of forward + backward, in ms.
"""

import argparse
import os
import sys

from conv_layer import median_seconds


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", default="jax", choices=["jax", "torch"])
    parser.add_argument("--shape", default="512,32,32,16", help="N,H,W,C")
    parser.add_argument("--threads", type=int, default=0, help="pin to T CPUs; 0: all")
    parser.add_argument("--repeats", type=int, default=10)
    return parser.parse_args(argv)


def _jax_fns(shape):
    from simclr_jax.cpu import host_memory, xla_flags

    host_memory.apply()
    xla_flags.apply()
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, shortcut):
            y = nn.BatchNorm(
                use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False
            )(x)
            return nn.relu(y + shortcut)

    keys = jax.random.split(jax.random.key(0), 3)
    x, shortcut, cotangent = (jax.random.normal(k, shape) for k in keys)
    block = Block()
    variables = block.init(jax.random.key(1), x, shortcut)

    def forward(params, x, shortcut):
        variables_in = {"params": params, "batch_stats": variables["batch_stats"]}
        return block.apply(variables_in, x, shortcut, mutable=["batch_stats"])

    def loss(params, x, shortcut, cotangent):
        y, updates = forward(params, x, shortcut)
        return jnp.vdot(y, cotangent), updates

    fwd = jax.jit(forward)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    params = variables["params"]
    return (
        lambda: jax.block_until_ready(fwd(params, x, shortcut)),
        lambda: jax.block_until_ready(grad(params, x, shortcut, cotangent)),
    )


def _torch_fns(shape, threads: int):
    import torch

    if threads:
        torch.set_num_threads(threads)
    n, h, w, c = shape
    bn = torch.nn.BatchNorm2d(c)

    def tensor(grad: bool):
        t = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    x, shortcut, cotangent = tensor(True), tensor(True), tensor(False)

    def forward():
        with torch.no_grad():
            return torch.relu(bn(x) + shortcut)

    inputs = (x, shortcut, *bn.parameters())

    def forward_backward():
        # autograd.grad returns fresh gradients (no accumulation into .grad), as jax.grad does.
        torch.autograd.grad(torch.relu(bn(x) + shortcut), inputs, cotangent)

    return forward, forward_backward


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.impl == "jax":
        forward, forward_backward = _jax_fns(shape)
    else:
        forward, forward_backward = _torch_fns(shape, args.threads)
    result = {
        "impl": args.impl,
        "shape": list(shape),
        "forward_ms": median_seconds(forward, args.repeats) * 1e3,
        "forward_backward_ms": median_seconds(forward_backward, args.repeats) * 1e3,
    }
    print(
        f"{args.impl} {args.shape}: forward {result['forward_ms']:.1f} ms, "
        f"forward + backward {result['forward_backward_ms']:.1f} ms"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
