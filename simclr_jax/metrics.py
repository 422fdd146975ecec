"""Metric output: TensorBoard (clu), JSON lines for scripts, a progress line.

Only process 0 writes files; every process may print. Scalars are namespaced
('train/loss', 'eval/knn_top1', ...). The workdir may be local or gs://
(metrics.jsonl is written through simclr_jax.files).

jax and clu (which imports TensorFlow) are imported by MetricLogger, not at
module import: format_duration also serves the ablation tool's parent process
(simclr_jax.sweep), which stays free of both.
"""

import json
import math
import sys
import time
from collections.abc import Mapping

import numpy as np

from simclr_jax import files

METRICS_FILE = "metrics.jsonl"


def _to_float(value) -> float:
    return float(np.asarray(value))


class MetricLogger:
    """Writes scalars to TensorBoard and workdir/metrics.jsonl, prints progress.

    Args:
      workdir: where event files and metrics.jsonl go.
      total_steps: the run's length, for the ETA.
      is_main: whether this process writes files (process 0).
    """

    def __init__(self, workdir: str, total_steps: int, *, is_main: bool | None = None):
        import jax
        from clu import metric_writers

        self.is_main = jax.process_index() == 0 if is_main is None else is_main
        self.total_steps = total_steps
        self._writer = metric_writers.create_default_writer(
            workdir, just_logging=not self.is_main, asynchronous=True
        )
        self._jsonl = None
        if self.is_main:
            files.makedirs(workdir)
            # Appends locally; on object stores the whole file is rewritten at each flush.
            self._jsonl = files.open_append(files.join(workdir, METRICS_FILE))
        self._start_time = time.time()
        self._start_step = None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes scalars (already host values) to TensorBoard and JSONL."""
        scalars = {k: _to_float(v) for k, v in scalars.items()}
        if self.is_main:
            self._writer.write_scalars(step, scalars)
            record = {"step": int(step), "time": time.time(), **scalars}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

    def print_progress(self, step: int, scalars: Mapping[str, float]) -> None:
        """Prints one readable line: step, key metrics, speed and ETA."""
        if self._start_step is None:
            self._start_step = step
            self._start_time = time.time()
        now = time.time()
        eta = ""
        done = step - self._start_step
        if done > 0 and self.total_steps:
            seconds_per_step = (now - self._start_time) / done
            eta = f" | ETA {format_duration(seconds_per_step * (self.total_steps - step))}"
        shown = []
        for key, fmt in (
            ("train/loss", "loss {:.4f}"),
            ("train/contrastive_acc", "c-acc {:.3f}"),
            ("train/probe_top1", "probe {:.3f}"),
            ("train/learning_rate", "lr {:.3g}"),
            ("train/images_per_sec", "{:.1f} img/s"),
        ):
            if key in scalars:
                shown.append(fmt.format(_to_float(scalars[key])))
        width = len(str(self.total_steps))
        line = f"[step {step:>{width}}/{self.total_steps}] " + " | ".join(shown) + eta
        print(line, flush=True, file=sys.stdout)

    def write_hparams(self, hparams: Mapping) -> None:
        if self.is_main:
            self._writer.write_hparams(dict(hparams))

    def flush(self) -> None:
        self._writer.flush()
        if self._jsonl:
            self._jsonl.flush()

    def close(self) -> None:
        self._writer.close()
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s' or '42s'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
