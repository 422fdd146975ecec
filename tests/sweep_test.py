"""simclr_jax.sweep, the ablation tool: config validation, cells, commands, resume, report.

Runner-logic tests use a fake stage runner that writes results.json files; one
slow test runs a real tiny cell (two main.py child processes) end to end.
"""

import csv
import json
import math
import os
import shlex
import struct
import subprocess
import sys
import warnings

import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs import ablation_cifar10, ablation_imagenet, ablation_tiny
from simclr_jax import config_checks
from simclr_jax.sweep import commands, grid, launch, report, results, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Typed in from REFERENCE.md (paper Table B.1), independently of the module's copy.
PAPER = {
    (256, 100): (57.5, 62.8),
    (256, 800): (66.6, 66.5),
    (4096, 100): (64.6, 64.5),
    (8192, 800): (69.0, 69.1),
}


def parse_main_args(args):
    """What main.py's flag parser builds from main.py arguments (run from the repo root)."""
    argv = ["main.py", *[a for a in args if not a.startswith("--workdir=")]]
    cwd = os.getcwd()
    os.chdir(REPO)  # config paths in the commands are relative to the repository root
    try:
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ml_collections' load_module()
            fv(argv)
        return fv.config
    finally:
        os.chdir(cwd)


def tiny(batch_sizes=(32, 64), epochs=(1.0, 2.0), scalings=("sqrt",), temps=(0.2,)):
    config = ablation_tiny.get_config()
    config.grid.batch_sizes = batch_sizes
    config.grid.epochs = epochs
    config.grid.lr_scalings = scalings
    config.grid.temperatures = temps
    config.micro_batch_size = 0
    return config


def fake_top1(cell):
    """A made-up but distinct accuracy per cell (for checking that values travel intact)."""
    return round(0.1 + cell.batch_size / 10000 + cell.epochs / 100 + cell.temperature / 7, 6)


class FakeRunner:
    """Records every stage and writes what main.py would write; can fail or be 'killed'."""

    def __init__(self, fail=(), interrupt=None, crash=()):
        self.calls = []
        self.fail, self.interrupt, self.crash = set(fail), interrupt, set(crash)

    def __call__(self, stage):
        key = (stage.cell.name, stage.kind)
        self.calls.append(key)
        os.makedirs(stage.workdir, exist_ok=True)
        if key == self.interrupt:
            raise KeyboardInterrupt  # the sweep is killed while this stage runs
        if key in self.crash:
            raise RuntimeError("simulated crash")
        if key in self.fail:
            return 1
        if stage.kind == "pretrain":
            payload = {"step": 10, "knn_top1": 0.2, "probe_top1": 0.15, "images_per_sec": 99.0}
        else:
            payload = {"top1": fake_top1(stage.cell), "top5": 0.9}
        with open(os.path.join(stage.workdir, "results.json"), "w") as f:
            json.dump(payload, f)
        return 0


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: setattr(c.grid, "batch_sizes", ()), "grid.batch_sizes"),
        (lambda c: setattr(c.grid, "epochs", ()), "grid.epochs"),
        (lambda c: setattr(c.grid, "lr_scalings", ("cosine",)), "grid.lr_scalings"),
        (lambda c: setattr(c.grid, "temperatures", (0.0,)), "grid.temperatures"),
        (lambda c: setattr(c.grid, "batch_sizes", (64, 64)), "grid.batch_sizes"),
        (lambda c: setattr(c.grid, "batch_sizes", (64, 384)), "micro_batch_size"),
        (lambda c: setattr(c.base_lr, "sqrt", 0.0), "base_lr.sqrt"),
        (lambda c: setattr(c.pretrain.train, "steps", 5), "pretrain.train.steps"),
        (lambda c: setattr(c.pretrain.optim, "warmup_epochs", 1.5), "pretrain.optim.warmup_epochs"),
        (lambda c: setattr(c, "reference", "cifar100"), "reference"),
        (lambda c: setattr(c, "pretrain_config", "configs/nope.py"), "pretrain_config"),
    ],
)
def test_bad_ablation_configs_raise_naming_the_field(edit, field):
    config = tiny()
    config.micro_batch_size = 256
    config.grid.batch_sizes = (64, 128)
    edit(config)
    with pytest.raises(ValueError, match=f"config.{field}="):
        grid.validate_ablation_config(config)


