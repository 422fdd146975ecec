"""The CPU boundary: simclr_jax.cpu is optional, the library never imports it, and a run's
config and checkpoint do not depend on the convolution it ran with."""

import contextlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest
from layout_test import import_graph
from main_test import REPO, TINY, env

from simclr_jax.cpu import conv_class, conv_layers, kernels

# Makes `import simclr_jax.cpu` (and its submodules) fail, as if the package were deleted, then
# runs main.py with the given arguments.
_BLOCKED_MAIN = """
import runpy, sys

class _NoCpu:
    def find_spec(self, name, path=None, target=None):
        if name == "simclr_jax.cpu" or name.startswith("simclr_jax.cpu."):
            raise ImportError(f"{name} is blocked by the test")
        return None

sys.meta_path.insert(0, _NoCpu())
sys.argv = ["main.py"] + sys.argv[1:]
try:
    runpy.run_path("main.py", run_name="__main__")
except SystemExit as done:  # absl's app.run exits
    assert not any(m.startswith("simclr_jax.cpu") for m in sys.modules), "imported simclr_jax.cpu"
    print("simclr_jax.cpu was not imported")
    sys.exit(done.code)
"""


def test_only_entry_points_import_the_cpu_package():
    graph = import_graph()
    outside = {
        module: sorted(t for t in targets if t.startswith("simclr_jax.cpu"))
        for module, targets in graph.items()
        if not module.startswith("simclr_jax.cpu")
    }
    assert {m: t for m, t in outside.items() if t} == {}
    assert "simclr_jax.cpu.conv_layers" in graph["simclr_jax.cpu.conv_class"]  # edges are seen


def test_xla_flags_module_imports_no_jax():
    code = "import sys; from simclr_jax.cpu import xla_flags; print('jax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_choices_resolve_per_backend():
    assert conv_class.conv_class("auto", backend="gpu") is nn.Conv
    assert conv_class.conv_class("xla", backend="tpu") is nn.Conv
    assert conv_class.describe(conv_class.conv_class("matmul", backend="gpu")) == "matmul"
    with pytest.raises(ValueError, match="must be one of"):
        conv_class.conv_class("cudnn")
    with pytest.raises(ValueError, match="CPU library"):
        conv_class.conv_class("onednn", backend="gpu")
    with pytest.raises(ValueError, match="must be one of"):
        conv_class.conv_class("native", backend="cpu")  # the removed hand-written kernels
    # conftest applied simclr_jax.cpu.xla_flags: XLA keeps its own convolution kernel, the
    # fallback where oneDNN is not installed.
    expected = "onednn" if kernels.available() else "xla"
    with pytest.warns(UserWarning) if expected == "xla" else contextlib.nullcontext():
        conv = conv_class.conv_class("auto", backend="cpu")
    assert conv_class.describe(conv) == expected + "+fork"
    assert issubclass(conv, nn.Conv)
    if expected == "onednn":
        assert issubclass(conv, conv_layers.OneDnnConv)


def _run(args, *, blocked: bool, timeout=400):
    cmd = [sys.executable, "-c", _BLOCKED_MAIN] if blocked else [sys.executable, "main.py"]
    cache = f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}"
    proc = subprocess.run(
        cmd + args + [cache],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_runs_work_without_the_cpu_package(tmp_path):
    """Pretrain with the CPU boundary (oneDNN where installed), then evaluate with
    simclr_jax.cpu blocked (XLA's convolutions): the checkpoint and config.json carry no trace of
    the convolution. Then pretrain with it blocked, too."""
    assert jax.device_count() == 8
    pre = tmp_path / "pretrain"
    _run(
        [f"--workdir={pre}", *TINY, "--config.train.steps=2", "--config.eval.knn=False"],
        blocked=False,
    )
    with open(pre / "config.json") as f:
        model = json.load(f)["model"]
    assert not {"conv_impl", "shortcut_fork"} & set(model)
    knn = tmp_path / "knn"
    _run(
        [
            "--config=configs/knn.py",
            f"--config.init_from={pre}",
            f"--workdir={knn}",
            "--config.eval.num_devices=1",
        ],
        blocked=True,
    )
    with open(knn / "results.json") as f:
        results = json.load(f)
    assert results["summary"]["examples"] == 1000 and 0.0 <= results["top1"] <= 1.0
    blocked = tmp_path / "blocked"
    out = _run([f"--workdir={blocked}", *TINY, "--config.train.steps=2"], blocked=True)
    assert "[step 2/2]" in out
    assert "simclr_jax.cpu was not imported" in out
    with open(blocked / "results.json") as f:
        assert 0.0 <= json.load(f)["knn_top1"] <= 1.0
