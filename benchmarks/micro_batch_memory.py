r"""Peak memory of the SimCLR step: a large batch with micro-batches vs a small plain batch.

  python benchmarks/micro_batch_memory.py                      # XLA's memory plan, no run
  python benchmarks/micro_batch_memory.py --run --base_width=16   # also run one step each

Default comparison (ResNet-18, CIFAR stem, width 64, 32 px, float32, 1 device):
  * batch 256, plain step;
  * batch 4096 in micro-batches of 256 (gradient caching, train.micro_batch_size);
  * batch 4096, plain step (what micro-batching avoids).

For each it compiles the real train step and prints XLA's buffer assignment
(compiled.memory_analysis(): temporaries, arguments, outputs): the device memory
the step needs, known before running. With --run every setting also runs one
step in a fresh subprocess and reports that process's peak RSS (CPU) or the
device's peak_bytes_in_use (GPU/TPU). Results go to stdout and, with --json, to
a file.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small_batch", type=int, default=256)
    parser.add_argument("--large_batch", type=int, default=4096)
    parser.add_argument("--micro_batch", type=int, default=256)
    parser.add_argument("--base_width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--run", action="store_true", help="also run one step per setting")
    parser.add_argument("--json", default="")
    # Internal: measure one setting in this process.
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(batch: int, micro: int, args, run: bool) -> dict:
    """Compiles (and optionally runs) one step; returns its memory figures."""
    import functools

    import jax
    import optax

    from configs import cifar10
    from simclr_jax import models, sharding, steps
    from simclr_jax.cpu import conv_class

    config = cifar10.get_config()
    config.model.base_width = args.base_width
    config.model.depth = args.depth
    config.model.dtype = args.dtype
    mesh = sharding.create_mesh(jax.devices()[:1])
    model = models.build_model(
        config.model,
        num_classes=10,
        bn_axis_name=sharding.DATA_AXIS,
        conv=conv_class.conv_class("auto"),
    )
    tx = optax.sgd(0.1, momentum=0.9)
    size = args.image_size
    state = steps.create_train_state(model, tx, jax.random.key(0), (size, size, 3))
    state = jax.device_put(state, sharding.replicated_sharding(mesh))
    shape = (batch, size, size, 3)
    spec = {
        "view1": jax.ShapeDtypeStruct(shape, "float32", sharding=sharding.batch_sharding(mesh)),
        "view2": jax.ShapeDtypeStruct(shape, "float32", sharding=sharding.batch_sharding(mesh)),
        "label": jax.ShapeDtypeStruct((batch,), "int32", sharding=sharding.batch_sharding(mesh)),
    }
    step = steps.compile_train_step(
        functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            learning_rate_fn=lambda s: 0.1,
            temperature=0.5,
            loss_scale=2.0,
            axis_name=sharding.DATA_AXIS,
            sync_batch_stats=False,
            micro_batch_per_device=micro if micro and micro < batch else None,
        ),
        parallelism="shard_map",
        mesh=mesh,
    )
    start = time.perf_counter()
    compiled = step.lower(state, spec).compile()
    result = {
        "batch": batch,
        "micro_batch": micro or batch,
        "compile_s": time.perf_counter() - start,
    }
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
            result[field.replace("_size_in_bytes", "_mib")] = getattr(analysis, field) / 2**20
    if run:
        keys = jax.random.split(jax.random.key(1), 3)
        batch_arrays = jax.device_put(
            {
                "view1": jax.random.uniform(keys[0], shape),
                "view2": jax.random.uniform(keys[1], shape),
                "label": jax.random.randint(keys[2], (batch,), 0, 10),
            },
            sharding.batch_sharding(mesh),
        )
        start = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        jax.block_until_ready((state, metrics))
        result["step_s"] = time.perf_counter() - start
        result["loss"] = float(metrics.compute()["loss"])
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
        else:  # CPU: the whole process, Linux reports KiB.
            result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv):
    args = parse_args(argv)
    if args.large_batch % args.micro_batch:
        raise ValueError(
            f"--micro_batch={args.micro_batch} must divide --large_batch={args.large_batch}"
        )
    if args.one:
        batch, micro = (int(x) for x in args.one.split(","))
        print(json.dumps(measure(batch, micro, args, run=True)))
        return None
    settings = [
        (f"batch {args.small_batch}", args.small_batch, 0),
        (f"batch {args.large_batch}, micro {args.micro_batch}", args.large_batch, args.micro_batch),
        (f"batch {args.large_batch}", args.large_batch, 0),
    ]
    rows = []
    for name, batch, micro in settings:
        if args.run:
            # A fresh process per setting: peak RSS is per process.
            out = subprocess.run(
                [sys.executable, __file__, *argv, f"--one={batch},{micro}"],
                check=True,
                capture_output=True,
                text=True,
                cwd=_REPO,
                env={**os.environ, "PYTHONPATH": _REPO},
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
        else:
            row = measure(batch, micro, args, run=False)
        row["setting"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0].get("temp_mib")
    print(
        f"\nResNet-{args.depth} base width {args.base_width}, {args.image_size} px, {args.dtype}:"
    )
    header = f"{'setting':<28}{'XLA temp MiB':>14}{'x small':>13}"
    if args.run:
        header += f"{'peak MiB':>10}{'step s':>9}"
    print(header)
    for row in rows:
        temp = row.get("temp_mib", float("nan"))
        line = f"{row['setting']:<28}{temp:>14.0f}{temp / base:>13.2f}"
        if args.run:
            peak = row.get("peak_device_mib", row.get("peak_rss_mib", float("nan")))
            line += f"{peak:>10.0f}{row['step_s']:>9.1f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, _REPO)
    main(sys.argv[1:])