def test_shipped_ablation_configs_validate():
    for module in (ablation_cifar10, ablation_imagenet, ablation_tiny):
        grid.validate_ablation_config(module.get_config())
    for method in OTHER_METHODS:
        grid.validate_ablation_config(ablation_tiny.get_config(method))
    with pytest.raises(ValueError, match="unknown config argument 'byl'"):
        ablation_tiny.get_config("byl")
    assert len(ablation_imagenet.get_config().grid.batch_sizes) == 6


# ------------------------------------------------------- cell configs, commands


def test_cells_set_the_grid_and_commands_rebuild_each_cell(tmp_path):
    config = ablation_imagenet.get_config()
    cells = grid.build_cells(config, str(tmp_path))
    assert len(cells) == 6 * 4 * 2 * 1
    assert len({c.name for c in cells}) == len(cells)
    by_name = {c.name: c for c in cells}
    for name in ("b256_e100_linear_t0.1", "b8192_e800_sqrt_t0.1", "b4096_e400_sqrt_t0.1"):
        cell = by_name[name]
        args = commands.stage_args(config, cell, str(tmp_path))
        pre = parse_main_args(args["pretrain"])
        assert pre.train.batch_size == cell.batch_size
        assert pre.train.epochs == cell.epochs
        assert pre.loss.temperature == 0.1
        assert pre.optim.lr_scaling == cell.lr_scaling
        assert pre.optim.base_lr == {"linear": 0.3, "sqrt": 0.075}[cell.lr_scaling]
        assert pre.model.depth == 50 and pre.data.name == "imagenet2012"
        if "micro_batch_size" in pre.train:
            assert pre.train.micro_batch_size == (4096 if cell.batch_size > 4096 else 0)
        lin = parse_main_args(args["linear_eval"])
        assert lin.protocol == "linear_eval"
        assert lin.init_from == os.path.join(str(tmp_path), name, "pretrain")
        assert lin.data.name == "imagenet2012" and lin.data.eval_split == "validation"
        assert lin.augment.image_size == 224
        assert lin.linear.mode == "reference" and lin.linear.epochs == 90
        assert args["pretrain"][1] == f"--workdir={tmp_path}/{name}/pretrain"
    # The paper's pairing of the two rules: the same peak LR at B = 4096.
    assert math.isclose(0.3 * 4096 / 256, 0.075 * math.sqrt(4096))


def test_micro_batches_only_for_batches_above_the_threshold(tmp_path):
    config = tiny(batch_sizes=(64, 128, 256), epochs=(1.0,))
    config.micro_batch_size = 128
    if "micro_batch_size" not in config.pretrain.train:  # a tree from before micro-batching
        with config.pretrain.train.unlocked():
            config.pretrain.train.micro_batch_size = 0
    cells = grid.build_cells(config, str(tmp_path))
    assert {c.batch_size: c.pretrain.train.micro_batch_size for c in cells} == {
        64: 0,
        128: 0,
        256: 128,
    }
    assert [c.micro_batch_size for c in cells] == [0, 0, 128]
    # A base config from before micro-batching (no such field): no micro-batches.
    config = tiny(batch_sizes=(64, 256), epochs=(1.0,))
    config.micro_batch_size = 128
    with config.pretrain.train.unlocked():
        if "micro_batch_size" in config.pretrain.train:
            del config.pretrain.train["micro_batch_size"]
    cells = grid.build_cells(config, str(tmp_path))
    assert [c.micro_batch_size for c in cells] == [0, 0]
    assert "micro_batch_size" not in cells[1].pretrain.train


# ------------------------------------------------------------- other methods

# ablation_tiny's argument -> its base config file (the methods' quickstart configs).
OTHER_METHODS = {
    "byol": "configs/byol_cifar10.py:quickstart",
    "mocov3": "configs/mocov3_cifar10.py:quickstart",
    "mocov2": "configs/mocov2_cifar10.py:quickstart",
    "barlow_twins": "configs/barlow_twins_cifar10.py:quickstart",
    "vicreg": "configs/vicreg_cifar10.py:quickstart",
    "nnclr": "configs/nnclr_cifar10.py:quickstart",
    "instdisc": "configs/instdisc_cifar10.py:quickstart",
}
# What ablation_tiny and the grid change in the base config (tiny grid: batch 64-256, sqrt LR).
GRID_EDITS = {
    "train.batch_size",
    "train.epochs",
    "train.micro_batch_size",
    "train.log_every_steps",
    "optim.base_lr",
    "optim.lr_scaling",
    "optim.warmup_epochs",
    "eval.knn",
    "eval.compare_random_init",
}


