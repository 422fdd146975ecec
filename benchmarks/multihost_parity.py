"""How far apart 2 processes x 4 devices and 1 process x 8 devices end, on this CPU.

  python benchmarks/multihost_parity.py [--config=configs/cifar10.py:runlocal] \
      [--steps=6] [--out=/tmp/parity] [-- --config.model.base_width=4 ...]

Runs `main.py` twice on the same config, seed and global batch, side by side on
this machine: as 2 local processes with 4 CPU devices each (jax.distributed on
127.0.0.1, gloo collectives) and as 1 process with 8 devices, checkpointing
every 2 steps and evaluating at the end (kNN and online probe). Prints, as one
JSON line each:

- `psum_order`: which order an 8-device psum adds its operands in, per layout
  (1 x 8: XLA:CPU's in-process all-reduce; 2 x 4: gloo's ring all-reduce),
  found by comparing the result bitwise with NumPy float32 sums in given orders;
- `params`: after each saved step, the largest |parameter difference| between
  the two runs, and the parameter it occurs in;
- `eval`: kNN / probe top-1 and top-5 as counts of correct examples, per run.

The two runs read bit-identical global batches (the data order does not depend
on the process count); every difference comes from the order of the float32
cross-device sums. The figures go into docs/multihost_parity.md.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PSUM_ELEMENTS = 80_000  # divisible by 8: gloo's ring splits the buffer into 8 chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_both(argv_for, timeout: float) -> None:
    """Starts the 2 x 4 pair and the 1 x 8 process; waits for all three."""
    port = _free_port()
    procs = [subprocess.Popen(argv_for(port, pid), cwd=ROOT, env=_env(4)) for pid in range(2)]
    procs.append(subprocess.Popen(argv_for(None, 0), cwd=ROOT, env=_env(8)))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        sys.exit(f"a run failed: exit codes {[p.returncode for p in procs]}")


# --- Which order psum adds in. ----------------------------------------------------------------


def _psum_operands() -> np.ndarray:
    rng = np.random.default_rng(0)
    scale = np.exp(rng.uniform(-8, 8, (8, PSUM_ELEMENTS)))  # wide magnitudes: order shows
    return (rng.standard_normal((8, PSUM_ELEMENTS)) * scale).astype(np.float32)


def _psum_worker(out_path: str, port: str | None, pid: int) -> None:
    """Runs one 8-device psum of _psum_operands() and saves the result (process 0)."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if port is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    x = _psum_operands()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    flat = x.reshape(-1)
    xg = jax.make_array_from_callback(flat.shape, NamedSharding(mesh, P("d")), lambda i: flat[i])
    psum = jax.shard_map(
        lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P(), check_vma=False
    )
    out = np.asarray(jax.jit(psum)(xg).addressable_data(0))
    if pid == 0:
        np.save(out_path, out)
    if port is not None:
        jax.distributed.shutdown()


def _describe_order(x: np.ndarray, got: np.ndarray) -> str:
    """Names the left-to-right device order that reproduces `got` bitwise, chunk by chunk."""

    def in_order(order, sl):
        acc = x[order[0], sl].copy()
        for d in order[1:]:
            acc = acc + x[d, sl]
        return acc

    sequential = list(range(8))
    if np.array_equal(in_order(sequential, slice(None)), got):
        return "devices 0, 1, ..., 7 in turn, for every element"
    starts = []
    bounds = np.linspace(0, len(got), 9).astype(int)
    for c in range(8):
        sl = slice(bounds[c], bounds[c + 1])
        found = [
            f"{s}{'+' if step == 1 else '-'}"
            for s in range(8)
            for step in (1, -1)
            if np.array_equal(in_order([(s + step * k) % 8 for k in range(8)], sl), got[sl])
        ]
        starts.append(found[0] if found else "?")
    return (
        "a ring: eighth c of the buffer is summed from device <start> going up (+) or down (-);"
        f" starts per eighth: {starts}"
    )


def psum_order(out_dir: str) -> dict:
    paths = {
        "1x8": os.path.join(out_dir, "psum_1x8.npy"),
        "2x4": os.path.join(out_dir, "psum_2x4.npy"),
    }

    def argv(port, pid):
        path = paths["1x8" if port is None else "2x4"]
        return [sys.executable, __file__, "--_psum_worker", path, str(port), str(pid)]

    _run_both(argv, timeout=300)
    x = _psum_operands()
    got = {k: np.load(v) for k, v in paths.items()}
    return {
        "orders": {k: _describe_order(x, v) for k, v in got.items()},
        "elements_that_differ": float(np.mean(got["1x8"] != got["2x4"])),
    }


# --- The two training runs. -------------------------------------------------------------------


def _restore_params(workdir: str, step: int) -> dict[str, np.ndarray]:
    import jax

    from simclr_jax import checkpoint

    state = checkpoint.restore_to_host(checkpoint.checkpoint_dir(workdir), step)
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(k): v for k, v in flat}


def training(config: str, steps: int, out_dir: str, extra: list[str]) -> list[dict]:
    dirs = {"2x4": os.path.join(out_dir, "run_2x4"), "1x8": os.path.join(out_dir, "run_1x8")}

    def argv(port, pid):
        workdir = dirs["1x8" if port is None else "2x4"]
        cmd = [sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}",
               f"--config.train.steps={steps}", "--config.checkpoint.every_steps=2",
               "--config.eval.knn=True", *extra]  # fmt: skip
        if port is not None:
            cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={pid}"]  # fmt: skip
        return cmd

    _run_both(argv, timeout=3600)
    lines = []
    for step in range(2, steps + 1, 2):
        a, b = _restore_params(dirs["2x4"], step), _restore_params(dirs["1x8"], step)
        diffs = {k: float(np.abs(a[k] - b[k]).max()) for k in a}
        worst = max(diffs, key=diffs.get)
        largest = max(float(np.abs(v).max()) for v in a.values())
        lines.append({"params": {"step": step, "max_abs_diff": diffs[worst], "where": worst,
                                 "max_abs_param": largest}})  # fmt: skip
    results = {}
    for name, workdir in dirs.items():
        with open(os.path.join(workdir, "results.json")) as f:
            r = json.load(f)
        n = r["eval_examples"]
        results[name] = {k: round(r[k] * n) for k in r if k.endswith(("_top1", "_top5"))}
        results[name]["eval_examples"] = n
    lines.append({"eval": results})
    return lines


def main(argv: list[str]) -> None:
    if argv[:1] == ["--_psum_worker"]:
        _, out_path, port, pid = argv
        _psum_worker(out_path, None if port == "None" else port, int(pid))
        return
    own, extra = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10.py:runlocal")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None, help="a new directory (default: a fresh temp dir)")
    args = parser.parse_args(own)
    if args.steps < 2 or args.steps % 2:
        parser.error(f"--steps={args.steps} must be even and >= 2 (checkpoints every 2 steps)")
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="multihost_parity_")
    else:
        os.makedirs(args.out)  # a new directory: the runs must not resume older ones
    print(json.dumps({"psum_order": psum_order(args.out)}), flush=True)
    for line in training(args.config, args.steps, args.out, extra):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
