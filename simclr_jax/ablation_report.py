"""The batch-size ablation report: Markdown and CSV tables and a plot, ours beside the paper's.

`write_report(rows, out_dir, meta=...)` turns the per-cell rows collected by
simclr_jax.ablation into
- ablation.md: one table per (lr_scaling, temperature) combination, rows batch
  size, columns epoch budget, cells linear-evaluation top-1 (%); for ImageNet
  each of our columns has the paper's Table B.1 value beside it;
- ablation.csv: the same tables in one CSV (one line per combination and batch
  size; `ours_e<epochs>` and, for ImageNet, `paper_e<epochs>` columns);
- ablation.png: top-1 against batch size (log2 axis), one line per epoch
  budget, one panel per combination; ours solid, the paper's dashed.

It also owns the sweep directory's layout and reads the cells' state and
results from it (cell_status, collect_rows, write_summary). The sweep directory
and the report directory may be local or on cloud storage (gs://, through
simclr_jax.files): a sweep run on a TPU pod is reported on from a workstation.

Paper figures are data in this module, typed in from the sources cited beside
them; nothing here is measured. The report labels every number as ours or the
paper's.
"""

import csv
import io
import json
import math

from simclr_jax import files

# SimCLR paper (Chen et al. 2020, arXiv 2002.05709), appendix B.1, Table B.1
# (also plotted in its Figure 9): ImageNet linear-evaluation top-1 (%) of
# ResNet-50 for batch size x pretraining epochs, as (linear LR scaling,
# square-root LR scaling). The runs use the paper's default settings
# (temperature 0.1; the reference code's README gives these defaults), LARS
# with base LR 0.3 x B/256 (linear) or 0.075 x sqrt(B) (sqrt).
TABLE_B1 = {
    (256, 100): (57.5, 62.8),
    (256, 200): (61.9, 64.3),
    (256, 400): (64.7, 65.7),
    (256, 800): (66.6, 66.5),
    (512, 100): (60.7, 63.8),
    (512, 200): (64.0, 65.6),
    (512, 400): (66.2, 66.7),
    (512, 800): (67.8, 67.4),
    (1024, 100): (62.8, 64.3),
    (1024, 200): (65.3, 66.1),
    (1024, 400): (67.2, 67.2),
    (1024, 800): (68.5, 68.3),
    (2048, 100): (64.0, 64.7),
    (2048, 200): (66.1, 66.8),
    (2048, 400): (68.1, 67.9),
    (2048, 800): (68.9, 68.8),
    (4096, 100): (64.6, 64.5),
    (4096, 200): (66.5, 66.8),
    (4096, 400): (68.2, 68.0),
    (4096, 800): (68.9, 69.1),
    (8192, 100): (64.8, 64.8),
    (8192, 200): (66.6, 67.0),
    (8192, 400): (67.8, 68.3),
    (8192, 800): (69.0, 69.1),
}
TABLE_B1_TEMPERATURE = 0.1
_TABLE_B1_COLUMN = {"linear": 0, "sqrt": 1}

# CIFAR-10 reference figures: single points, not a grid. Our reference notes
# do not hold the per-cell values of the paper's CIFAR-10 batch-size x epochs
# study (appendix B.9), so none are invented here.
CIFAR10_REFERENCE_POINTS = (
    {
        "label": "ResNet-18 (CIFAR stem), B=512, 1000 ep: about 91% "
        "(google-research/simclr README, the configs/cifar10.py recipe)",
        "short": "ResNet-18, B=512, 1000 ep (about 91%)",
        "batch_size": 512,
        "epochs": 1000.0,
        "top1": 91.0,
    },
    {
        "label": "ResNet-50, B=1024: 94.0% (SimCLR paper, appendix B.9)",
        "short": "ResNet-50, B=1024 (94.0%)",
        "batch_size": 1024,
        "epochs": None,
        "top1": 94.0,
    },
)

REFERENCES = ("imagenet", "cifar10", "none")
MARKDOWN_FILE = "ablation.md"
CSV_FILE = "ablation.csv"
PLOT_FILE = "ablation.png"


# ------------------------------------------------------------ the sweep directory
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
      cells: simclr_jax.ablation.Cell objects (name, grid_values()).

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


# ---------------------------------------------------------------------- report


