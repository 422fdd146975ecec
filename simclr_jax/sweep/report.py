"""The sweep's report: Markdown and CSV tables and a plot, ours beside the paper's.

write_summary_and_report() collects the cells' results (simclr_jax.sweep.results)
into summary.json / summary.csv and writes, through `write_report(rows, out_dir,
meta=...)`,
- ablation.md: one table per (lr_scaling, temperature) combination, rows batch
  size, columns epoch budget, cells linear-evaluation top-1 (%); for ImageNet
  each of our columns has the paper's Table B.1 value beside it;
- ablation.csv: the same tables in one CSV (one line per combination and batch
  size; `ours_e<epochs>` and, for ImageNet, `paper_e<epochs>` columns);
- ablation.png: top-1 against batch size (log2 axis), one line per epoch
  budget, one panel per combination; ours solid, the paper's dashed.

The paper's figures come from simclr_jax.sweep.reference. The sweep directory
and the report directory may be local or on cloud storage (gs://, through
simclr_jax.files).
"""

import csv
import io
import math
import os

import ml_collections as mlc

from simclr_jax import config_checks, files, metrics
from simclr_jax.config_checks import ConfigError
from simclr_jax.sweep import grid, results
from simclr_jax.sweep import reference as reference_lib

MARKDOWN_FILE = "ablation.md"
CSV_FILE = "ablation.csv"
PLOT_FILE = "ablation.png"


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
                    value = reference_lib.paper_top1(reference, b, e, scaling, temp)
                    line.append("" if value is None else f"{value:.1f}")
            writer.writerow(line)
    files.write_text(path, text.getvalue())


def _markdown_table(rows, scaling, temp, reference) -> list[str]:
    batches, epochs = _axes(rows)
    index = _index(rows)
    with_paper = reference == "imagenet" and math.isclose(temp, reference_lib.TABLE_B1_TEMPERATURE)
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
                value = reference_lib.paper_top1(reference, b, e, scaling, temp)
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
            "(`simclr_jax/sweep/reference.py`, `TABLE_B1`), not measured here, and are "
            f"shown only for temperature {reference_lib.TABLE_B1_TEMPERATURE:g} and the "
            "paper's grid points ('–' elsewhere).",
        ]
    if reference == "cifar10":
        lines = ["## Reference figures (not ours)", ""]
        lines += [f"- {p['label']}" for p in reference_lib.CIFAR10_REFERENCE_POINTS]
        lines += [
            "",
            "The paper's per-cell CIFAR-10 values for its batch-size x epochs study "
            "(appendix B.9) are not in our reference notes, so no per-cell paper column "
            "is shown and none is invented; the plot marks the two single points above.",
        ]
        return lines
    return []


def _details_table(rows) -> list[str]:
    lines = [
        "| cell | status | linear top-1 | kNN top-1 | probe top-1 | pretrain img/s "
        "| pretrain time | linear-eval time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def pct(key, r=r):
            return "" if r.get(key) is None else f"{100.0 * r[key]:.1f}"

        def took(key, r=r):
            return "" if r.get(key) is None else metrics.format_duration(r[key])

        ips = r.get("images_per_sec")
        lines.append(
            f"| {r['name']} | {r['status']} | {pct('linear_top1')} | {pct('knn_top1')} "
            f"| {pct('probe_top1')} | {'' if ips is None else f'{ips:.1f}'} "
            f"| {took('pretrain_seconds')} | {took('linear_eval_seconds')} |"
        )
    return lines


def write_markdown(rows, path: str, meta: dict) -> None:
    """The Markdown report: one table per (lr_scaling, temperature), notes, per-cell details.

    Args:
      rows: the collected cell rows (see simclr_jax.sweep.results.collect_rows).
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
            paper = [(b, reference_lib.paper_top1(reference, b, e, scaling, temp)) for b in batches]
            paper = [(b, v) for b, v in paper if v is not None]
            if paper:
                xs, ys = zip(*paper, strict=True)
                label = f"paper Table B.1, {_epoch_label(e)} ep"
                ax.plot(xs, ys, "x--", color=colour, alpha=0.7, label=label)
        if reference == "cifar10":
            for p, marker in zip(reference_lib.CIFAR10_REFERENCE_POINTS, ("*", "P"), strict=True):
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
    if reference not in reference_lib.REFERENCES:
        raise ConfigError(f"reference={reference!r}: use one of {reference_lib.REFERENCES}")
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


def _report_meta(
    config: mlc.ConfigDict, workdir: str, cells: list[grid.Cell], old: list[str]
) -> dict:
    pre = config.pretrain
    method = config_checks.method_name(pre)
    model = f"ResNet-{pre.model.depth}"
    if pre.model.base_width != 64:
        model += f" (base width {pre.model.base_width})"
    lin = config.linear_eval.linear
    temperature = grid.temperature_field(pre)
    varied = "batch size, epochs, LR scaling (and its base LR)"
    varied += " and temperature" if temperature else ""
    if method != "simclr":
        varied += f"; method {method}" + (f" (temperature: `{temperature}`)" if temperature else "")
    description = [
        f"Sweep workdir: `{workdir}`. Base recipe: `{config.pretrain_config}` with each cell's "
        f"{varied}.",
        f"Pretraining data: {pre.data.source}:{pre.data.name} ({pre.data.train_split}); model: "
        f"{model}. Linear evaluation (`{config.linear_eval_config}`): mode {lin.mode}, "
        f"{lin.epochs:g} epochs, top-1 on {pre.data.eval_split}.",
    ]
    notes = []
    if config.micro_batch_size and grid.supports_micro_batches(config):
        big = sorted({c.batch_size for c in cells if c.micro_batch_size})
        if big:
            notes.append(
                f"Batches {', '.join(map(str, big))} trained in micro-batches of "
                f"{config.micro_batch_size} (gradient caching: "
                + (
                    "the NT-Xent negatives are the whole batch"
                    if method == "simclr"
                    else f"{method}'s loss is the whole batch's"
                )
                + "; BatchNorm statistics are per micro-batch, "
                f"train.micro_batch_bn={pre.train.get('micro_batch_bn', '?')!r})."
            )
    elif config.micro_batch_size:
        notes.append(
            f"micro_batch_size={config.micro_batch_size} was not applied: the base config has "
            "no train.micro_batch_size field."
        )
    if temperature is None:
        notes.append(
            f"The method {method!r} has no temperature: the temperature in the cell names and "
            "tables is a label only."
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
    cells = cells if cells is not None else grid.prepare_cells(config, workdir)[0]
    rows = results.collect_rows(workdir, cells)
    old = results.old_cells(workdir, [c.name for c in cells])
    if report_dir is None:
        report_dir = (
            "ablation_report" if files.is_remote(workdir) else os.path.join(workdir, "report")
        )
    summary_dir = report_dir if files.is_remote(workdir) else workdir
    results.write_summary(rows, old, summary_dir)
    paths = write_report(rows, report_dir, _report_meta(config, workdir, cells, old))
    summary = files.join(summary_dir, results.SUMMARY_FILE)
    print(f"summary: {summary}; report: {', '.join(paths.values())}")
    return rows