def test_the_temperature_axis_sets_the_temperature_each_method_reads(tmp_path):
    expected = {
        "simclr": "loss.temperature",
        "mocov3": "method.temperature",
        "mocov2": "method.temperature",
        "nnclr": "method.temperature",
        "instdisc": "method.temperature",
        "byol": None,
        "barlow_twins": None,
        "vicreg": None,
    }
    for method, field in expected.items():
        assert grid.temperature_field(ablation_tiny.get_config(method).pretrain) == field, method
    # MoCo v3: method.temperature per cell, loss.temperature (unread) left alone.
    config = ablation_tiny.get_config("mocov3")
    config.grid.batch_sizes = (64,)
    config.grid.epochs = (1.0,)
    config.grid.temperatures = (0.1, 0.5)
    cells, args = grid.prepare_cells(config, str(tmp_path))
    assert [c.name for c in cells] == ["b64_e1_sqrt_t0.1", "b64_e1_sqrt_t0.5"]
    base_loss_t = config.pretrain.loss.temperature
    for cell in cells:
        assert cell.pretrain.method.temperature == cell.temperature
        assert cell.pretrain.loss.temperature == base_loss_t
        parsed = parse_main_args(args[cell.name]["pretrain"])
        assert parsed.method.name == "mocov3"
        assert parsed.method.temperature == cell.temperature
        assert parsed.loss.temperature == base_loss_t
    assert "--config.method.temperature=0.5" in args["b64_e1_sqrt_t0.5"]["pretrain"]
    assert not [a for a in args["b64_e1_sqrt_t0.5"]["pretrain"] if "loss.temperature" in a]
    # A SimCLR tree without a method section (older configs): loss.temperature.
    config = tiny(batch_sizes=(64,), epochs=(1.0,), temps=(0.1, 0.3))
    with config.pretrain.unlocked():
        del config.pretrain["method"]
    grid.validate_ablation_config(config)
    cells = grid.build_cells(config, str(tmp_path))
    assert [c.pretrain.loss.temperature for c in cells] == [0.1, 0.3]
    assert "method" not in cells[0].pretrain


def test_methods_without_temperature_or_micro_batching_fail_up_front(tmp_path):
    config = ablation_tiny.get_config("byol")
    config.grid.temperatures = (0.1, 0.2)
    with pytest.raises(
        config_checks.ConfigError, match=r"config\.grid\.temperatures=.*'byol'.*no temperature"
    ):
        grid.prepare_cells(config, str(tmp_path))
    for method in ("byol", "mocov3"):
        config = ablation_tiny.get_config(method)
        config.micro_batch_size = 128
        with pytest.raises(
            config_checks.ConfigError, match=rf"config\.micro_batch_size=128.*'{method}'"
        ):
            grid.prepare_cells(config, str(tmp_path))
    # Methods that micro-batch keep the tiny grid's micro-batches; one temperature is a label.
    config = ablation_tiny.get_config("vicreg")
    config.grid.temperatures = (0.7,)
    cells = grid.build_cells(config, str(tmp_path))
    assert [c.micro_batch_size for c in cells] == [0, 0, 0, 0, 128, 128]
    # The cells differ only in their batch, epochs and micro-batches: 0.7 is a label.
    flat = [commands.flatten_config(c.pretrain.to_dict()) for c in cells]
    changed = {k for f in flat for k in f if f[k] != flat[0][k]}
    assert changed == {"train.batch_size", "train.epochs", "train.micro_batch_size"}
    assert "temperature" not in cells[0].pretrain.method
    assert cells[0].pretrain.loss.temperature == config.pretrain.loss.temperature
    assert cells[0].name.endswith("_t0.7")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_the_micro_batching_list_agrees_with_the_method_registry():
    from simclr_jax import methods

    supported = {n for n, m in methods.METHODS.items() if methods.supports_micro_batching(m)}
    assert supported == set(config_checks.MICRO_BATCHING_METHODS)
    assert supported == {"simclr", "barlow_twins", "vicreg"}
    assert methods.DEFAULT_METHOD == config_checks.DEFAULT_METHOD == "simclr"
    for method in OTHER_METHODS:
        pretrain = ablation_tiny.get_config(method).pretrain
        assert methods.method_name(pretrain) == config_checks.method_name(pretrain) == method


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_ablation_tiny_of_another_method_runs_that_methods_config(method, tmp_path):
    config = ablation_tiny.get_config(method)
    assert config.pretrain_config == OTHER_METHODS[method]
    assert config.reference == "none"  # the SimCLR paper's figures do not apply
    cells, args = grid.prepare_cells(config, str(tmp_path))
    assert len(cells) == 6
    assert {c.pretrain.method.name for c in cells} == {method}
    micro = 128 if method in config_checks.MICRO_BATCHING_METHODS else 0
    assert {c.batch_size: c.micro_batch_size for c in cells} == {64: 0, 128: 0, 256: micro}
    base = commands.flatten_config(parse_main_args([f"--config={OTHER_METHODS[method]}"]).to_dict())
    for cell in (cells[0], cells[-1]):
        pre_args = args[cell.name]["pretrain"]
        assert pre_args[0] == f"--config={OTHER_METHODS[method]}"
        parsed = parse_main_args(pre_args)
        assert parsed.method.name == method
        assert parsed.to_dict() == cell.pretrain.to_dict()
        assert parsed.train.batch_size == cell.batch_size
        assert parsed.train.micro_batch_size == cell.micro_batch_size
        # Everything else is the method's quickstart config.
        flat = commands.flatten_config(parsed.to_dict())
        assert {k for k in flat if flat[k] != base[k]} <= GRID_EDITS
    out = launch.launch_commands(config, str(tmp_path), "slurm")
    assert out.startswith(f"# {method} ablation, 6 cells")
    assert out.count(f"launch/slurm.sbatch --config={OTHER_METHODS[method]} ") == 6


