r"""Per-device memory of the kNN evaluation step at ImageNet shapes, from XLA's plan.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/knn_memory.py

Compiles one query chunk of the kNN (simclr_jax.eval.knn) against a memory of
1,281,167 x 2048 float32 features (ImageNet's train split, ResNet-50's h) with
abstract inputs (jax.ShapeDtypeStruct: nothing of that size is allocated) and
prints compiled.memory_analysis() per device: arguments, outputs, temporaries.
  * old, 1 device: the algorithm before the memory bank was sharded: the whole
    memory, a dense [N, classes] one-hot of its labels and a [chunk, N]
    similarity block on one device;
  * new, 1 device and new, 8 devices: the memory sharded over the mesh, each
    device scanning its shard in blocks with a running top-k.
Without 8 devices (the XLA_FLAGS above fake them on a CPU) the 8-device row is
skipped. Figures go to stdout and, with --json, to a file.
"""

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (15, 13, 10, 11)  # columns of the table


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", type=int, default=1_281_167, help="memory rows N")
    parser.add_argument("--dim", type=int, default=2048, help="feature width C")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=512, help="queries per call")
    parser.add_argument("--block", type=int, default=0, help="0: knn.DEFAULT_BLOCK_SIZE")
    parser.add_argument("--devices", default="1,8", help="device counts of the new algorithm")
    parser.add_argument("--json", default="")
    return parser.parse_args(argv)


def old_step(train_feats, train_onehot, test_feats, temperature, *, k):
    """The single-device algorithm the sharded one replaced, as it was."""
    import jax
    import jax.numpy as jnp

    sims = test_feats @ train_feats.T  # [m, N]
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)  # [m, k]
    votes = train_onehot[top_idx]  # [m, k, classes]
    return jnp.einsum("mk,mkc->mc", weights, votes)


def _figures(compiled) -> dict:
    analysis = compiled.memory_analysis()
    if analysis is None:  # some backends do not report a plan
        return {}
    fields = ("argument", "output", "temp")
    row = {f"{f}_gib": getattr(analysis, f"{f}_size_in_bytes") / 2**30 for f in fields}
    row["total_gib"] = sum(row.values())
    return row


def measure_old(args) -> dict:
    import functools

    import jax

    f32 = "float32"
    specs = (
        jax.ShapeDtypeStruct((args.memory, args.dim), f32),
        jax.ShapeDtypeStruct((args.memory, args.num_classes), f32),
        jax.ShapeDtypeStruct((args.chunk, args.dim), f32),
        jax.ShapeDtypeStruct((), f32),
    )
    step = jax.jit(functools.partial(old_step, k=min(args.k, args.memory)))
    return {"setting": "old, 1 device", **_figures(step.lower(*specs).compile())}


def measure_new(args, num_devices: int) -> dict:
    import jax

    from simclr_jax import sharding
    from simclr_jax.eval import knn

    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    per_device, block = knn.memory_layout(
        args.memory, num_devices, args.block or knn.DEFAULT_BLOCK_SIZE
    )
    rows = sharding.batch_sharding(mesh)
    replicated = sharding.replicated_sharding(mesh)
    padded = per_device * num_devices
    specs = (
        jax.ShapeDtypeStruct((padded, args.dim), "float32", sharding=rows),
        jax.ShapeDtypeStruct((padded,), "int32", sharding=rows),
        jax.ShapeDtypeStruct((args.chunk, args.dim), "float32", sharding=replicated),
        jax.ShapeDtypeStruct((), "float32", sharding=replicated),
    )
    step = knn.make_knn_step(
        mesh, k=min(args.k, args.memory), num_classes=args.num_classes, block=block
    )
    row = {"setting": f"new, {num_devices} device{'s' if num_devices > 1 else ''}"}
    row.update(block=block, rows_per_device=per_device)
    return {**row, **_figures(step.lower(*specs).compile())}


def main(argv):
    args = parse_args(argv)
    import jax

    rows = [measure_old(args)]
    for count in (int(d) for d in args.devices.split(",")):
        if count > jax.device_count():
            print(f"skipped: {count} devices (this process sees {jax.device_count()})")
            continue
        rows.append(measure_new(args, count))
    for row in rows:
        print(json.dumps(row), flush=True)
    print(
        f"\nkNN step per device, memory {args.memory} x {args.dim} float32, "
        f"{args.num_classes} classes, k={args.k}, {args.chunk} queries per chunk "
        f"({jax.devices()[0].platform}):"
    )
    print(
        f"{'setting':<18}{'arguments GiB':>15}{'outputs GiB':>13}{'temp GiB':>10}{'total GiB':>11}"
    )
    nan = float("nan")
    for row in rows:
        figures = [row.get(f"{f}_gib", nan) for f in ("argument", "output", "temp", "total")]
        print(
            f"{row['setting']:<18}"
            + "".join(f"{x:>{w}.3f}" for x, w in zip(figures, WIDTHS, strict=True))
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, _REPO)
    main(sys.argv[1:])
