"""Multi-host correctness on one machine: 2 processes x 4 CPU devices with jax.distributed (gloo).

What is compared:
- the train step itself (global BN, NT-Xent gather, gradient pmean, LARS) on one
  identical global batch under both layouts: each process feeds its half of the
  batch, the 1x8 reference runs in the pytest process; the updated parameters
  must agree to 1e-5 (float32, different reduction trees); the same for BYOL, an
  EMA method (two steps built as train.py builds a method config): its online
  parameters, its EMA target's parameters and the target's BN statistics; and for MoCo v2
  its query and key encoders and its queue (keys all_gathered in global batch order) and
  queue position;
- NT-Xent in the 2x4 layout equals a NumPy full-global-batch reference and
  differs from the loss a per-host-only gather would give;
- the batch layout: make_global_batch puts process p's local rows where
  distributed.process_batch_rows says, the block [p*b, (p+1)*b) on the default
  mesh (the pipeline's default batch_rows) and other rows on a mesh that
  interleaves the processes;
- the real CLI: a 2x4 run killed with kill -9 (both processes) after its first
  checkpoint and restarted ends with exactly the parameters of an
  uninterrupted 2x4 run (determinism and resume exactness together), both
  processes' checkpoints are complete and restorable, and a 1x8 run of the
  same config ends with the same parameters as the 2x4 run up to float32
  reduction order (the data order does not depend on the process count) and
  kNN / probe accuracies within a few of the 1,000 examples;
- a process that cannot reach the coordinator fails within the timeout and
  names the address.

Run as a script (`python tests/multihost_test.py step OUT ADDRESS N ID`) it is
the per-process worker of the train-step and layout comparisons.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from counting import correct_count  # noqa: E402
from losses_test import np_nt_xent  # noqa: E402
from main_test import TINY  # noqa: E402

from simclr_jax.cpu import xla_flags  # noqa: E402

GLOBAL_BATCH = 16
PARAM_TOL = 1e-5
LOSS_TOL = 1e-5
# 2x4 vs 1x8 through main.py, 6 steps of the TINY config (test_cli_2x4_..._matches_1x8). The
# layouts add cross-device sums in different orders: XLA:CPU's in-process all-reduce adds
# devices 0..7 in turn, gloo's ring all-reduce starts each eighth of a buffer at another device
# (benchmarks/multihost_parity.py shows both). Every psum (gradient mean, global-BN moments, the
# reduce-scatter behind the NT-Xent all_gather's gradient) then differs by about an ulp, and
# LARS and batch-16 global BN grow that ~3x every 2 steps at the runs' base_lr 0.5
# (CLI_BASE_LR). Measured max |param diff| on an Intel Xeon (Ice Lake, AVX-512), 1x8 against
# 1x4 (the same sums in another order, in one process): 1.2e-6 / 3.2e-6 / 8.7e-6 after steps
# 2 / 4 / 6; 1x8 against 2x4 in this test: 3.0e-7 / 1.8e-6 / 4.9e-6. Tolerance: ~10x those.
# A wrong batch moves parameters by far more (steps 3-6 move them by 0.23, checked below).
CLI_PARAM_TOL = 1e-4
# At the runlocal config's base_lr (1.0) this tiny network's loss rises in steps 3-4 and the
# same float32 rounding differences grow ~700x in those two steps (1x8 against 1x4: 2.7e-6
# after step 2, 1.9e-3 after step 4; steps 3-6 resumed from one step-2 checkpoint on 4 and on
# 8 devices agree to 2e-6, so the steps themselves are equal): half that LR keeps the runs in
# the regime where rounding differences stay rounding differences.
CLI_BASE_LR = "--config.optim.base_lr=0.5"
# kNN / probe decisions that may flip between the layouts out of the 1,000 held-out examples
# (near-ties under features ~1e-6 apart): measured 1 (kNN top-1) on the Xeon, 2 on the EPYC.
CLI_FLIPPED_EXAMPLES = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # The same XLA:CPU flags as conftest/main.py, so workers and the in-process reference resolve
    # the CPU convolution alike.
    xla_flags.apply(env)
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------
# The train-step worker (runs under both layouts).


def _fixed_inputs():
    rng = np.random.default_rng(1234)
    batch = {
        "view1": rng.uniform(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
        "view2": rng.uniform(size=(GLOBAL_BATCH, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=(GLOBAL_BATCH,)).astype(np.int32),
    }
    z = rng.normal(size=(2, GLOBAL_BATCH, 8)).astype(np.float32)
    return batch, z


def step_outputs() -> dict[str, np.ndarray]:
    """Two train steps and one NT-Xent evaluation on fixed global inputs, any layout.

    Returns:
      {'loss': the 2-device-layout-independent NT-Xent value of the fixed z,
       'step_loss': the first step's contrastive loss, 'p/<path>': parameters,
       'byol/...': BYOL's online and EMA target variables (_byol_outputs)}.
    """
    import jax
    from jax.sharding import PartitionSpec as P

    from configs import cifar10
    from simclr_jax import losses, models, optim, sharding, steps

    config = cifar10.get_config("runlocal")
    config.model.base_width = 4
    config.model.head_hidden_dim = 16
    config.model.head_dim = 16
    mesh = sharding.create_mesh(jax.devices())
    model = models.build_model(config.model, num_classes=10, bn_axis_name=sharding.DATA_AXIS)
    tx, schedule = optim.create_optimizer(
        config.optim, batch_size=GLOBAL_BATCH, total_steps=4, warmup_steps=1
    )
    init = jax.jit(
        lambda k: steps.create_train_state(model, tx, k, (32, 32, 3)),
        out_shardings=sharding.replicated_sharding(mesh),
    )
    state = init(jax.random.key(0))
    step_fn = steps.compile_train_step(
        lambda s, b: steps.train_step(
            s,
            b,
            model=model,
            tx=tx,
            learning_rate_fn=schedule,
            temperature=0.5,
            loss_scale=2.0,
            axis_name=sharding.DATA_AXIS,
            sync_batch_stats=False,
        ),
        parallelism="shard_map",
        mesh=mesh,
    )
    batch, z = _fixed_inputs()
    # Each process feeds only its own rows; the mesh puts process 0's devices first.
    per_host = GLOBAL_BATCH // jax.process_count()
    rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
    local = {k: v[rows] for k, v in batch.items()}
    global_batch = sharding.make_global_batch(local, mesh)
    step_fn = _compile_then_barrier(step_fn, "train_step", state, global_batch)
    step_losses = []
    for _ in range(2):
        state, metrics = step_fn(state, global_batch)
        step_losses.append(metrics.loss.compute())

    loss_fn = jax.jit(
        jax.shard_map(
            lambda a, b: losses.nt_xent(a, b, temperature=0.5, axis_name=sharding.DATA_AXIS)[0],
            mesh=mesh,
            in_specs=(P(sharding.DATA_AXIS), P(sharding.DATA_AXIS)),
            out_specs=P(),
            check_vma=False,
        )
    )
    zg = sharding.make_global_batch({"a": z[0][rows], "b": z[1][rows]}, mesh)
    loss_fn = _compile_then_barrier(loss_fn, "nt_xent", zg["a"], zg["b"])
    out = {"loss": loss_fn(zg["a"], zg["b"]), "step_loss": step_losses[0]}
    out.update(_flat("p/", state.params))
    return {
        **_host(out),
        **_byol_outputs(mesh, global_batch),
        **_mocov2_outputs(mesh, global_batch),
    }


def _host(arrays: dict) -> dict[str, np.ndarray]:
    # Replicated global arrays: every process holds a full copy on its devices.
    return {k: np.asarray(v.addressable_data(0)) for k, v in arrays.items()}


def _flat(prefix, tree):
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in flat}


def _two_method_steps(config, mesh, global_batch, name):
    """Two steps of config's method on the fixed global batch, built as train.py builds them.

    Returns:
      (the initial online params on the host, {'<name>/p/<path>': the params after two steps},
      the state after two steps).
    """
    import jax

    from simclr_jax import methods, optim, sharding, steps

    model = methods.build_model(config, num_classes=10, bn_axis_name=sharding.DATA_AXIS)
    method = methods.from_config(config, total_steps=4)
    tx, schedule = optim.create_optimizer(
        config.optim, batch_size=GLOBAL_BATCH, total_steps=4, warmup_steps=1
    )
    init = jax.jit(
        lambda k: method.create_state(model, tx, k, (32, 32, 3)),
        out_shardings=sharding.replicated_sharding(mesh),
    )
    state = init(jax.random.key(0))
    initial = _host(_flat(f"{name}/p0/", state.params))  # the step donates the state
    step_fn = steps.compile_train_step(
        lambda s, b: steps.train_step(
            s,
            b,
            model=model,
            tx=tx,
            learning_rate_fn=schedule,
            method=method,
            axis_name=sharding.DATA_AXIS,
            sync_batch_stats=False,
        ),
        parallelism="shard_map",
        mesh=mesh,
    )
    step_fn = _compile_then_barrier(step_fn, f"{name}_train_step", state, global_batch)
    for _ in range(2):
        state, _ = step_fn(state, global_batch)
    return initial, _host(_flat(f"{name}/p/", state.params)), state


def _byol_outputs(mesh, global_batch) -> dict:
    """Two BYOL steps (an EMA method) on the fixed global batch.

    Returns:
      {'byol/p/<path>': online params, 'byol/t/<path>': EMA target params,
       'byol/ts/<path>': target BN statistics, 'byol/p0/<path>': the initial online params},
      on the host.
    """
    from configs import byol_cifar10

    config = byol_cifar10.get_config("runlocal")
    config.model.base_width = 4
    config.method.projector_hidden_dim = 16
    config.method.projector_dim = 8
    config.method.predictor_hidden_dim = 16
    initial, out, state = _two_method_steps(config, mesh, global_batch, "byol")
    out.update(initial)
    out.update(_host(_flat("byol/t/", state.target_params)))
    out.update(_host(_flat("byol/ts/", state.target_batch_stats)))
    return out


def _mocov2_outputs(mesh, global_batch) -> dict:
    """Two MoCo v2 steps (a queue of 32 rows, global batch 16: it wraps).

    Returns:
      {'mocov2/p/<path>': query params, 'mocov2/t/<path>': key encoder params,
       'mocov2/queue': [32, 8] keys, 'mocov2/ptr': the write position}, on the host.
    """
    from configs import mocov2_cifar10

    config = mocov2_cifar10.get_config("runlocal")
    config.model.base_width = 4
    config.method.projector_hidden_dim = 16
    config.method.projector_dim = 8
    config.method.queue_size = 2 * GLOBAL_BATCH
    _, out, state = _two_method_steps(config, mesh, global_batch, "mocov2")
    out.update(_host(_flat("mocov2/t/", state.target_params)))
    out.update(_host({"mocov2/queue": state.queue, "mocov2/ptr": state.queue_ptr}))
    return out


def _compile_then_barrier(fn, name, *args):
    """distributed.compile_then_barrier with a generous timeout.

    On 2 loaded cores one process can finish compiling long after the other;
    the first collective would then time out in gloo.
    """
    from simclr_jax import distributed

    return distributed.compile_then_barrier(fn, name, *args, timeout_s=600)


def layout_outputs() -> dict[str, np.ndarray]:
    """Where make_global_batch puts this process's local rows, on two meshes.

    Returns:
      {'rows/<mesh>': process_batch_rows, 'placed/<mesh>': the global array
      built from local rows holding their own predicted row numbers, gathered}
      for the default mesh and one that interleaves the processes' devices.
    """
    import jax
    from jax.experimental import multihost_utils

    from simclr_jax import distributed, sharding

    devices = jax.devices()
    by_process = [[d for d in devices if d.process_index == p] for p in range(2)]
    meshes = {
        "default": sharding.create_mesh(devices),
        "interleaved": sharding.create_mesh(
            [d for pair in zip(*by_process, strict=True) for d in pair]
        ),
    }
    out = {}
    for name, mesh in meshes.items():
        rows = distributed.process_batch_rows(mesh, GLOBAL_BATCH)
        placed = sharding.make_global_batch({"x": rows.astype(np.float32)}, mesh)["x"]
        out[f"rows/{name}"] = rows
        out[f"placed/{name}"] = np.asarray(multihost_utils.process_allgather(placed, tiled=True))
    return out


def _nt_xent_numpy(z1, z2, tau):
    """The float64 NT-Xent reference of losses_test (loss only)."""
    return np_nt_xent(z1, z2, tau)[0]


def _wait_all(procs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1, deadline - time.time()))


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_train_step_2x4_matches_1x8_and_nt_xent_sees_every_host(tmp_path):
    port = _free_port()
    procs = []
    try:
        for pid in range(2):
            cmd = [sys.executable, __file__, "step", str(tmp_path / f"out{pid}.npz"),
                   f"127.0.0.1:{port}", "2", str(pid)]  # fmt: skip
            with open(tmp_path / f"log{pid}.txt", "w") as log:  # the child keeps its own fd
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(4), stdout=log, stderr=log))
        reference = step_outputs()  # 1 process x 8 devices, while the pair runs
        _wait_all(procs, 300)
    finally:
        _kill_all(procs)
    for pid, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"log{pid}.txt").read_text()[-3000:]
    outs = [dict(np.load(tmp_path / f"out{pid}.npz")) for pid in range(2)]
    for pid, out in enumerate(outs):
        layout = {k: out.pop(k) for k in list(out) if k.startswith(("rows/", "placed/"))}
        # Each process filled its local rows with the global row numbers it was
        # told they land on: the gathered global array must read 0, 1, 2, ...
        for mesh in ("default", "interleaved"):
            np.testing.assert_array_equal(layout[f"placed/{mesh}"], np.arange(GLOBAL_BATCH))
        local = GLOBAL_BATCH // 2
        np.testing.assert_array_equal(layout["rows/default"], np.arange(local) + pid * local)
        # Interleaved mesh: devices alternate between processes, 2 rows each.
        pairs = [(4 * i + 2 * pid, 4 * i + 2 * pid + 1) for i in range(GLOBAL_BATCH // 4)]
        np.testing.assert_array_equal(layout["rows/interleaved"], np.ravel(pairs))
    assert set(outs[0]) == set(reference) and len(reference) > 10
    for key, ref in reference.items():
        for out in outs:
            np.testing.assert_allclose(out[key], ref, rtol=PARAM_TOL, atol=PARAM_TOL, err_msg=key)
    # BYOL's EMA target (encoder and projector) was compared too, and not vacuously: the 2
    # steps moved the online params (measured max 0.069) and the target, an EMA at tau 0.99,
    # lags them (max |target - online| 0.066); the layouts differed by at most 1.2e-7.
    byol = {
        kind: {k.split("/", 2)[2]: v for k, v in reference.items() if k.startswith(f"byol/{kind}/")}
        for kind in ("p0", "p", "t", "ts")
    }
    assert byol["t"] and byol["ts"] and set(byol["t"]) < set(byol["p"]) == set(byol["p0"])
    online, start, target = byol["p"], byol["p0"], byol["t"]
    assert max(float(np.abs(online[k] - start[k]).max()) for k in online) > 100 * PARAM_TOL
    assert max(float(np.abs(target[k] - online[k]).max()) for k in target) > 100 * PARAM_TOL
    # MoCo v2's queue (all_gathered keys of both steps, global batch order) and its position.
    assert int(reference["mocov2/ptr"]) == 0 and reference["mocov2/queue"].shape == (32, 8)
    for out in outs:
        assert int(out["mocov2/ptr"]) == 0
    # The parameters did move (otherwise the comparison would prove nothing).
    _, z = _fixed_inputs()
    full = _nt_xent_numpy(z[0], z[1], 0.5)
    per_host = np.mean([_nt_xent_numpy(z[0][s], z[1][s], 0.5) for s in (slice(0, 8), slice(8, 16))])
    assert abs(full - per_host) > 1e-2
    for out in outs:
        np.testing.assert_allclose(out["loss"], full, rtol=LOSS_TOL)
        assert abs(float(out["loss"]) - per_host) > 1e-2


def _cli(workdir, port, pid, *extra):
    """The tiny CLI run; port None: a single process."""
    cmd = [sys.executable, "main.py", f"--workdir={workdir}", *TINY,
           "--config.eval.knn=False", "--config.checkpoint.every_steps=2", CLI_BASE_LR, *extra,
           f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}"]  # fmt: skip
    if port is None:
        return cmd
    return cmd + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={pid}", "--distributed_timeout=120"]  # fmt: skip


def _start_pair(workdir, log_prefix, *extra):
    port = _free_port()
    procs = []
    for pid in range(2):
        with open(f"{log_prefix}{pid}.txt", "w") as log:  # the child keeps its own fd
            procs.append(
                subprocess.Popen(
                    _cli(workdir, port, pid, *extra),
                    cwd=REPO,
                    env=_env(4),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
    return procs


def _finish_pair(procs, log_prefix, timeout=400):
    try:
        _wait_all(procs, timeout)
    finally:
        _kill_all(procs)
    logs = [pathlib.Path(f"{log_prefix}{pid}.txt").read_text() for pid in range(2)]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return logs


def _restore_params(workdir, step):
    from simclr_jax import checkpoint

    # Saved by 2 processes x 4 devices (or 1 x 8): restored onto this process's first device.
    restored = checkpoint.restore_to_host(checkpoint.checkpoint_dir(str(workdir)), step)
    return _flatten(restored["params"])


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: tree}


@pytest.mark.slow
def test_cli_2x4_checkpoints_resumes_after_kill_9_exactly_and_matches_1x8(tmp_path):
    from simclr_jax import checkpoint

    steps = "--config.train.steps=6"
    # The uninterrupted 2x4 run and the 1x8 run end with the kNN / probe
    # evaluation (multi-host feature extraction), compared below.
    knn = "--config.eval.knn=True"
    ref_dir, run_dir, single_dir = tmp_path / "ref", tmp_path / "run", tmp_path / "single"
    ref = _start_pair(ref_dir, str(tmp_path / "ref"), steps, knn)
    run = _start_pair(run_dir, str(tmp_path / "run"), steps)
    try:
        deadline = time.time() + 400
        while checkpoint.latest_step(str(run_dir)) is None:
            assert time.time() < deadline and all(p.poll() is None for p in run)
            time.sleep(0.05)
        for p in run:
            p.send_signal(signal.SIGKILL)
    finally:
        _kill_all(run)
    killed_at = checkpoint.latest_step(str(run_dir))
    # The 1x8 run of the same config, alongside the resumed pair.
    single_cmd = _cli(single_dir, None, 0, steps, knn)
    with open(tmp_path / "single.txt", "w") as log:  # the child keeps its own fd
        single = subprocess.Popen(
            single_cmd, cwd=REPO, env=_env(8), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        logs = _finish_pair(
            _start_pair(run_dir, str(tmp_path / "resume"), steps), tmp_path / "resume"
        )
        assert all(f"resumed from step {killed_at}" in log for log in logs)
        ref_logs = _finish_pair(ref, str(tmp_path / "ref"))
        _wait_all([single], 400)
    finally:
        _kill_all([single])
    assert single.returncode == 0, (tmp_path / "single.txt").read_text()[-3000:]
    assert "2 processes" in ref_logs[0]
    assert "8 devices x 1 processes" in (tmp_path / "single.txt").read_text()
    assert killed_at < 6, "killed too late to test resuming"
    ckpt_dir = checkpoint.checkpoint_dir(str(ref_dir))
    # Complete multi-process saves: finished step directories only, no leftovers.
    names = sorted(os.listdir(ckpt_dir))
    assert names == [n for n in names if n.isdigit()] and "6" in names, names
    for name in names:
        assert os.path.exists(os.path.join(ckpt_dir, name, "_CHECKPOINT_METADATA")), name
    a, b = _restore_params(ref_dir, 6), _restore_params(run_dir, 6)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Steps 3-6 move the parameters by far more than CLI_PARAM_TOL (measured
    # max 0.23), so other batches in the 1x8 run could not pass the check below.
    start = _restore_params(ref_dir, 2)
    assert max(float(np.abs(a[k] - start[k]).max()) for k in a) > 100 * CLI_PARAM_TOL
    # 1x8 against 2x4: the same global batches (the data order does not depend
    # on the process count) and the same math; only the order of the float32
    # cross-device sums differs (see CLI_PARAM_TOL).
    c = _restore_params(single_dir, 6)
    assert c.keys() == a.keys()
    worst = max(a, key=lambda k: float(np.abs(c[k] - a[k]).max()))
    diff = float(np.abs(c[worst] - a[worst]).max())
    assert diff <= CLI_PARAM_TOL, f"{worst}: max |1x8 - 2x4| = {diff:.3g} > {CLI_PARAM_TOL}"
    # Evaluation across 2 hosts: every test example scored once, and accuracies
    # that differ by at most a few near-ties. Compared as counts of examples
    # (integers), not as differences of float fractions.
    two_hosts = json.loads((ref_dir / "results.json").read_text())
    one_host = json.loads((single_dir / "results.json").read_text())
    assert two_hosts["num_processes"] == 2 and one_host["num_processes"] == 1
    for key in ("eval_examples", "knn_memory_examples"):
        assert two_hosts[key] == one_host[key] > 0, key
    n = one_host["eval_examples"]
    for key in ("knn_top1", "knn_top5", "probe_top1", "probe_top5"):
        counts = [correct_count(r[key], n) for r in (two_hosts, one_host)]
        assert abs(counts[0] - counts[1]) <= CLI_FLIPPED_EXAMPLES, (key, counts)


@pytest.mark.parametrize(
    "nodelist,first",
    [("gpu01", "gpu01"), ("gpu01,gpu02", "gpu01"), ("gpu[03-05,9]", "gpu03"),
     ("a-node[007,9],b[1-2]", "a-node007"), ("n[1-4]-ib", "n1-ib")],
)  # fmt: skip
def test_first_slurm_host(nodelist, first):
    from simclr_jax import distributed

    assert distributed.first_slurm_host(nodelist) == first


def test_resolve_settings_precedence_and_errors():
    from simclr_jax import distributed as d

    explicit = d.resolve_settings("10.0.0.1:1234", 4, 3, env={})
    assert explicit == d.Settings("explicit", "10.0.0.1:1234", 4, 3)
    env = {d.ENV_ADDRESS: "h:1", d.ENV_NUM_PROCESSES: "2", d.ENV_PROCESS_ID: "1"}
    assert d.resolve_settings(env=env) == d.Settings("explicit", "h:1", 2, 1)
    # Flags win over the environment.
    assert d.resolve_settings("x:9", 2, 0, env=env).coordinator_address == "x:9"
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_NODELIST": "gpu[04-05]"}
    assert d.resolve_settings(env=slurm) == d.Settings("slurm", "gpu04:12355", 8, 5)
    assert d.resolve_settings(env={**slurm, d.ENV_PORT: "999"}).coordinator_address == "gpu04:999"
    # A one-task SLURM job is a single process; a TPU VM lets JAX find its workers.
    assert d.resolve_settings(env={**slurm, "SLURM_NTASKS": "1"}).mode in ("single", "tpu")
    assert d.resolve_settings(env={"TPU_ACCELERATOR_TYPE": "v4-32"}).mode == "tpu"
    with pytest.raises(ValueError, match="num_processes=None"):
        d.resolve_settings("h:1", None, 0, env={})
    with pytest.raises(ValueError, match="process_id=2 is out of range for num_processes=2"):
        d.resolve_settings("h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="coordinator_address='nohost'"):
        d.resolve_settings("nohost", 2, 0, env={})
    with pytest.raises(ValueError, match="timeout_s=0"):
        d.initialize(timeout_s=0, env={})


def test_wait_for_coordinator():
    from simclr_jax import distributed

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        distributed.wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 5)
    address = f"127.0.0.1:{_free_port()}"
    t0 = time.time()
    with pytest.raises(distributed.CoordinatorUnreachableError, match=address):
        distributed.wait_for_coordinator(address, 1.5)
    assert 1.4 < time.time() - t0 < 10


@pytest.mark.slow
def test_unreachable_coordinator_fails_within_timeout_naming_it(tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # nobody listens here
    timeout = 3
    cmd = [sys.executable, "main.py", f"--workdir={tmp_path}", *TINY,
           f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
           f"--distributed_timeout={timeout}"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert address in proc.stderr and "could not reach" in proc.stderr, proc.stderr[-2000:]
    # Imports take a few seconds on a loaded machine; the wait itself is `timeout`.
    assert elapsed < timeout + 60
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


if __name__ == "__main__" and sys.argv[1:2] == ["step"]:
    _, _, out_path, address, count, pid = sys.argv
    from simclr_jax import distributed

    distributed.initialize(address, int(count), int(pid), timeout_s=120)
    try:
        np.savez(out_path, **step_outputs(), **layout_outputs())
    except BaseException as e:  # noqa: BLE001 - report, then leave without atexit hooks
        print(f"worker failed: {e!r}"[:3000], file=sys.stderr, flush=True)
        os._exit(1)
