"""Running a sweep locally: each cell's two stages in child processes, resumable.

Every cell is two ordinary main.py runs, WORKDIR/<cell>/pretrain and then
WORKDIR/<cell>/linear_eval, each in a child process (a crash or OOM ends that
cell only and its memory goes back to the system); their main.py arguments
come from simclr_jax.sweep.commands. A cell is finished when
linear_eval/results.json exists. A rerun skips finished cells, starts
unfinished ones where they stopped (pretraining resumes from its last
checkpoint) and retries failed ones. A failed stage does not stop the sweep:
the cell is reported as failed. The summary and report
(simclr_jax.sweep.report) are rewritten at the end of every run.
"""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import ml_collections as mlc

from simclr_jax import files, metrics
from simclr_jax.config_checks import ConfigError, MissingPathError
from simclr_jax.sweep import commands, grid, report, results


@dataclasses.dataclass(frozen=True)
class Stage:
    """One main.py run of a cell: `args` are main.py's arguments (run from commands.REPO_ROOT)."""

    cell: grid.Cell
    kind: str  # 'pretrain' | 'linear_eval'
    args: tuple[str, ...]
    workdir: str
    log_path: str


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
        if not os.path.isfile(commands.MAIN_PY):
            raise MissingPathError(
                f"{commands.MAIN_PY} is missing: run the ablation from a source checkout"
            )
        argv = [sys.executable, commands.MAIN_PY, *stage.args]
        if self.compilation_cache is not None:
            argv.append(f"--compilation_cache={self.compilation_cache}")
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with open(stage.log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
            log.flush()
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=commands.REPO_ROOT, env=env
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
    results_path = os.path.join(stage.workdir, files.RESULTS_FILE)
    failed = os.path.join(cell_dir, results.FAILED_FILE)
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
    timing_path = os.path.join(cell_dir, results.TIMING_FILE)
    timing = results.read_json(timing_path) if os.path.exists(timing_path) else {}
    key = f"{stage.kind}_seconds"
    timing[key] = timing.get(key, 0.0) + seconds
    results.write_json(timing_path, timing)
    took = metrics.format_duration(seconds)
    if rc == 0 and os.path.exists(results_path):
        if os.path.exists(failed):
            os.remove(failed)
        top1 = results.read_json(results_path).get("top1") if stage.kind == "linear_eval" else None
        extra = "" if top1 is None else f": linear top-1 {100 * top1:.1f}%"
        sweep = metrics.format_duration(time.time() - start)
        print(f"{head}: {what} done in {took}{extra} (sweep {sweep})", flush=True)
        return True
    if rc == 0:  # stopped early (SIGTERM, train.stop_at_step): resumable, not a failure
        print(f"{head}: {what} stopped before the end after {took}; rerun to resume", flush=True)
        return False
    results.write_json(failed, {"stage": stage.kind, "returncode": rc, "log": stage.log_path})
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
        raise ConfigError(
            f"workdir={workdir!r}: local runs need a local directory; for a TPU pod print "
            "the commands with --print_commands=tpu."
        )
    workdir = os.path.abspath(workdir)
    cells, args = grid.prepare_cells(config, workdir)
    manifest = {
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ablation_config": json.loads(config.to_json_best_effort()),
        "micro_batches_supported": grid.supports_micro_batches(config),
        "cells": [{"name": c.name, **c.grid_values()} for c in cells],
    }
    results.write_json(os.path.join(workdir, results.MANIFEST_FILE), manifest)
    if config.micro_batch_size and not grid.supports_micro_batches(config):
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
            if results.cell_status(workdir, cell.name) == "done":
                print(f"{head}: finished earlier, skipped", flush=True)
                continue
            record = grid.cell_record(cell, args[cell.name])
            results.write_json(os.path.join(cell_dir, results.CELL_FILE), record)
            for kind in results.STAGES:
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
    rows = report.write_summary_and_report(config, workdir, report_dir=report_dir, cells=cells)
    done = sum(r["status"] == "done" for r in rows)
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    print(
        f"sweep: {done}/{len(cells)} cells finished, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + f", {len(cells) - done - len(failed)} unfinished; "
        + f"this run took {metrics.format_duration(time.time() - start)}"
    )
    return 0 if done == len(cells) else 1
