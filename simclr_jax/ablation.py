r"""Batch-size ablation: a grid of pretraining + linear-evaluation runs, resumable, with a report.

  python -m simclr_jax.ablation --config=configs/ablation_tiny.py --workdir=/tmp/ablation_tiny
  python -m simclr_jax.ablation --config=configs/ablation_imagenet.py \
      --workdir=gs://bucket/ablation --print_commands=tpu
  python -m simclr_jax.ablation --config=configs/ablation_cifar10.py --workdir=DIR --report_only

An ablation config (configs/ablation_*.py) holds the base pretraining config
(`pretrain`, and `pretrain_config`, the config file it came from), the grid
axes (`grid.batch_sizes`, `grid.epochs`, `grid.lr_scalings`,
`grid.temperatures`), the base LR of each scaling rule (`base_lr.linear`,
`base_lr.sqrt`), the linear-evaluation settings (`linear_eval`, from
`linear_eval_config`; its data and augmentation are the pretraining ones),
`micro_batch_size` (cells with a larger batch train in micro-batches of this
many examples; 0 = never) and `reference` ('imagenet' | 'cifar10' | 'none', the
paper figures shown beside ours).

Every cell is two ordinary main.py runs: WORKDIR/<cell>/pretrain (the base
config file plus --config.* overrides) and WORKDIR/<cell>/linear_eval. Locally
they run one after another, each in a child process (a crash or OOM ends that
cell only and its memory goes back to the system); --print_commands prints the
same main.py arguments wrapped in launch/tpu.sh or launch/slurm.sbatch. Before
anything runs, every cell's override list is parsed back with main.py's flag
parser and must rebuild the cell's config exactly, so what runs is what the
manifest says (simclr_jax.ablation_commands builds and checks these command
lines; its public names are importable from here too). The sweep directory may
be gs:// for printed TPU commands and --report_only: cell files are read
through simclr_jax.files.

A cell is finished when linear_eval/results.json exists. A rerun skips finished
cells, starts unfinished ones where they stopped (pretraining resumes from its
last checkpoint) and retries failed ones. A failed stage does not stop the
sweep: the cell is reported as failed and the command exits with status 1 at
the end. The summary (summary.json, summary.csv) and the report (ablation.md,
ablation.csv, ablation.png; see simclr_jax.ablation_report) are rewritten at
the end of every run and by --report_only.
"""

import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import ml_collections as mlc

from simclr_jax import ablation_commands, ablation_report, config_checks, files

# The command-line half lives in ablation_commands; its public names are
# re-exported here (one import for users and tests).
from simclr_jax.ablation_commands import (  # noqa: F401 (re-exported)
    DEFAULT_LAUNCHER_ARGS,
    MAIN_PY,
    PLATFORMS,
    REPO_ROOT,
    argv_without,
    config_overrides,
    flatten_config,
    resolve_config_file,
    stage_args,
)

