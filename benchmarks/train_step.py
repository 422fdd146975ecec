"""Throughput, FLOPs and memory of the real train step of any method on random on-device data.

  python benchmarks/train_step.py --config=configs/cifar10.py --batch=64 --cpu_conv=matmul \
      --steps=10 --warmup=2 --json=/tmp/jax_b64.json

Builds the model, LARS optimizer and steps.train_step exactly as training does, wraps it with
steps.compile_train_step (shard_map under jit over --devices devices) and times it on random
views that already live on the devices (no input pipeline). Reported (and written to --json):
compile time, the median step time over --steps steps after --warmup, images/s (one image =
two views), model FLOPs per step from XLA's cost analysis of the compiled step and from the
analytic count (6 x forward MACs per view of the encoder, conv/dense layers only; a method's
heads and a target network's extra forward pass are not counted), achieved FLOP/s, the
utilisation against a large matmul timed here in the same dtype ("measured peak") and against
the vendor's dense peak on known GPUs/TPUs ('n/a' on CPU), and peak memory (device
memory_stats where available, otherwise the process's peak RSS).

CPU threads: XLA:CPU sizes its intra-op thread pool from the CPUs the process may run on, so
--threads=T pins the process to the first T allowed CPUs (os.sched_setaffinity, before jax is
imported); the same as `taskset -c 0-(T-1) python ...`. --devices=D > 1 on CPU sets
XLA_FLAGS=--xla_force_host_platform_device_count=D (the D fake devices share those threads).
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import sys
import time

# The training split's size the step object is built for (InstDisc's memory bank rows):
# CIFAR-10's training images.
NUM_EXAMPLES = 50_000

# Dense peak TFLOP/s per device (chip for TPU, one GPU) by dtype, from vendor data sheets;
# matched as whole words in jax's device_kind, the longest key first (so "H100 PCIe" before
# "H100", and "L4" matches no "L40S"). float32 on GPUs is the non-tensor-core peak.
VENDOR_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 51.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "V100": {"bfloat16": 125.0, "float32": 15.7},
    "L4": {"bfloat16": 121.0, "float32": 30.3},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v6": {"bfloat16": 918.0, "float32": 918.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v3": {"bfloat16": 123.0, "float32": 123.0},
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cifar10.py", help="path[:arg]")
    parser.add_argument("--batch", type=int, default=64, help="global batch (images)")
    parser.add_argument("--width", type=int, default=None, help="model.width_multiplier")
    parser.add_argument("--base_width", type=int, default=None, help="model.base_width")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="pin to T CPUs; 0: all")
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    parser.add_argument(
        "--cpu_conv",
        default="auto",
        help="the convolution class, as main.py's --cpu_conv (simclr_jax.cpu.conv_class."
        "CONV_CHOICES; checked once jax is up, before anything compiles)",
    )
    parser.add_argument(
        "--shortcut_fork",
        default="auto",
        choices=["auto", "on", "off"],
        help="fork identity shortcuts (simclr_jax.cpu.shortcut_fork); auto: on CPU only",
    )
    parser.add_argument(
        "--xla_flags",
        default="recommended",
        choices=["recommended", "none"],
        help="'recommended': add simclr_jax.cpu.xla_flags to XLA_FLAGS (as main.py does)",
    )
    parser.add_argument(
        "--host_malloc",
        default="recommended",
        choices=["recommended", "default"],
        help="'recommended': simclr_jax.cpu.host_memory's malloc policy (as main.py sets it; "
        "CPU backend only), 'default': glibc's",
    )
    parser.add_argument(
        "--print_rss",
        action="store_true",
        help="print each step's time and the process's RSS (Linux /proc/self/statm)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak_size", type=int, default=0, help="matmul size; 0: by backend")
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--profile_dir",
        default="",
        help="also trace one extra step with jax.profiler into this directory and print the "
        "time per XLA op kind (CPU: adds --xla_cpu_enable_xprof_traceme=true to the whole run, "
        "so its timings are not comparable with unprofiled runs; the JSON says profiled)",
    )
    return parser.parse_args(argv)


def load_config(spec: str):
    """Loads get_config(arg) from 'path/to/config.py[:arg]'."""
    path, _, arg = spec.partition(":")
    # Configs import each other as `configs.<name>` (e.g. quickstart builds on cifar10), as
    # they do under main.py, which runs from the repository root.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def analytic_encoder_macs(
    depth: int, width: int, image_size: int, cifar_stem: bool, head_layers: int, head_dim: int
) -> float:
    """Forward multiply-accumulates per view of the encoder + projection head (no SK).

    Convs and dense layers only (BN, ReLU, pooling are ignored, as in the usual counts), with
    a projection shortcut on the first block of every stage as the model has. Encoders alone:
    ResNet-18 CIFAR at 32 px, width 64 -> 0.5596 G (0.5554 G without the first stage's
    shortcut); ResNet-50 at 224 px -> 4.09 G. The 3-layer head adds 0.6 M / 8.7 M.
    """
    from simclr_jax.models.resnet import BLOCK_COUNTS, BOTTLENECK_EXPANSION

    kind, stages = BLOCK_COUNTS[depth]
    size = image_size
    if cifar_stem:
        macs = size * size * 9 * 3 * width
    else:
        size = -(-size // 2)
        macs = size * size * 49 * 3 * width
        size = -(-size // 2)  # max-pool
    cin = width
    for stage, blocks in enumerate(stages):
        mid = width * 2**stage
        out = mid if kind == "basic" else mid * BOTTLENECK_EXPANSION
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            in_size, size = size, -(-size // stride)
            if index == 0:  # projection shortcut
                macs += size * size * cin * out
            if kind == "basic":
                macs += size * size * 9 * cin * mid + size * size * 9 * mid * mid
            else:
                macs += in_size * in_size * cin * mid
                macs += size * size * 9 * mid * mid + size * size * mid * out
            cin = out
    dims = [cin] * head_layers + [head_dim]
    macs += sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    return float(macs)


def time_matmul_peak(jax, jnp, dtype, size: int) -> float:
    """FLOP/s of a size^3 matmul in `dtype` on the default device (best of 5)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def vendor_peak(device_kind: str, dtype: str) -> float | None:
    """The dense peak FLOP/s in `dtype` of a device kind (e.g. 'NVIDIA H200'), or None."""
    for key in sorted(VENDOR_PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_kind, re.IGNORECASE):
            return VENDOR_PEAK_TFLOPS[key][dtype] * 1e12
    return None


