"""simclr_jax.files on local paths and on TensorFlow's in-memory 'ram://' filesystem.

ram:// stands in for gs:// (both go through tf.io.gfile, neither can be written
with os/open). Like an object store it creates directories implicitly; unlike
one, its 'w' mode does not truncate an existing file, which the overwrite
tests would catch. The writers of config.json, results.json, metrics.jsonl,
exports and the ablation's cell files are checked on a ram:// workdir.
"""

import io
import json
import os
import uuid

import numpy as np
import pytest
from clu import metric_writers

from simclr_jax import (
    checkpoint,
    export,
    files,
    train,
)
from simclr_jax.eval import pretrained as pretrained_lib
from simclr_jax.eval import reports
from simclr_jax.metrics import MetricLogger
from simclr_jax.sweep import results as sweep_results


@pytest.fixture(params=["local", "ram"])
def root(request, tmp_path):
    """A fresh, existing directory: local, or on ram:// (unique per test)."""
    if request.param == "local":
        return str(tmp_path)
    path = f"ram://files_test_{uuid.uuid4().hex}"
    files.makedirs(path)
    return path


@pytest.fixture
def ram_tensorboard(monkeypatch):
    """Lets clu's default writer take ram:// paths.

    clu normalises the log directory with etils.epath, which knows gs:// but not
    ram://; the TensorBoard writer itself (tf.summary) handles both. So for
    ram:// the same writers are built without that step.
    """
    original = metric_writers.create_default_writer

    def create(logdir, *, just_logging=False, asynchronous=True):
        if just_logging or not files.is_remote(logdir):
            return original(logdir, just_logging=just_logging, asynchronous=asynchronous)
        writers = [metric_writers.LoggingWriter(), metric_writers.SummaryWriter(logdir)]
        return metric_writers.MultiWriter(writers)

    monkeypatch.setattr(metric_writers, "create_default_writer", create)


def _ram_dir() -> str:
    path = f"ram://files_test_{uuid.uuid4().hex}"
    files.makedirs(path)
    return path


def test_is_remote_and_path_helpers():
    assert files.is_remote("gs://bucket/run") and files.is_remote("ram://x")
    assert not files.is_remote("/tmp/run") and not files.is_remote("workdirs/run")
    assert files.join("gs://bucket/", "run", "config.json") == "gs://bucket/run/config.json"
    assert files.join("/a", "b") == os.path.join("/a", "b")
    assert files.dirname("gs://bucket/run/checkpoints/") == "gs://bucket/run"
    assert files.basename("gs://bucket/run/checkpoints/7/") == "7"
    assert files.abspath("gs://bucket/run") == "gs://bucket/run"  # not '<cwd>/gs:/bucket/run'
    assert files.abspath("run") == os.path.join(os.getcwd(), "run")
    # Orbax would otherwise be handed a local directory literally named 'gs:'.
    assert checkpoint.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"


def test_write_read_exists_listdir(root):
    sub = files.join(root, "a", "b")
    assert not files.exists(sub)
    files.makedirs(sub)
    files.makedirs(sub)  # again: no error
    assert files.exists(sub) and files.isdir(sub)
    path = files.join(sub, "x.json")
    text = json.dumps({"name": "Zürich ✓", "n": 3})
    files.write_text(path, text)
    assert files.exists(path) and not files.isdir(path)
    assert files.read_text(path) == text
    assert json.loads(files.read_text(path))["name"] == "Zürich ✓"
    files.write_bytes(files.join(sub, "y.bin"), memoryview(b"\x00\x01\xff"))
    assert files.read_bytes(files.join(sub, "y.bin")) == b"\x00\x01\xff"
    # No temporary file is left beside the written ones.
    assert sorted(files.listdir(sub)) == ["x.json", "y.bin"]
    assert files.listdir(files.join(root, "a")) == ["b"]
    files.remove(files.join(sub, "y.bin"))
    assert not files.exists(files.join(sub, "y.bin"))
    with pytest.raises(FileNotFoundError):
        files.listdir(files.join(root, "missing"))


def test_overwrite_replaces_whole_content(root):
    path = files.join(root, "results.json")
    files.write_text(path, "a long first version of the file")
    files.write_text(path, "short")
    assert files.read_text(path) == "short"
    # A temporary file left by a killed write is not prepended to the next one.
    files.write_text(path + files.TMP_SUFFIX, "garbage from a killed write")
    files.write_text(path, "third")
    assert files.read_text(path) == "third"
    assert sorted(files.listdir(root)) == ["results.json"]


def test_failed_write_leaves_old_content(root, monkeypatch):
    path = files.join(root, "config.json")
    files.write_text(path, "old")

    def fail(*args, **kwargs):
        raise OSError("killed mid-write")

    if files.is_remote(root):
        monkeypatch.setattr(files._gfile(), "rename", fail)
    else:
        monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="killed"):
        files.write_text(path, "new content that never lands")
    monkeypatch.undo()
    assert files.read_text(path) == "old"


def test_append_file(root):
    path = files.join(root, "metrics.jsonl")
    with files.open_append(path) as f:
        f.write("1\n")
        f.flush()
        assert files.read_text(path) == "1\n"
        f.write("2\n")
        f.write("3\n")
        f.flush()
        assert files.read_text(path) == "1\n2\n3\n"
        f.write("4\n")  # reaches the file at close()
    assert files.read_text(path) == "1\n2\n3\n4\n"
    # Reopening appends after the existing lines (a resumed run).
    appender = files.open_append(path)
    appender.write("5\n")
    appender.close()
    assert files.read_text(path) == "1\n2\n3\n4\n5\n"
    assert sorted(files.listdir(root)) == ["metrics.jsonl"]


