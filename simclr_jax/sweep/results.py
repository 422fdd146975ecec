"""The sweep directory: its layout, each cell's state and results, and the summary.

Everything here reads or writes through simclr_jax.files, so the sweep
directory may be local or on cloud storage (gs://): a sweep run on a TPU pod
is reported on from a workstation.
"""

import csv
import io
import json

from simclr_jax import files

# The layout of the sweep directory:
# WORKDIR/manifest.json, summary.json, summary.csv, report/ablation.{md,csv,png}
# WORKDIR/<cell>/cell.json      the cell's grid values, configs and main.py arguments
# WORKDIR/<cell>/pretrain/      pretraining workdir (results.json when finished)
# WORKDIR/<cell>/linear_eval/   linear-eval workdir (results.json: the cell is done)
# WORKDIR/<cell>/{pretrain,linear_eval}.log, timing.json, failed.json (while failed)
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"
SUMMARY_CSV = "summary.csv"
CELL_FILE = "cell.json"
FAILED_FILE = "failed.json"
TIMING_FILE = "timing.json"
STAGES = ("pretrain", "linear_eval")


def read_json(path: str):
    """The JSON content of a local or remote file."""
    return json.loads(files.read_text(path))


def write_json(path: str, payload) -> None:
    """Writes JSON atomically (parents created): a killed sweep never leaves half a file."""
    files.makedirs(files.dirname(path))
    files.write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def _listdir(path: str) -> list[str]:
    return files.listdir(path) if files.isdir(path) else []


def cell_status(workdir: str, name: str) -> str:
    """'done' | 'failed' | 'pretrained' | 'started' | 'pending', from the cell's files."""
    cell_dir = files.join(workdir, name)
    if files.exists(files.join(cell_dir, "linear_eval", files.RESULTS_FILE)):
        return "done"
    if files.exists(files.join(cell_dir, FAILED_FILE)):
        return "failed"
    if files.exists(files.join(cell_dir, "pretrain", files.RESULTS_FILE)):
        return "pretrained"
    if files.exists(files.join(cell_dir, "pretrain")):
        return "started"
    return "pending"


def old_cells(workdir: str, names) -> list[str]:
    """Cell directories in workdir (they hold cell.json) that are not among names."""
    names = set(names)
    return sorted(
        d
        for d in _listdir(workdir)
        if d not in names and files.exists(files.join(workdir, d, CELL_FILE))
    )


def _read_if_exists(path: str) -> dict:
    return read_json(path) if files.exists(path) else {}


def collect_rows(workdir: str, cells) -> list[dict]:
    """One row per cell, read from the files in its directory.

    Args:
      workdir: the sweep directory.
      cells: simclr_jax.sweep.grid.Cell objects (name, grid_values()).

    Returns:
      Rows: name, the grid values, status, linear_top1 / linear_top5
      (fractions, None until finished), knn_top1, probe_top1, images_per_sec,
      compile_seconds, pretrain_steps (pretraining results.json),
      pretrain_seconds, linear_eval_seconds (wall time over all runs of the
      sweep) and failed_stage.
    """
    rows = []
    for cell in cells:
        cell_dir = files.join(workdir, cell.name)
        status = cell_status(workdir, cell.name)
        pre = _read_if_exists(files.join(cell_dir, "pretrain", files.RESULTS_FILE))
        lin = _read_if_exists(files.join(cell_dir, "linear_eval", files.RESULTS_FILE))
        timing = _read_if_exists(files.join(cell_dir, TIMING_FILE))
        failed = _read_if_exists(files.join(cell_dir, FAILED_FILE)) if status == "failed" else {}
        rows.append(
            {
                "name": cell.name,
                **cell.grid_values(),
                "status": status,
                "linear_top1": lin.get("top1"),
                "linear_top5": lin.get("top5"),
                "knn_top1": pre.get("knn_top1"),
                "probe_top1": pre.get("probe_top1"),
                "images_per_sec": pre.get("images_per_sec"),
                "compile_seconds": pre.get("compile_seconds"),
                "pretrain_steps": pre.get("step"),
                "pretrain_seconds": timing.get("pretrain_seconds"),
                "linear_eval_seconds": timing.get("linear_eval_seconds"),
                "failed_stage": failed.get("stage"),
            }
        )
    return rows


def write_summary(rows, old: list[str], out_dir: str) -> None:
    """summary.json ({'cells': rows, 'old_cells': old}) and summary.csv (one line per cell)."""
    write_json(files.join(out_dir, SUMMARY_FILE), {"cells": rows, "old_cells": old})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(files.join(out_dir, SUMMARY_CSV), text.getvalue())