def peak_memory_bytes(devices) -> tuple[int, str]:
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use (device 0)"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def profile_step(jax, compiled, state, batch, profile_dir: str, top: int = 12) -> dict[str, float]:
    """Traces one step and returns the milliseconds spent per XLA op kind, largest first.

    Op kinds are the HLO instruction names with their '.N' suffix removed (e.g.
    'transpose_copy_fusion', 'ynn_fusion', 'convolution'), summed over every XLA thread. On
    XLA:CPU, work that a thunk hands to a thread pool without its own trace event (e.g. the
    body of XLA's own convolutions) is not attributed: 'untraced' is the step's wall time minus
    the attributed time, which is only a rough share when threads overlap.
    """
    import collections
    import glob

    start = time.perf_counter()
    with jax.profiler.trace(profile_dir):
        jax.block_until_ready(compiled(state, batch))
    wall_ms = (time.perf_counter() - start) * 1e3
    paths = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        print(f"no trace written under {profile_dir}")
        return {}
    data = jax.profiler.ProfileData.from_file(paths[-1])
    by_kind: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            # XLA's op lines (CPU: 'tf_XLAEigen/...', GPU/TPU: 'XLA Ops'), not 'XLA Modules',
            # whose events span the ops again.
            if "XLA" not in line.name or "Modules" in line.name:
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "end: ")):
                    continue
                by_kind[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns / 1e6
    attributed = sum(by_kind.values())
    result = {kind: round(ms, 1) for kind, ms in by_kind.most_common(top)}
    result["other attributed"] = round(attributed - sum(result.values()), 1)
    result["untraced"] = round(max(wall_ms - attributed, 0.0), 1)
    print(f"profiled step: {wall_ms:.0f} ms wall (trace in {profile_dir})")
    for kind, ms in result.items():
        print(f"  {kind:40s} {ms:9.1f} ms  {ms / wall_ms:6.1%}")
    return result


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[: args.threads])
    from simclr_jax.cpu import host_memory, xla_flags

    # Before jax (or anything else) starts threads: see simclr_jax/cpu/host_memory.py.
    host_malloc = host_memory.apply() if args.host_malloc == "recommended" else False
    if args.devices > 1:
        xla_flags.add_flag("xla_force_host_platform_device_count", str(args.devices))
    if args.profile_dir:
        xla_flags.add_flag("xla_cpu_enable_xprof_traceme", "true")
    if args.xla_flags == "recommended":
        xla_flags.apply()
    # jax is imported only now so the affinity and XLA_FLAGS above take effect.
    import functools

    import jax
    import jax.numpy as jnp

    from simclr_jax import methods, models, optim, sharding, steps
    from simclr_jax.cpu import conv_class, kernels

    config = load_config(args.config)
    for field, value in [
        ("width_multiplier", args.width),
        ("base_width", args.base_width),
        ("depth", args.depth),
        ("dtype", args.dtype),
    ]:
        if value is not None:
            config.model[field] = value
    if args.image_size is not None:
        config.augment.image_size = args.image_size
    if args.batch % args.devices:
        raise ValueError(f"--batch={args.batch} must be divisible by --devices={args.devices}.")

    devices = sharding.select_devices(args.devices)
    mesh = sharding.create_mesh(devices)
    bn_axis = sharding.DATA_AXIS if config.model.global_bn else None
    fork = {"auto": None, "on": True, "off": False}[args.shortcut_fork]
    conv = conv_class.conv_class(args.cpu_conv, shortcut_fork=fork)
    # The method of the config (config.method.name: SimCLR, BYOL, ...), as train.py builds it.
    model = methods.build_model(config, num_classes=10, bn_axis_name=bn_axis, conv=conv)
    method = methods.from_config(config, total_steps=1000, num_examples=NUM_EXAMPLES)
    tx, schedule = optim.create_optimizer(
        config.optim, batch_size=args.batch, total_steps=1000, warmup_steps=10
    )
    size = config.augment.image_size
    state = method.create_state(model, tx, jax.random.key(0), (size, size, 3))
    state = jax.device_put(state, sharding.replicated_sharding(mesh))
    keys = jax.random.split(jax.random.key(1), 3)
    shape = (args.batch, size, size, 3)
    batch = {
        "view1": jax.random.uniform(keys[0], shape),
        "view2": jax.random.uniform(keys[1], shape),
        "label": jax.random.randint(keys[2], (args.batch,), 0, 10),
        "index": jnp.arange(args.batch, dtype=jnp.int32),  # distinct examples, as the pipeline's
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))

    step = steps.compile_train_step(
        functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            learning_rate_fn=schedule,
            method=method,
            axis_name=sharding.DATA_AXIS,
            sync_batch_stats=not config.model.global_bn,
        ),
        parallelism="shard_map",
        mesh=mesh,
    )
    start = time.perf_counter()
    traced = step.trace(state, batch)  # traced once: compiled, and read for oneDNN FLOPs
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    # The SPMD module is one device's program: scale to the whole step. XLA's cost analysis
    # does not see inside the oneDNN calls (--cpu_conv=onednn): they are
    # counted from the traced program and added.
    onednn_flops = kernels.onednn_flops(traced.jaxpr) * args.devices
    xla_flops = float((cost or {}).get("flops", float("nan"))) * args.devices + onednn_flops

    times = []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
        if index >= args.warmup:
            times.append(elapsed)
        if args.print_rss:
            rss_mib = host_memory.rss_bytes() / 2**20
            print(f"step {index}: {elapsed:.3f} s, RSS {rss_mib:.0f} MiB")
    step_s = statistics.median(times)
    profile = (
        profile_step(jax, compiled, state, batch, args.profile_dir) if args.profile_dir else {}
    )

    macs = analytic_encoder_macs(
        config.model.depth,
        config.model.get("base_width", 64) * config.model.width_multiplier,
        size,
        config.model.cifar_stem,
        config.model.head_layers,
        config.model.head_dim,
    )
    analytic_flops = 6.0 * macs * 2 * args.batch  # fwd + 2x bwd, two views per image
    backend = jax.default_backend()
    peak_size = args.peak_size or (2048 if backend == "cpu" else 8192)
    dtype = config.model.dtype
    measured_peak = time_matmul_peak(jax, jnp, models.get_dtype(dtype), peak_size)
    vendor = vendor_peak(devices[0].device_kind, dtype) if backend != "cpu" else None
    achieved = analytic_flops / step_s
    memory, memory_kind = peak_memory_bytes(devices)
    result = {
        "config": args.config,
        "method": method.name,
        "backend": backend,
        "device_kind": devices[0].device_kind,
        "devices": args.devices,
        "cpus": len(os.sched_getaffinity(0)),
        "host": platform.node(),
        "depth": config.model.depth,
        "width": config.model.get("base_width", 64) * config.model.width_multiplier,
        "image_size": size,
        "dtype": dtype,
        "cpu_conv": conv_class.describe(conv),
        "batch": args.batch,
        "compile_s": compile_s,
        "step_s_median": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "images_per_s": args.batch / step_s,
        "analytic_fwd_gmacs_per_view": macs / 1e9,
        "analytic_gflop_per_step": analytic_flops / 1e9,
        "xla_gflop_per_step": xla_flops / 1e9,
        "onednn_gflop_per_step": onednn_flops / 1e9,
        "achieved_gflop_per_s": achieved / 1e9,
        "measured_peak_gflop_per_s": measured_peak / 1e9,
        "utilisation_vs_measured_peak": achieved / measured_peak,
        "utilisation_vs_vendor_peak": achieved / vendor if vendor else "n/a",
        "peak_memory_mib": memory / 2**20,
        "peak_memory_kind": memory_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # 'reuse', 'over budget' (the watchdog restored glibc's defaults) or 'default'.
        "host_malloc": host_memory.policy() if host_malloc else "default",
        "profiled": bool(args.profile_dir),
    }
    if profile:
        result["profile_ms_by_op_kind"] = profile
    for key, value in result.items():
        if key != "profile_ms_by_op_kind":
            print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