SCALINGS = config_checks.LR_SCALINGS
STAGES = ablation_report.STAGES
# Fields a rerun may change without invalidating a finished cell: where data
# lives, logging and checkpoint cadence, device selection, and the linear
# eval's init_from, which moves with the sweep workdir.
_RUN_ONLY_FIELDS = (
    "data.data_dir",
    "data.download",
    "data.extract_dir",
    "train.log_every_steps",
    "train.stop_at_step",
    "train.num_devices",
    "eval.num_devices",
    "eval.every_epochs",
    "checkpoint.",
    "init_from",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point: its name, values and the two configs its runs use."""

    name: str
    batch_size: int
    epochs: float
    lr_scaling: str
    temperature: float
    base_lr: float
    micro_batch_size: int
    pretrain: mlc.ConfigDict
    linear_eval: mlc.ConfigDict

    def grid_values(self) -> dict:
        """The cell's scalar fields (what the manifest and the summary record)."""
        names = ("batch_size", "epochs", "lr_scaling", "temperature", "base_lr", "micro_batch_size")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One main.py run of a cell: `args` are main.py's arguments (run from REPO_ROOT)."""

    cell: Cell
    kind: str  # 'pretrain' | 'linear_eval'
    args: tuple[str, ...]
    workdir: str
    log_path: str


# ------------------------------------------------------------------- validation


def _check_axis(config, axis: str) -> tuple:
    values = config.grid.get(axis)
    if not isinstance(values, tuple | list) or not values:
        config_checks.fail(f"grid.{axis}", values, "list at least one value, e.g. (256, 512).")
    if len(set(values)) != len(values):
        config_checks.fail(f"grid.{axis}", values, "remove the repeated values.")
    return tuple(values)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_ablation_config(config: mlc.ConfigDict) -> None:
    """Checks an ablation config before anything runs.

    Args:
      config: an ablation config (see configs/ablation_cifar10.py).

    Raises:
      ValueError: naming the first bad field, its value and what is allowed.
    """
    for field in (
        "pretrain_config",
        "pretrain",
        "linear_eval_config",
        "linear_eval",
        "grid",
        "base_lr",
        "micro_batch_size",
        "reference",
    ):
        if field not in config:
            config_checks.fail(
                field, None, "the field is missing; start from configs/ablation_cifar10.py."
            )
    batches = _check_axis(config, "batch_sizes")
    for b in batches:
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            config_checks.fail("grid.batch_sizes", batches, f"{b!r} is not a positive integer.")
    epochs = _check_axis(config, "epochs")
    for e in epochs:
        if not _is_number(e) or e <= 0:
            config_checks.fail("grid.epochs", epochs, f"{e!r} is not a positive number of epochs.")
    scalings = _check_axis(config, "lr_scalings")
    for s in scalings:
        if s not in SCALINGS:
            config_checks.fail("grid.lr_scalings", scalings, f"{s!r} is not one of {SCALINGS}.")
        lr = config.base_lr.get(s)
        if not _is_number(lr) or lr <= 0:
            config_checks.fail(
                f"base_lr.{s}", lr, f"the base LR of {s} scaling must be a number > 0."
            )
    temps = _check_axis(config, "temperatures")
    for t in temps:
        if not _is_number(t) or t <= 0:
            config_checks.fail("grid.temperatures", temps, f"{t!r} is not a temperature > 0.")
    micro = config.micro_batch_size
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 0:
        config_checks.fail("micro_batch_size", micro, "use an integer >= 0 (0: no micro-batches).")
    for b in batches:
        if micro and b > micro and b % micro:
            config_checks.fail(
                "micro_batch_size",
                micro,
                f"it must divide every batch size larger than it, and batch {b} = "
                f"{b // micro} x {micro} + {b % micro}; pick a divisor of {b}.",
            )
    if config.reference not in ablation_report.REFERENCES:
        config_checks.fail(
            "reference", config.reference, f"use one of {ablation_report.REFERENCES}."
        )
    if config.pretrain.train.steps:
        config_checks.fail(
            "pretrain.train.steps",
            config.pretrain.train.steps,
            "set it to 0: grid.epochs sets durations.",
        )
    warmup = config.pretrain.optim.warmup_epochs
    if warmup > min(epochs):
        config_checks.fail(
            "pretrain.optim.warmup_epochs",
            warmup,
            f"warmup is longer than the shortest budget in grid.epochs ({min(epochs):g}).",
        )
    for key in ("pretrain_config", "linear_eval_config"):
        resolve_config_file(config[key], key)


# ------------------------------------------------------------------------ cells


def cell_name(batch_size: int, epochs: float, lr_scaling: str, temperature: float) -> str:
    """'b256_e100_linear_t0.5': the cell's directory name."""
    return f"b{batch_size}_e{epochs:g}_{lr_scaling}_t{temperature:g}"


def supports_micro_batches(config: mlc.ConfigDict) -> bool:
    """Whether the base pretraining config has train.micro_batch_size."""
    return "micro_batch_size" in config.pretrain.train


def build_cells(config: mlc.ConfigDict, workdir: str) -> list[Cell]:
    """Every grid cell, batch-major, with its pretraining and linear-eval configs.

    Args:
      config: a validated ablation config.
      workdir: the sweep's directory (sets the linear eval's init_from).

    Returns:
      The cells; each pretraining config is checked with
      config_checks.validate_pretrain_config.
    """
    cells = []
    micro = config.micro_batch_size
    grid = config.grid
    for b, e, scaling, t in itertools.product(
        grid.batch_sizes, grid.epochs, grid.lr_scalings, grid.temperatures
    ):
        name = cell_name(b, e, scaling, t)
        pre = config.pretrain.copy_and_resolve_references()
        pre.train.batch_size = int(b)
        pre.train.epochs = float(e)
        pre.optim.lr_scaling = scaling
        pre.optim.base_lr = float(config.base_lr[scaling])
        pre.loss.temperature = float(t)
        cell_micro = micro if micro and b > micro else 0
        # Set only where the base config has the field (trees from before
        # micro-batching lack it), so the ablation runs on either.
        if supports_micro_batches(config):
            pre.train.micro_batch_size = cell_micro
        else:
            cell_micro = 0
        config_checks.validate_pretrain_config(pre)
        lin = config.linear_eval.copy_and_resolve_references()
        with lin.unlocked():
            # The linear eval reads the data the encoder was trained on.
            lin.data = pre.data.copy_and_resolve_references()
            lin.augment = pre.augment.copy_and_resolve_references()
        lin.init_from = files.join(workdir, name, "pretrain")
        values = (int(b), float(e), scaling, float(t), pre.optim.base_lr, cell_micro)
        cells.append(Cell(name, *values, pretrain=pre, linear_eval=lin))
    return cells


# ------------------------------------------------------------------ cell state


def _comparable(flat: dict) -> dict:
    return {
        k: v
        for k, v in flat.items()
        if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in _RUN_ONLY_FIELDS)
    }