def test_a_field_main_py_cannot_set_is_an_error(tmp_path):
    config = tiny()
    with config.pretrain.data.unlocked():
        config.pretrain.data.not_a_field = 1  # absent from the base config file
    cell = grid.build_cells(config, str(tmp_path))[0]
    with pytest.raises(ValueError, match="data.not_a_field"):
        commands.stage_args(config, cell, str(tmp_path))


def test_data_dir_reaches_both_stages(tmp_path):
    # None in the base file, but typed (a FieldReference), so main.py can set it.
    config = tiny()
    config.pretrain.data.data_dir = "/somewhere"
    cell = grid.build_cells(config, str(tmp_path))[0]
    args = commands.stage_args(config, cell, str(tmp_path))
    for stage in ("pretrain", "linear_eval"):
        assert "--config.data.data_dir=/somewhere" in args[stage]


def test_print_commands_cover_unfinished_cells_only(tmp_path, capsys):
    config = tiny()
    workdir = str(tmp_path)
    cells = grid.build_cells(config, workdir)
    # Cell 0 finished; cell 1 only pretrained; cells 2 and 3 untouched.
    for cell, stages in ((cells[0], ("pretrain", "linear_eval")), (cells[1], ("pretrain",))):
        for kind in stages:
            os.makedirs(tmp_path / cell.name / kind)
            (tmp_path / cell.name / kind / "results.json").write_text('{"top1": 0.5}')
    out = launch.launch_commands(config, workdir, "slurm")
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert not [c for c in commands if cells[0].name in c]
    assert [c for c in commands if cells[1].name in c] == [
        c for c in commands if c.startswith("sbatch launch/slurm.sbatch --config=configs/linear")
    ]
    for cell in cells[2:]:
        mine = [c for c in commands if f"/{cell.name}/" in c]
        assert mine[0].startswith("jid=$(sbatch --parsable launch/slurm.sbatch")
        assert mine[1].startswith("sbatch --dependency=afterok:$jid launch/slurm.sbatch")
        words = shlex.split(mine[0].removeprefix("jid=$(").removesuffix(")"))
        parsed = parse_main_args(words[words.index("launch/slurm.sbatch") + 1 :])
        assert parsed.train.batch_size == cell.batch_size and parsed.train.epochs == cell.epochs
    tpu = launch.launch_commands(config, workdir, "tpu", launcher_args="--name=x --zone=z")
    tpu_cmds = [line for line in tpu.splitlines() if line.startswith("launch/tpu.sh")]
    assert len(tpu_cmds) == 1 + 2 * 2
    words = shlex.split(tpu_cmds[-2])
    assert words[1:3] == ["--name=x", "--zone=z"] and "--" in words
    parsed = parse_main_args([words[3]] + words[words.index("--") + 1 :])
    assert parsed.optim.lr_scaling == "sqrt" and parsed.train.batch_size == cells[3].batch_size
    assert not os.path.exists(tmp_path / "manifest.json")  # printing writes nothing