def paper_top1(reference: str, batch_size: int, epochs: float, lr_scaling: str, temperature: float):
    """The paper's Table B.1 top-1 (%) for a cell, or None where the paper has none.

    Args:
      reference: 'imagenet' (Table B.1), 'cifar10' or 'none' (no per-cell values).
      batch_size, epochs, lr_scaling, temperature: the cell.

    Returns:
      The paper's value, or None (other dataset, temperature or grid point).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}: use one of {REFERENCES}")
    if reference != "imagenet" or not math.isclose(temperature, TABLE_B1_TEMPERATURE):
        return None
    if float(epochs) != int(epochs) or lr_scaling not in _TABLE_B1_COLUMN:
        return None
    pair = TABLE_B1.get((int(batch_size), int(epochs)))
    return None if pair is None else pair[_TABLE_B1_COLUMN[lr_scaling]]


def _epoch_label(epochs: float) -> str:
    return f"{epochs:g}"


def _percent(top1) -> str:
    return "" if top1 is None else f"{100.0 * top1:.2f}"


def _combinations(rows) -> list[tuple[str, float]]:
    return sorted({(r["lr_scaling"], r["temperature"]) for r in rows})


def _axes(rows) -> tuple[list[int], list[float]]:
    return sorted({r["batch_size"] for r in rows}), sorted({r["epochs"] for r in rows})


def _index(rows) -> dict:
    return {(r["lr_scaling"], r["temperature"], r["batch_size"], r["epochs"]): r for r in rows}


def _cell_text(row) -> str:
    if row is None:
        return "·"
    if row.get("linear_top1") is not None:
        return f"{100.0 * row['linear_top1']:.1f}"
    return {"failed": "failed", "pending": "not run"}.get(row["status"], row["status"])


def write_csv(rows, path: str, reference: str) -> None:
    """The tables of every combination in one CSV file (top-1 in %, 2 decimals).

    Columns: lr_scaling, temperature, batch_size, ours_e<epochs>... and, for
    ImageNet, paper_e<epochs>...; empty where a cell has no value.
    """
    batches, epochs = _axes(rows)
    index = _index(rows)
    header = ["lr_scaling", "temperature", "batch_size"]
    header += [f"ours_e{_epoch_label(e)}" for e in epochs]
    with_paper = reference == "imagenet"
    if with_paper:
        header += [f"paper_e{_epoch_label(e)}" for e in epochs]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    for scaling, temp in _combinations(rows):
        for b in batches:
            line = [scaling, f"{temp:g}", b]
            for e in epochs:
                row = index.get((scaling, temp, b, e))
                line.append(_percent(row and row.get("linear_top1")))
            if with_paper:
                for e in epochs:
                    value = paper_top1(reference, b, e, scaling, temp)
                    line.append("" if value is None else f"{value:.1f}")
            writer.writerow(line)
    files.write_text(path, text.getvalue())


def _markdown_table(rows, scaling, temp, reference) -> list[str]:
    batches, epochs = _axes(rows)
    index = _index(rows)
    with_paper = reference == "imagenet" and math.isclose(temp, TABLE_B1_TEMPERATURE)
    header = ["batch"]
    for e in epochs:
        header.append(f"{_epoch_label(e)} ep **ours**")
        if with_paper:
            header.append(f"{_epoch_label(e)} ep *paper*")
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for b in batches:
        cells = [str(b)]
        for e in epochs:
            cells.append(_cell_text(index.get((scaling, temp, b, e))))
            if with_paper:
                value = paper_top1(reference, b, e, scaling, temp)
                cells.append("–" if value is None else f"*{value:.1f}*")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reference_section(reference: str) -> list[str]:
    if reference == "imagenet":
        return [
            "## Paper values",
            "",
            "*paper* columns: SimCLR paper (arXiv 2002.05709) Table B.1, ImageNet linear "
            "evaluation of ResNet-50 at temperature 0.1, base LR 0.3 x B/256 (linear) or "
            "0.075 x sqrt(B) (sqrt). They are typed in from the paper "
            "(`simclr_jax/ablation_report.py`, `TABLE_B1`), not measured here, and are "
            f"shown only for temperature {TABLE_B1_TEMPERATURE:g} and the paper's grid "
            "points ('–' elsewhere).",
        ]
    if reference == "cifar10":
        lines = ["## Reference figures (not ours)", ""]
        lines += [f"- {p['label']}" for p in CIFAR10_REFERENCE_POINTS]
        lines += [
            "",
            "The paper's per-cell CIFAR-10 values for its batch-size x epochs study "
            "(appendix B.9) are not in our reference notes, so no per-cell paper column "
            "is shown and none is invented; the plot marks the two single points above.",
        ]
        return lines
    return []


def _minutes(seconds) -> str:
    if seconds is None:
        return ""
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _details_table(rows) -> list[str]:
    lines = [
        "| cell | status | linear top-1 | kNN top-1 | probe top-1 | pretrain img/s "
        "| pretrain time | linear-eval time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def pct(key, r=r):
            return "" if r.get(key) is None else f"{100.0 * r[key]:.1f}"

        ips = r.get("images_per_sec")
        lines.append(
            f"| {r['name']} | {r['status']} | {pct('linear_top1')} | {pct('knn_top1')} "
            f"| {pct('probe_top1')} | {'' if ips is None else f'{ips:.1f}'} "
            f"| {_minutes(r.get('pretrain_seconds'))} | {_minutes(r.get('linear_eval_seconds'))} |"
        )
    return lines


def write_markdown(rows, path: str, meta: dict) -> None:
    """The Markdown report: one table per (lr_scaling, temperature), notes, per-cell details.

    Args:
      rows: the collected cell rows (see simclr_jax.ablation.collect_results).
      path: output file.
      meta: 'title', 'reference', 'description' (lines), 'notes' (lines) and
        'base_lr' ({scaling: value}).
    """
    reference = meta.get("reference", "none")
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [f"# {meta.get('title', 'Batch-size ablation')}", ""]
    lines += list(meta.get("description", ()))
    lines += [
        "",
        "Table entries: linear-evaluation top-1 (%). **ours** = measured by this sweep (the "
        "`linear_eval/results.json` of each cell)"
        + ("; *paper* = SimCLR Table B.1 (see below)." if reference == "imagenet" else ".")
        + " 'not run' = no result yet, 'failed' = the cell's run failed (see its log).",
        "",
        f"Cells: {len(rows)} ({status}).",
        "",
    ]
    base_lr = meta.get("base_lr", {})
    for scaling, temp in _combinations(rows):
        rule = "x B/256" if scaling == "linear" else "x sqrt(B)"
        lr = base_lr.get(scaling)
        lr_text = f", base LR {lr:g} {rule}" if lr is not None else ""
        lines += [f"## lr_scaling = {scaling}{lr_text}, temperature = {temp:g}", ""]
        lines += _markdown_table(rows, scaling, temp, reference)
        lines.append("")
    lines += _reference_section(reference)
    notes = list(meta.get("notes", ()))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Cells", ""] + _details_table(rows) + [""]
    files.write_text(path, "\n".join(lines))


def plot(rows, path: str, meta: dict) -> None:
    """Top-1 vs batch size (log2 x axis), one line per epoch budget, one panel per combination.

    Ours: solid lines with dots; paper Table B.1 (ImageNet): dashed, same colour;
    CIFAR-10 reference points: black stars.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    reference = meta.get("reference", "none")
    combos = _combinations(rows) or [("linear", 0.0)]
    batches, epochs = _axes(rows)
    index = _index(rows)
    ncols = min(2, len(combos))
    nrows = math.ceil(len(combos) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.6 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (scaling, temp) in zip(axes.flat, combos, strict=False):
        for i, e in enumerate(epochs):
            colour = colours[i % len(colours)]
            points = [
                (b, 100.0 * index[(scaling, temp, b, e)]["linear_top1"])
                for b in batches
                if index.get((scaling, temp, b, e), {}).get("linear_top1") is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, "o-", color=colour, label=f"ours, {_epoch_label(e)} ep")
            paper = [(b, paper_top1(reference, b, e, scaling, temp)) for b in batches]
            paper = [(b, v) for b, v in paper if v is not None]
            if paper:
                xs, ys = zip(*paper, strict=True)
                label = f"paper Table B.1, {_epoch_label(e)} ep"
                ax.plot(xs, ys, "x--", color=colour, alpha=0.7, label=label)
        if reference == "cifar10":
            for p, marker in zip(CIFAR10_REFERENCE_POINTS, ("*", "P"), strict=True):
                label = f"reference, not ours: {p['short']}"
                ax.plot(p["batch_size"], p["top1"], marker, color="k", markersize=9, label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted(set(batches) | ({512, 1024} if reference == "cifar10" else set()))
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.set_xlabel("batch size (log2 scale)")
        ax.set_ylabel("linear-eval top-1 (%)")
        ax.set_title(f"lr_scaling={scaling}, temperature={temp:g}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(combos) :]:
        ax.set_visible(False)
    subtitle = "solid: ours"
    if reference == "imagenet":
        subtitle += "; dashed: paper Table B.1 (ImageNet, ResNet-50)"
    elif reference == "cifar10":
        subtitle += "; black markers: reference figures (not ours)"
    fig.suptitle(f"{meta.get('title', 'Batch-size ablation')}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()  # matplotlib writes local files only; files.py writes anywhere
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    files.write_bytes(path, buffer.getvalue())


def write_report(rows, out_dir: str, meta: dict) -> dict[str, str]:
    """Writes ablation.md, ablation.csv and ablation.png into out_dir.

    Args:
      rows: one dict per cell: name, batch_size, epochs, lr_scaling,
        temperature, status ('done', 'failed', 'pending', ...), linear_top1
        (a fraction, or None) and optional knn_top1, probe_top1,
        images_per_sec, pretrain_seconds, linear_eval_seconds.
      out_dir: a directory, local or remote (created).
      meta: see write_markdown; meta['reference'] selects the paper values.

    Returns:
      {'markdown', 'csv', 'plot'}: the paths written.
    """
    reference = meta.get("reference", "none")
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}: use one of {REFERENCES}")
    files.makedirs(out_dir)
    paths = {
        "markdown": files.join(out_dir, MARKDOWN_FILE),
        "csv": files.join(out_dir, CSV_FILE),
        "plot": files.join(out_dir, PLOT_FILE),
    }
    write_markdown(rows, paths["markdown"], meta)
    write_csv(rows, paths["csv"], reference)
    plot(rows, paths["plot"], meta)
    return paths