def _cell_record(cell: Cell, args: dict) -> dict:
    return {
        "name": cell.name,
        "grid": cell.grid_values(),
        "pretrain": json.loads(cell.pretrain.to_json_best_effort()),
        "linear_eval": json.loads(cell.linear_eval.to_json_best_effort()),
        "main_py_args": {k: list(v) for k, v in args.items()},
    }


def check_cell_unchanged(cell: Cell, workdir: str) -> None:
    """Raises ValueError if the cell's directory was run with a different config.

    Resuming a checkpoint under another recipe would mix two runs in one cell;
    data locations, logging and checkpoint cadence may change.
    """
    path = files.join(workdir, cell.name, ablation_report.CELL_FILE)
    if not files.exists(path):
        return
    old = ablation_report.read_json(path)
    for kind in STAGES:
        new = _comparable(flatten_config(json.loads(getattr(cell, kind).to_json_best_effort())))
        before = _comparable(flatten_config(old.get(kind, {})))
        diff = sorted(k for k in set(new) | set(before) if new.get(k) != before.get(k))
        if diff:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise ValueError(
                f"cell {cell.name} in {workdir} was run with a different {kind} config ({shown}). "
                "Use a new --workdir for the new recipe, or delete that cell's directory."
            )


def _prepare(config: mlc.ConfigDict, workdir: str) -> tuple[list[Cell], dict]:
    validate_ablation_config(config)
    cells = build_cells(config, workdir)
    args = {cell.name: stage_args(config, cell, workdir) for cell in cells}
    for cell in cells:
        check_cell_unchanged(cell, workdir)
    return cells, args


# ------------------------------------------------------------------ the runner


