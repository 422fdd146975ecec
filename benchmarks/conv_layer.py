"""Forward + backward speed of one 3x3 convolution at each ResNet-18 CIFAR stage, JAX or PyTorch.

  python benchmarks/conv_layer.py --threads=2                      # XLA conv, recommended flags
  python benchmarks/conv_layer.py --threads=2 --xla_flags=none     # XLA conv, jaxlib's defaults
  python benchmarks/conv_layer.py --threads=2 --impl=matmul        # simclr_jax MatmulConv
  python benchmarks/conv_layer.py --threads=2 --impl=onednn        # oneDNN (the cpu extra)
  python benchmarks/conv_layer.py --threads=2 --impl=torch         # PyTorch, channels_last

Times value_and_grad of sum(conv(x, w)^2) with respect to x and w (one forward and the two
backward convolutions, so 3 x 2 x N x H x W x 9 x C x C FLOPs) for stride-1 'SAME' 3x3
convolutions at the shapes of ResNet-18's CIFAR stages (32x32x64, 16x16x128, 8x8x256, 4x4x512),
N = --views images, float32, and prints the median time and GFLOP/s of each. --parts times the
forward, input-gradient and kernel-gradient convolutions separately instead (2 x N x H x W x 9
x C x C FLOPs each), to show which of the three is slow. --xla_flags picks
whether simclr_jax.cpu.xla_flags is applied before jax starts (as main.py does) or not, which is
what decides between XLA's own convolution and the YNNPACK one in jaxlib 0.10 (see that
module). --host_malloc picks main.py's malloc policy (simclr_jax.cpu.host_memory) or glibc's
default. --threads pins the process to T CPUs, as benchmarks/train_step.py does.
"""

import argparse
import json
import os
import statistics
import sys
import time

STAGES = ((32, 64), (16, 128), (8, 256), (4, 512))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", default="xla", choices=["xla", "matmul", "onednn", "torch"])
    parser.add_argument("--xla_flags", default="recommended", choices=["recommended", "none"])
    parser.add_argument(
        "--host_malloc",
        default="recommended",
        choices=["recommended", "default"],
        help="simclr_jax.cpu.host_memory's malloc policy (as main.py) or glibc's default",
    )
    parser.add_argument("--views", type=int, default=128, help="batch of images per conv")
    parser.add_argument("--threads", type=int, default=0, help="pin to T CPUs; 0: all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--parts",
        action="store_true",
        help="time forward, input gradient and kernel gradient separately",
    )
    parser.add_argument("--json", default="")
    return parser.parse_args(argv)


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls after one warm-up call, in seconds."""
    run()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _jax_timer(impl: str):
    import jax
    import jax.numpy as jnp

    from simclr_jax.cpu import conv_layers as convs

    def conv(x, w):
        if impl == "matmul":
            return convs.matmul_conv(x, w, 1, "SAME")
        if impl == "onednn":  # --cpu_conv=onednn (conv_layers.onednn_conv)
            return convs.onednn_conv(x, w, 1, "SAME")
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def inputs(n: int, size: int, channels: int):
        """x, w and an output cotangent dy for one stride-1 'SAME' 3x3 conv."""
        x = jax.random.normal(jax.random.key(0), (n, size, size, channels))
        w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05
        dy = jax.random.normal(jax.random.key(2), (n, size, size, channels))
        return x, w, dy

    def timer(n: int, size: int, channels: int, repeats: int) -> float:
        x, w, _ = inputs(n, size, channels)
        step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
        return median_seconds(lambda: jax.block_until_ready(step(x, w)), repeats)

    def parts(n: int, size: int, channels: int, repeats: int) -> dict[str, float]:
        x, w, dy = inputs(n, size, channels)
        # The convolution is linear in each argument, so the primal values do not matter.
        fns = {
            "fwd": (jax.jit(conv), (x, w)),
            "dx": (jax.jit(lambda w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]), (w, dy)),
            "dw": (jax.jit(lambda x, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]), (x, dy)),
        }
        return {
            name: median_seconds(lambda f=f, a=a: jax.block_until_ready(f(*a)), repeats)
            for name, (f, a) in fns.items()
        }

    timer.parts = parts
    return timer


def _torch_timer(threads: int):
    import torch

    if threads:
        torch.set_num_threads(threads)

    def timer(n: int, size: int, channels: int, repeats: int) -> float:
        x = torch.randn(n, channels, size, size).to(memory_format=torch.channels_last)
        x.requires_grad_()
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        conv = conv.to(memory_format=torch.channels_last)

        def run():
            x.grad = None
            conv.zero_grad(set_to_none=True)
            (conv(x) ** 2).sum().backward()

        return median_seconds(run, repeats)

    def parts(n: int, size: int, channels: int, repeats: int) -> dict[str, float]:
        x = torch.randn(n, channels, size, size).to(memory_format=torch.channels_last)
        w = (torch.randn(channels, channels, 3, 3) * 0.05).to(memory_format=torch.channels_last)
        dy = torch.randn(n, channels, size, size).to(memory_format=torch.channels_last)
        grad = torch.nn.grad

        def fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(x, w, padding=1)

        return {
            "fwd": median_seconds(fwd, repeats),
            "dx": median_seconds(lambda: grad.conv2d_input(x.shape, w, dy, padding=1), repeats),
            "dw": median_seconds(lambda: grad.conv2d_weight(x, w.shape, dy, padding=1), repeats),
        }

    timer.parts = parts
    return timer


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    from simclr_jax.cpu import host_memory, xla_flags  # imports no jax

    if args.impl != "torch" and args.host_malloc == "recommended":
        host_memory.apply()  # as main.py: XLA's step buffer reused, not faulted in anew
    if args.impl != "torch" and args.xla_flags == "recommended":
        xla_flags.apply()
    if args.impl == "torch":
        timer = _torch_timer(args.threads)
    else:
        timer = _jax_timer(args.impl)
    rows = []
    for size, channels in STAGES:
        if args.parts:
            flops = 2 * args.views * size * size * 9 * channels * channels
            seconds = timer.parts(args.views, size, channels, args.repeats)
            rows.append(
                {
                    "shape": f"{size}x{size}x{channels}",
                    **{f"{k}_ms": v * 1e3 for k, v in seconds.items()},
                    **{f"{k}_gflops": flops / v / 1e9 for k, v in seconds.items()},
                }
            )
            print(
                f"{rows[-1]['shape']:>10s}  "
                + "  ".join(f"{k} {flops / v / 1e9:6.1f} GFLOP/s" for k, v in seconds.items())
            )
            continue
        seconds = timer(args.views, size, channels, args.repeats)
        flops = 3 * 2 * args.views * size * size * 9 * channels * channels
        rows.append(
            {
                "shape": f"{size}x{size}x{channels}",
                "ms": seconds * 1e3,
                "gflops": flops / seconds / 1e9,
            }
        )
        print(
            f"{rows[-1]['shape']:>10s}  {rows[-1]['ms']:8.1f} ms  {rows[-1]['gflops']:6.1f} GFLOP/s"
        )
    result = {
        "impl": args.impl,
        "xla_flags": os.environ.get("XLA_FLAGS", "") if args.impl != "torch" else "",
        "host_malloc": host_memory.policy(),
        "views": args.views,
        "parts": args.parts,
        "cpus": len(os.sched_getaffinity(0)),
        "stages": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
