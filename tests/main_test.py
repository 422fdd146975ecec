"""End-to-end: the real CLI in a subprocess on 8 fake CPU devices; SIGTERM and kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from simclr_jax import checkpoint, export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config=configs/cifar10.py:runlocal",
    "--config.model.base_width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.head_dim=16",
    "--config.train.batch_size=16",
]


def cli(workdir, *extra):
    return [
        sys.executable,
        "main.py",
        f"--workdir={workdir}",
        *TINY,
        *extra,
        f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}",
    ]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run_cli(workdir, *extra, timeout=400):
    proc = subprocess.run(
        cli(workdir, *extra), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_main(*args, timeout=120):
    """main.py with TF_CPP_MIN_LOG_LEVEL as a user has it (unset: main.py's default)."""
    e = env()
    e.pop("TF_CPP_MIN_LOG_LEVEL", None)
    cmd = [sys.executable, "main.py", *args]
    cmd.append(f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}")
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def assert_one_line_user_error(proc, *expected):
    """Exit status 2; stderr is one line 'error: ...' holding `expected`; no noise anywhere."""
    report = (
        f"status {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    assert proc.returncode == 2, report
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    for text in expected:
        assert text in lines[0], report
    both = proc.stdout + proc.stderr
    for noise in ("Traceback", "oneDNN", "absl::InitializeLog"):
        assert noise not in both, report


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--config=configs/cifar10.py:runlocal", "--config.loss.temperature=0"],
            ["config.loss.temperature=0.0 is invalid", "must be > 0"],
        ),
        (
            ["--config=configs/knn.py", "--config.init_from={tmp}/missing"],
            ["config.init_from='{tmp}/missing' does not exist"],
        ),
        (
            ["--config=configs/finetune.py", "--config.finetune.label_fraction=2.0"],
            ["finetune.label_fraction=2.0", "(0, 1]"],
        ),
    ],
    ids=["bad_value", "missing_init_from", "bad_eval_field"],
)
def test_a_user_error_prints_one_line_and_exits_2(tmp_path, args, expected):
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run_main(*args, f"--workdir={tmp_path / 'run'}")
    assert_one_line_user_error(proc, *[x.format(tmp=tmp_path) for x in expected])
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_a_bad_split_of_pretraining_fails_before_training(tmp_path):
    """The issue's example: the end-of-run evaluation's split used to fail after training."""
    proc = run_main(
        "--config=configs/cifar10.py:runlocal",
        "--config.data.eval_split=val",
        f"--workdir={tmp_path}",
    )
    assert_one_line_user_error(
        proc, "config.data.eval_split='val' is invalid", "available ['train', 'test']"
    )
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_a_bad_split_of_an_evaluation_prints_one_line_and_exits_2(tiny_pretrained_run, tmp_path):
    proc = run_main(
        "--config=configs/knn.py",
        f"--config.init_from={tiny_pretrained_run}",
        "--config.data.eval_split=validation",
        f"--workdir={tmp_path}",
        timeout=400,
    )
    assert_one_line_user_error(
        proc, "config.data.eval_split='validation' is invalid", "['train', 'test']"
    )


@pytest.mark.slow
def test_cli_trains_checkpoints_and_evaluates(tmp_path):
    out = run_cli(tmp_path, "--config.train.steps=4", "--config.checkpoint.every_steps=2")
    assert "compiled and ran the first step" in out
    assert "[step 4/4]" in out
    assert checkpoint.latest_step(str(tmp_path)) == 4
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["num_devices"] == 8
    assert results["train_step_compilations"] == 1  # 4 steps, one compilation
    for key in ("knn_top1", "probe_top1", "images_per_sec", "compile_seconds"):
        assert key in results
    assert 0.0 <= results["knn_top1"] <= 1.0
    assert results["eval_examples"] == 1000  # every held-out image exactly once
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps[-1] == 4
    # A mistyped field fails loudly: the config is locked.
    proc = subprocess.run(
        cli(tmp_path / "bad", "--config.train.bacth_size=8"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "bacth_size" in proc.stderr


def _wait_for(predicate, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen(
        cli(
            workdir,
            "--config.train.steps=400",
            "--config.train.log_every_steps=1",
            "--config.checkpoint.every_steps=1000",
            "--config.eval.knn=False",
        ),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    assert _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc, 300)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped early" in out
    saved = checkpoint.latest_step(workdir)
    assert saved is not None and 1 <= saved < 400
    out = run_cli(
        workdir,
        "--config.train.steps=400",
        f"--config.train.stop_at_step={saved + 2}",
        "--config.eval.knn=False",
    )
    assert f"resumed from step {saved}" in out
    assert checkpoint.latest_step(workdir) == saved + 2


@pytest.mark.slow
def test_kill_9_loses_only_steps_since_last_checkpoint(tmp_path):
    workdir = str(tmp_path)
    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    proc = subprocess.Popen(
        cli(
            workdir,
            "--config.train.steps=400",
            "--config.checkpoint.every_steps=2",
            "--config.eval.knn=False",
        ),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def saving_or_saved_twice():
        if not os.path.isdir(ckpt_dir):
            return False
        names = os.listdir(ckpt_dir)
        # Prefer killing in the middle of a save (a temporary directory exists).
        return any("tmp" in n for n in names) or sum(n.isdigit() for n in names) >= 2

    assert _wait_for(saving_or_saved_twice, proc, 300)
    proc.kill()
    proc.wait()
    complete = checkpoint.latest_step(workdir)
    out = run_cli(
        workdir,
        "--config.train.steps=400",
        f"--config.train.stop_at_step={(complete or 0) + 2}",
        "--config.eval.knn=False",
    )
    if complete:
        assert f"resumed from step {complete}" in out
    assert checkpoint.latest_step(workdir) == (complete or 0) + 2


_READER_FLAGS = {
    "knn": ["--config.eval.knn_k=20"],
    "linear_eval": ["--config.linear.epochs=1"],
    "finetune": ["--config.finetune.epochs=0.1", "--config.finetune.batch_size=40"],
}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["knn", "linear_eval", "finetune"])
def test_a_checkpoint_of_8_devices_is_evaluated_on_1(tiny_pretrained_run, tmp_path, protocol):
    """Written by 8 devices, restored in a 1-device process (explicit target shardings)."""
    e = env()
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    cmd = [sys.executable, "main.py", f"--config=configs/{protocol}.py",
           f"--config.init_from={tiny_pretrained_run}", f"--workdir={tmp_path}",
           "--config.eval.batch_size=250", *_READER_FLAGS[protocol],
           f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["checkpoint"]["step"] == 4 and results["summary"]["examples"] == 1000
    assert results["num_devices"] == 1


@pytest.mark.slow
def test_a_checkpoint_of_8_devices_is_exported_on_1(tiny_pretrained_run, tmp_path):
    """The exporter restores an 8-device checkpoint in a 1-device process, bit for bit."""
    e = env()
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    out = str(tmp_path / "encoder.npz")
    cmd = [sys.executable, "-m", "simclr_jax.export", f"--workdir={tiny_pretrained_run}",
           f"--out={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exported = export.flatten_variables(export.load_exported(out))
    saved = checkpoint.restore_to_host(checkpoint.checkpoint_dir(tiny_pretrained_run), 4)
    saved = export.flatten_variables(
        {"params": saved["params"], "batch_stats": saved["batch_stats"]}
    )
    assert any(k.startswith("encoder/") for k in exported)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)