class SubprocessStageRunner:
    """Runs a stage as `python main.py ...` in a child process, output to the stage's log.

    main.py sets TF_CPP_MIN_LOG_LEVEL and the compilation cache itself, so a
    child is configured exactly like a run started by hand.

    Args:
      compilation_cache: passed as main.py's --compilation_cache (None: its default).
    """

    def __init__(self, compilation_cache: str | None = None):
        self.compilation_cache = compilation_cache
        self._proc = None

    def __call__(self, stage: Stage) -> int:
        if not os.path.isfile(MAIN_PY):
            raise FileNotFoundError(
                f"{MAIN_PY} is missing: run the ablation from a source checkout"
            )
        argv = [sys.executable, MAIN_PY, *stage.args]
        if self.compilation_cache is not None:
            argv.append(f"--compilation_cache={self.compilation_cache}")
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with open(stage.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
            log.flush()
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
            )
            try:
                return self._proc.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached the child as well (same process group); let it end.
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                raise
            finally:
                self._proc = None

    def terminate(self) -> None:
        """Forwards SIGTERM: the child saves a checkpoint and exits (see train.py)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return (f"{h}h" if h else "") + f"{rest // 60}m{rest % 60:02d}s"


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _run_stage(runner: Callable[[Stage], int], stage: Stage, head: str, start: float) -> bool:
    """Runs one stage, records its time and outcome; True if it finished.

    Local sweeps only (run_sweep refuses remote workdirs), so plain os calls.
    """
    cell_dir = os.path.dirname(stage.workdir)
    results = os.path.join(stage.workdir, files.RESULTS_FILE)
    failed = os.path.join(cell_dir, ablation_report.FAILED_FILE)
    what = "pretraining" if stage.kind == "pretrain" else "linear eval"
    resuming = " (resuming)" if stage.kind == "pretrain" and os.path.exists(stage.workdir) else ""
    print(f"{head}: {what}{resuming} ... (log: {stage.log_path})", flush=True)
    t0 = time.time()
    try:
        rc = int(runner(stage))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one cell's crash must not end the sweep
        with open(stage.log_path, "a", encoding="utf-8") as log:
            log.write(f"the stage runner raised {type(e).__name__}: {e}\n")
        rc = 1
    seconds = time.time() - t0
    timing_path = os.path.join(cell_dir, ablation_report.TIMING_FILE)
    timing = ablation_report.read_json(timing_path) if os.path.exists(timing_path) else {}
    key = f"{stage.kind}_seconds"
    timing[key] = timing.get(key, 0.0) + seconds
    ablation_report.write_json(timing_path, timing)
    took = _duration(seconds)
    if rc == 0 and os.path.exists(results):
        if os.path.exists(failed):
            os.remove(failed)
        top1 = (
            ablation_report.read_json(results).get("top1") if stage.kind == "linear_eval" else None
        )
        extra = "" if top1 is None else f": linear top-1 {100 * top1:.1f}%"
        sweep = _duration(time.time() - start)
        print(f"{head}: {what} done in {took}{extra} (sweep {sweep})", flush=True)
        return True
    if rc == 0:  # stopped early (SIGTERM, train.stop_at_step): resumable, not a failure
        print(f"{head}: {what} stopped before the end after {took}; rerun to resume", flush=True)
        return False
    ablation_report.write_json(
        failed, {"stage": stage.kind, "returncode": rc, "log": stage.log_path}
    )
    print(
        f"{head}: {what} FAILED (exit {rc}) after {took}; the end of {stage.log_path}:\n"
        + _log_tail(stage.log_path),
        flush=True,
    )
    return False


def run_sweep(
    config: mlc.ConfigDict,
    workdir: str,
    *,
    stage_runner: Callable[[Stage], int] | None = None,
    report_dir: str | None = None,
) -> int:
    """Runs every unfinished cell, one stage at a time, then writes the summary and report.

    A failed stage (non-zero exit, or an exception from the runner) marks its
    cell failed (failed.json) and the sweep goes on with the next cell.
    KeyboardInterrupt ends the sweep at once; SIGTERM is forwarded to the
    running stage (which checkpoints and exits) and ends the sweep after it.

    Args:
      config: an ablation config.
      workdir: the sweep's local directory (created; reruns resume).
      stage_runner: runs one Stage and returns its exit status; default
        SubprocessStageRunner() (tests pass fakes).
      report_dir: where the report goes (default workdir/report).

    Returns:
      0 if every cell is finished, else 1 (failed or unfinished cells).
    """
    if files.is_remote(workdir):
        raise ValueError(
            f"workdir={workdir!r}: local runs need a local directory; for a TPU pod print "
            "the commands with --print_commands=tpu."
        )
    workdir = os.path.abspath(workdir)
    cells, args = _prepare(config, workdir)
    manifest = {
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ablation_config": json.loads(config.to_json_best_effort()),
        "micro_batches_supported": supports_micro_batches(config),
        "cells": [{"name": c.name, **c.grid_values()} for c in cells],
    }
    ablation_report.write_json(os.path.join(workdir, ablation_report.MANIFEST_FILE), manifest)
    if config.micro_batch_size and not supports_micro_batches(config):
        print(
            f"warning: micro_batch_size={config.micro_batch_size} is ignored: the base config "
            f"{config.pretrain_config} has no train.micro_batch_size field."
        )
    runner = stage_runner or SubprocessStageRunner()
    stop = threading.Event()

    def on_sigterm(signum, frame):
        del signum, frame
        stop.set()
        print("SIGTERM: stopping after the running stage; rerun to resume.", flush=True)
        if hasattr(runner, "terminate"):
            runner.terminate()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    start = time.time()
    try:
        for i, cell in enumerate(cells, 1):
            head = f"cell {i}/{len(cells)} {cell.name}"
            cell_dir = os.path.join(workdir, cell.name)
            if ablation_report.cell_status(workdir, cell.name) == "done":
                print(f"{head}: finished earlier, skipped", flush=True)
                continue
            record = _cell_record(cell, args[cell.name])
            ablation_report.write_json(os.path.join(cell_dir, ablation_report.CELL_FILE), record)
            for kind in STAGES:
                stage_dir = os.path.join(cell_dir, kind)
                if os.path.exists(os.path.join(stage_dir, files.RESULTS_FILE)):
                    continue
                log = os.path.join(cell_dir, f"{kind}.log")
                stage = Stage(cell, kind, args[cell.name][kind], stage_dir, log)
                if not _run_stage(runner, stage, head, start) or stop.is_set():
                    break
            if stop.is_set():
                break
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    rows = write_summary_and_report(config, workdir, report_dir=report_dir, cells=cells)
    done = sum(r["status"] == "done" for r in rows)
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    print(
        f"sweep: {done}/{len(cells)} cells finished, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + f", {len(cells) - done - len(failed)} unfinished; "
        + f"this run took {_duration(time.time() - start)}"
    )
    return 0 if done == len(cells) else 1


# ------------------------------------------------------------- summary, report


def _report_meta(config: mlc.ConfigDict, workdir: str, cells: list[Cell], old: list[str]) -> dict:
    pre = config.pretrain
    model = f"ResNet-{pre.model.depth}"
    if pre.model.base_width != 64:
        model += f" (base width {pre.model.base_width})"
    lin = config.linear_eval.linear
    description = [
        f"Sweep workdir: `{workdir}`. Base recipe: `{config.pretrain_config}` with each cell's "
        "batch size, epochs, LR scaling (and its base LR) and temperature.",
        f"Pretraining data: {pre.data.source}:{pre.data.name} ({pre.data.train_split}); model: "
        f"{model}. Linear evaluation (`{config.linear_eval_config}`): mode {lin.mode}, "
        f"{lin.epochs:g} epochs, top-1 on {pre.data.eval_split}.",
    ]
    notes = []
    if config.micro_batch_size and supports_micro_batches(config):
        big = sorted({c.batch_size for c in cells if c.micro_batch_size})
        if big:
            notes.append(
                f"Batches {', '.join(map(str, big))} trained in micro-batches of "
                f"{config.micro_batch_size} (gradient caching: the NT-Xent negatives are the "
                "whole batch; BatchNorm statistics are per micro-batch, "
                f"train.micro_batch_bn={pre.train.get('micro_batch_bn', '?')!r})."
            )
    elif config.micro_batch_size:
        notes.append(
            f"micro_batch_size={config.micro_batch_size} was not applied: the base config has "
            "no train.micro_batch_size field."
        )
    if old:
        notes.append(
            f"{len(old)} cell(s) in the workdir belong to an earlier grid and are not shown: "
            + ", ".join(old)
            + "."
        )
    return {
        "title": f"Batch-size ablation: {pre.data.name}, {model}",
        "reference": config.reference,
        "description": description,
        "notes": notes,
        "base_lr": {s: config.base_lr[s] for s in config.grid.lr_scalings},
    }


def write_summary_and_report(
    config: mlc.ConfigDict, workdir: str, *, report_dir: str | None = None, cells=None
) -> list[dict]:
    """Collects every cell into summary.json / summary.csv and writes the report.

    Args:
      config: the ablation config.
      workdir: the sweep directory.
      report_dir: a directory for the report, local or remote (default
        workdir/report; ./ablation_report for a remote workdir, so a report made
        from a workstation needs no write access to the bucket).
      cells: the built cells (default: built from config).

    Returns:
      The collected rows.
    """
    cells = cells if cells is not None else _prepare(config, workdir)[0]
    rows = ablation_report.collect_rows(workdir, cells)
    old = ablation_report.old_cells(workdir, [c.name for c in cells])
    if report_dir is None:
        report_dir = (
            "ablation_report" if files.is_remote(workdir) else os.path.join(workdir, "report")
        )
    summary_dir = report_dir if files.is_remote(workdir) else workdir
    ablation_report.write_summary(rows, old, summary_dir)
    paths = ablation_report.write_report(
        rows, report_dir, _report_meta(config, workdir, cells, old)
    )
    summary = files.join(summary_dir, ablation_report.SUMMARY_FILE)
    print(f"summary: {summary}; report: {', '.join(paths.values())}")
    return rows


# ----------------------------------------------------------- launch commands


def launch_commands(
    config: mlc.ConfigDict,
    workdir: str,
    platform: str,
    *,
    launcher_args: str | None = None,
    report_command: str = "",
) -> str:
    """Shell commands that run every unfinished cell with launch/tpu.sh or launch/slurm.sbatch.

    Nothing runs and nothing is written. Finished cells appear as comments; a
    cell whose pretraining finished gets only its linear-eval command.

    Args:
      config: an ablation config.
      workdir: the sweep directory as the cluster sees it (gs:// for TPU pods).
      platform: 'tpu' or 'slurm'.
      launcher_args: inserted verbatim after the launcher (default
        DEFAULT_LAUNCHER_ARGS[platform]).
      report_command: the command that writes the report afterwards (shown).

    Returns:
      The commands, one per line, with comments.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}: use one of {PLATFORMS}")
    workdir = files.abspath(workdir)  # jobs may start in another directory
    cells, args = _prepare(config, workdir)
    return ablation_commands.format_launch_commands(
        cells,
        args,
        workdir,
        platform,
        launcher_args=launcher_args,
        report_command=report_command,
    )