# ------------------------------------------------------------ runner logic


def test_killed_sweep_reruns_only_the_missing_stages(tmp_path, capsys):
    config = tiny()
    workdir = str(tmp_path)
    names = [c.name for c in grid.build_cells(config, workdir)]
    assert names == ["b32_e1_sqrt_t0.2", "b32_e2_sqrt_t0.2", "b64_e1_sqrt_t0.2", "b64_e2_sqrt_t0.2"]
    first = FakeRunner(interrupt=(names[2], "linear_eval"))
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(config, workdir, stage_runner=first)
    assert first.calls == [
        (names[0], "pretrain"),
        (names[0], "linear_eval"),
        (names[1], "pretrain"),
        (names[1], "linear_eval"),
        (names[2], "pretrain"),
        (names[2], "linear_eval"),
    ]
    assert [results.cell_status(workdir, n) for n in names] == [
        "done",
        "done",
        "pretrained",
        "pending",
    ]
    second = FakeRunner()
    assert runner.run_sweep(config, workdir, stage_runner=second) == 0
    assert second.calls == [
        (names[2], "linear_eval"),
        (names[3], "pretrain"),
        (names[3], "linear_eval"),
    ]
    out = capsys.readouterr().out
    assert f"cell 1/4 {names[0]}: finished earlier" in out
    assert f"cell 4/4 {names[3]}: pretraining ..." in out
    third = FakeRunner()
    assert runner.run_sweep(config, workdir, stage_runner=third) == 0
    assert third.calls == []


def test_a_failed_cell_does_not_stop_the_sweep_and_is_retried(tmp_path):
    config = tiny()
    workdir = str(tmp_path)
    names = [c.name for c in grid.build_cells(config, workdir)]
    fake = FakeRunner(fail=[(names[0], "pretrain")], crash=[(names[2], "linear_eval")])
    assert runner.run_sweep(config, workdir, stage_runner=fake) == 1
    # The failed pretraining skips its linear eval; every other cell still ran.
    assert (names[0], "linear_eval") not in fake.calls
    assert (names[3], "linear_eval") in fake.calls
    rows = report.write_summary_and_report(config, workdir)
    statuses = {r["name"]: r["status"] for r in rows}
    assert statuses == {names[0]: "failed", names[1]: "done", names[2]: "failed", names[3]: "done"}
    with open(tmp_path / names[0] / "failed.json") as f:
        assert json.load(f)["stage"] == "pretrain"
    md = (tmp_path / "report" / "ablation.md").read_text()
    assert "failed" in md
    retry = FakeRunner()
    assert runner.run_sweep(config, workdir, stage_runner=retry) == 0
    assert retry.calls == [
        (names[0], "pretrain"),
        (names[0], "linear_eval"),
        (names[2], "linear_eval"),
    ]
    assert not os.path.exists(tmp_path / names[0] / "failed.json")


def test_grid_changes_run_new_cells_note_old_ones_and_refuse_a_changed_recipe(tmp_path):
    workdir = str(tmp_path)
    runner.run_sweep(tiny(batch_sizes=(32,), epochs=(1.0,)), workdir, stage_runner=FakeRunner())
    grown = FakeRunner()
    runner.run_sweep(tiny(batch_sizes=(32, 64), epochs=(1.0,)), workdir, stage_runner=grown)
    assert grown.calls == [("b64_e1_sqrt_t0.2", "pretrain"), ("b64_e1_sqrt_t0.2", "linear_eval")]
    shrunk = tiny(batch_sizes=(64,), epochs=(1.0,))
    rows = report.write_summary_and_report(shrunk, workdir)
    assert [r["name"] for r in rows] == ["b64_e1_sqrt_t0.2"]
    md = (tmp_path / "report" / "ablation.md").read_text()
    assert "earlier grid" in md and "b32_e1_sqrt_t0.2" in md
    changed = tiny(batch_sizes=(64,), epochs=(1.0,))
    changed.base_lr.sqrt = 0.3
    with pytest.raises(ValueError, match="b64_e1_sqrt_t0.2.*optim.base_lr"):
        runner.run_sweep(changed, workdir, stage_runner=FakeRunner())
    moved = tiny(batch_sizes=(64,), epochs=(1.0,))
    moved.pretrain.train.log_every_steps = 3  # logging cadence may change on a rerun
    assert runner.run_sweep(moved, workdir, stage_runner=FakeRunner()) == 0