def test_metric_logger_on_ram_workdir(ram_tensorboard):
    workdir = files.join(_ram_dir(), "run")  # does not exist yet: the logger creates it
    logger = MetricLogger(workdir, total_steps=10, is_main=True)
    logger.write_scalars(1, {"train/loss": np.float32(2.5), "train/lr": 0.1})
    logger.write_scalars(2, {"train/loss": 1.25})
    lines = files.read_text(files.join(workdir, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert [json.loads(x)["train/loss"] for x in lines] == [2.5, 1.25]
    logger.close()
    assert any(n.startswith("events.out.tfevents") for n in files.listdir(workdir))
    # A second logger on the same workdir (the evaluation after a run) appends.
    logger = MetricLogger(workdir, total_steps=10, is_main=True)
    logger.write_scalars(3, {"eval/top1": 0.75})
    logger.close()
    records = [json.loads(x) for x in files.read_text(workdir + "/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["eval/top1"] == 0.75


def test_train_write_json_on_ram_workdir():
    workdir = _ram_dir()
    payload = {"model": {"depth": 18, "base_width": 8}, "seed": 0}
    path = files.join(workdir, files.CONFIG_FILE)
    train._write_json(path, payload)
    assert json.loads(files.read_text(path)) == payload
    train._write_json(path, {"seed": 1})
    assert json.loads(files.read_text(path)) == {"seed": 1}


def test_done_message_has_no_empty_segment():
    message = train._done_message({"step": 5}, 12.0, "w")
    assert message == "done: 5 steps, 12.0 img/s; results in w"
    message = train._done_message({"step": 5, "knn_top1": 0.5, "probe_top1": 0.25}, 12.0, "w")
    assert message == "done: 5 steps, 12.0 img/s; knn_top1 0.5000, probe_top1 0.2500; results in w"


def test_write_results_on_ram_workdir(ram_tensorboard):
    workdir = files.join(_ram_dir(), "linear_eval")
    scores = np.eye(3)[[0, 1, 2, 1]]
    labels = np.array([0, 1, 2, 2])
    summary = reports.summarize(scores, labels, ["a", "b", "c"])
    results = {"protocol": "linear_eval", "summary": summary, "top1": summary["top1"]}
    reports.write_results(workdir, results, step=7)
    assert json.loads(files.read_text(files.join(workdir, files.RESULTS_FILE))) == results
    png = files.read_bytes(files.join(workdir, reports.CONFUSION_FILE))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    record = json.loads(files.read_text(files.join(workdir, "metrics.jsonl")))
    assert record["step"] == 7 and record["eval/top1"] == pytest.approx(0.75)


def test_resolve_checkpoint_step_dir_on_ram():
    workdir = _ram_dir()
    files.makedirs(files.join(workdir, "checkpoints", "12"))
    ckpt_dir, step, config_path = pretrained_lib._resolve_checkpoint(workdir + "/checkpoints/12/")
    assert (ckpt_dir, step) == (workdir + "/checkpoints", 12)
    assert config_path == workdir + "/config.json"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained_lib._resolve_checkpoint(workdir + "/nothing")


def test_export_to_and_from_ram(monkeypatch):
    import ml_collections as mlc

    rng = np.random.default_rng(0)
    params = {
        "encoder": {"conv": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32)}},
        "head": {"dense_0": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}},
    }
    stats = {"encoder": {"bn": {"mean": rng.normal(size=(4,)).astype(np.float32)}}}
    fake = pretrained_lib.Pretrained(
        path="x",
        step=3,
        model_config=mlc.ConfigDict({"depth": 18}),
        params=params,
        batch_stats=stats,
        probe_classes=2,
    )
    monkeypatch.setattr(pretrained_lib, "load_pretrained", lambda init_from: fake)
    out = files.join(_ram_dir(), "encoder.npz")
    assert export.export_encoder("unused", out) == out
    loaded = export.load_exported(out)
    np.testing.assert_array_equal(
        loaded["params"]["encoder"]["conv"]["kernel"], params["encoder"]["conv"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["params"]["head"]["dense_0"]["kernel"], params["head"]["dense_0"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["encoder"]["bn"]["mean"], stats["encoder"]["bn"]["mean"]
    )
    assert export.load_exported_model_config(out) == {"depth": 18}
    with np.load(io.BytesIO(files.read_bytes(out))) as data:
        assert int(data[export.STEP_KEY]) == 3


def test_sweep_cell_files_on_ram(ram_tensorboard):
    sweep = _ram_dir()
    cell = "b32_e1_sqrt_t0.2"
    assert sweep_results.cell_status(sweep, cell) == "pending"
    files.makedirs(files.join(sweep, cell, "pretrain"))
    assert sweep_results.cell_status(sweep, cell) == "started"
    # What a TPU cell's train.py and linear eval write into the bucket.
    train._write_json(files.join(sweep, cell, "pretrain", "results.json"), {"knn_top1": 0.3})
    assert sweep_results.cell_status(sweep, cell) == "pretrained"
    linear = files.join(sweep, cell, "linear_eval")
    reports.write_results(linear, {"top1": 0.4, "top5": 0.9}, step=1)
    assert sweep_results.cell_status(sweep, cell) == "done"
    sweep_results.write_json(files.join(sweep, cell, "cell.json"), {"name": cell})
    assert sweep_results.read_json(files.join(sweep, cell, "cell.json")) == {"name": cell}
    assert sweep_results.old_cells(sweep, []) == [cell]
    assert sweep_results.old_cells(sweep, [cell]) == []