# ------------------------------------------------------------------------- CLI


def main(argv) -> None:
    """CLI: run the sweep (default), --print_commands=tpu|slurm, or --report_only."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    flag_values = flags.FLAGS
    config, workdir = flag_values.config, flag_values.workdir
    if flag_values.print_commands:
        report = shlex.join(
            ["python", "-m", "simclr_jax.ablation"]
            + [a for a in argv_without(sys.argv[1:], "--print_commands", "--launcher_args")]
            + ["--report_only"]
        )
        sys.stdout.write(
            launch_commands(
                config,
                workdir,
                flag_values.print_commands,
                launcher_args=flag_values.launcher_args,
                report_command=report,
            )
        )
        return
    if flag_values.report_only:
        if not files.exists(workdir):
            raise app.UsageError(f"--workdir={workdir} does not exist: no sweep to report on")
        rows = write_summary_and_report(config, workdir, report_dir=flag_values.report_dir)
        sys.exit(0 if all(r["status"] == "done" for r in rows) else 1)
    runner = SubprocessStageRunner(compilation_cache=flag_values.compilation_cache)
    sys.exit(run_sweep(config, workdir, stage_runner=runner, report_dir=flag_values.report_dir))


def _define_flags() -> None:
    # Defined here, not at import: the module is a library too, and main.py
    # defines a --config flag of its own.
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "An ablation config (configs/ablation_*.py).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "The sweep directory; a rerun resumes.")
    flags.DEFINE_bool("report_only", False, "Only collect results and write the report.")
    flags.DEFINE_enum(
        "print_commands", "", ["", *PLATFORMS], "Print launch commands instead of running."
    )
    flags.DEFINE_string(
        "launcher_args", None, "Arguments for launch/tpu.sh or sbatch (default: see --help)."
    )
    flags.DEFINE_string("report_dir", None, "Report directory (default WORKDIR/report).")
    flags.DEFINE_string(
        "compilation_cache", None, "Passed to each cell's main.py (default: main.py's default)."
    )
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app

    # configs/ablation_*.py import `configs.*` relative to the repository root.
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    _define_flags()
    app.run(main)