def test_a_sweep_of_an_older_version_still_resumes_and_reports(tmp_path):
    """Cells recorded when the CPU convolution was a model field (model.conv_impl,
    model.shortcut_fork) are the same recipe: rerun and --report_only accept them."""
    workdir = str(tmp_path)
    config = tiny(batch_sizes=(32,), epochs=(1.0,))
    runner.run_sweep(config, workdir, stage_runner=FakeRunner())
    path = tmp_path / "b32_e1_sqrt_t0.2" / results.CELL_FILE
    record = json.loads(path.read_text())
    record["pretrain"]["model"].update(conv_impl="auto", shortcut_fork="auto")
    path.write_text(json.dumps(record))
    again = FakeRunner()
    assert runner.run_sweep(config, workdir, stage_runner=again) == 0
    assert again.calls == []  # finished, nothing rerun
    assert [r["name"] for r in report.write_summary_and_report(config, workdir)] == [
        "b32_e1_sqrt_t0.2"
    ]


def test_cli_prints_commands_and_writes_the_report(tmp_path):
    def cli(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "simclr_jax.sweep",
                "--config=configs/ablation_tiny.py",
                f"--workdir={tmp_path}",
                "--config.grid.batch_sizes=(32, 64)",
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    printed = cli("--print_commands=slurm", "--config.grid.epochs=(3.0,)")
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert printed.stdout.count("jid=$(sbatch --parsable launch/slurm.sbatch") == 2
    assert "--config.train.epochs=3.0" in printed.stdout
    assert "--report_only" in printed.stdout and "--print_commands" not in printed.stdout
    config = tiny(batch_sizes=(32, 64), epochs=(0.5, 1.0))
    runner.run_sweep(config, str(tmp_path), stage_runner=FakeRunner())
    report_dir = tmp_path / "elsewhere"
    done = cli("--report_only", f"--report_dir={report_dir}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in report_dir.iterdir()} == {"ablation.md", "ablation.csv", "ablation.png"}
    # A grid with cells not run yet: the report still comes out, the exit status says so.
    more = cli("--report_only", "--config.grid.epochs=(0.5, 1.0, 2.0)")
    assert more.returncode == 1 and "not run" in (tmp_path / "report" / "ablation.md").read_text()
    missing = cli("--report_only", f"--workdir={tmp_path / 'nothing'}")
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_the_sweep_process_imports_neither_jax_nor_tensorflow():
    # The parent process only keeps the books; each stage's main.py child pays for
    # jax and TensorFlow, and their memory goes back to the system when it ends.
    code = (
        "import sys\n"
        "from simclr_jax.sweep import __main__, runner, report, grid\n"
        "from configs import ablation_tiny\n"
        "for m in ('byol', 'mocov3'):\n"
        "    grid.validate_ablation_config(ablation_tiny.get_config(m))\n"
        "    grid.build_cells(ablation_tiny.get_config(m), 'unused')\n"
        "assert runner.metrics.format_duration(3725) == '1h02m'\n"
        "print(sorted(m for m in ('jax', 'tensorflow', 'clu') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ report


def read_png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_report_of_a_finished_grid_matches_the_cells_results(tmp_path):
    config = tiny(batch_sizes=(32, 64, 128), epochs=(1.0, 2.0), scalings=("linear", "sqrt"))
    workdir = str(tmp_path)
    assert runner.run_sweep(config, workdir, stage_runner=FakeRunner()) == 0
    # Independent reading of what each cell wrote.
    expected = {}
    for name in os.listdir(tmp_path):
        path = tmp_path / name / "linear_eval" / "results.json"
        if path.exists():
            b, e, scaling, t = name.split("_")
            expected[(scaling, t[1:], int(b[1:]), e[1:])] = json.loads(path.read_text())["top1"]
    assert len(expected) == 12
    with open(tmp_path / "report" / "ablation.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 3  # (scaling, temperature) x batch
    seen = 0
    for line in table:
        for e in ("1", "2"):
            key = (line["lr_scaling"], line["temperature"], int(line["batch_size"]), e)
            assert float(line[f"ours_e{e}"]) == pytest.approx(100 * expected[key], abs=0.006)
            seen += 1
        assert not any(k.startswith("paper_") for k in line)  # CIFAR: no per-cell paper values
    assert seen == 12
    md = (tmp_path / "report" / "ablation.md").read_text()
    assert md.count("## lr_scaling =") == 2
    for value in expected.values():
        assert f"{100 * value:.1f}" in md
    assert "not in our reference" in md and "94.0%" in md
    width, height = read_png_size(tmp_path / "report" / "ablation.png")
    assert width > 100 and height > 100
    with Image.open(tmp_path / "report" / "ablation.png") as image:
        image.verify()
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)["cells"]
    assert {r["name"]: r["linear_top1"] for r in summary} == {
        f"b{k[2]}_e{k[3]}_{k[0]}_t{k[1]}": v for k, v in expected.items()
    }


def test_imagenet_report_puts_table_b1_beside_ours(tmp_path):
    config = ablation_imagenet.get_config()
    config.grid.batch_sizes = (256, 4096, 8192)
    config.grid.epochs = (100.0, 800.0)
    workdir = str(tmp_path)
    assert runner.run_sweep(config, workdir, stage_runner=FakeRunner()) == 0
    with open(tmp_path / "report" / "ablation.csv", newline="") as f:
        table = list(csv.DictReader(f))
    checked = 0
    for line in table:
        column = {"linear": 0, "sqrt": 1}[line["lr_scaling"]]
        for e in (100, 800):
            paper = PAPER.get((int(line["batch_size"]), e))
            if paper is not None:
                assert float(line[f"paper_e{e}"]) == paper[column]
                checked += 1
    assert checked == 2 * 4
    md = (tmp_path / "report" / "ablation.md").read_text()
    assert "*57.5*" in md and "*62.8*" in md and "*69.1*" in md
    assert "Table B.1" in md and "**ours**" in md and "*paper*" in md
    assert read_png_size(tmp_path / "report" / "ablation.png")[0] > 100


# ----------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_real_tiny_cell_runs_end_to_end(tmp_path):
    # The smallest real cell: ResNet-18 at base width 4 (the main_test model),
    # batch 16, ceil(0.02 * 250) = 5 steps. Micro-batching through the trainer
    # is tested in train_test.py; here the cost is compiling, so it stays off.
    config = tiny(batch_sizes=(16,), epochs=(0.02,))
    config.pretrain.model.base_width = 4
    config.pretrain.model.head_hidden_dim = 16
    config.pretrain.model.head_dim = 16
    config.pretrain.optim.warmup_epochs = 0.0
    config.pretrain.checkpoint.every_steps = 4
    config.linear_eval.linear.epochs = 5.0
    stage_runner = runner.SubprocessStageRunner(
        compilation_cache=os.environ["JAX_COMPILATION_CACHE_DIR"]
    )
    workdir = str(tmp_path)
    assert runner.run_sweep(config, workdir, stage_runner=stage_runner) == 0, [
        (p.name, p.read_text()[-3000:]) for p in tmp_path.glob("*/*.log")
    ]
    cell = tmp_path / "b16_e0.02_sqrt_t0.2"
    with open(cell / "pretrain" / "config.json") as f:
        run_config = json.load(f)
    assert run_config["train"]["batch_size"] == 16
    assert run_config["model"]["base_width"] == 4
    assert run_config["loss"]["temperature"] == 0.2
    assert run_config["optim"]["lr_scaling"] == "sqrt" and run_config["optim"]["base_lr"] == 0.2
    with open(cell / "pretrain" / "results.json") as f:
        assert json.load(f)["step"] == 5
    with open(cell / "linear_eval" / "results.json") as f:
        top1 = json.load(f)["top1"]
    assert 0.0 <= top1 <= 1.0
    with open(tmp_path / "report" / "ablation.csv", newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert float(line["ours_e0.02"]) == pytest.approx(100 * top1, abs=0.006)
    assert read_png_size(tmp_path / "report" / "ablation.png")[0] > 100
