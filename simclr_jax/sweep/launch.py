"""Launch commands of a sweep's unfinished cells: launch/tpu.sh or launch/slurm.sbatch.

The same main.py arguments a local sweep runs (simclr_jax.sweep.commands),
wrapped in the repository's launch scripts, for a TPU pod or a SLURM cluster;
`python -m simclr_jax.sweep --print_commands=tpu|slurm` prints them.
"""

import shlex

import ml_collections as mlc

from simclr_jax import config_checks, files
from simclr_jax.config_checks import ConfigError
from simclr_jax.sweep import commands, grid, results

PLATFORMS = ("tpu", "slurm")
DEFAULT_LAUNCHER_ARGS = {
    "tpu": "--name=$TPU_NAME --zone=$TPU_ZONE --copy --skip-create",
    "slurm": "",
}


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
        raise ConfigError(f"platform={platform!r}: use one of {PLATFORMS}")
    workdir = files.abspath(workdir)  # jobs may start in another directory
    cells, args = grid.prepare_cells(config, workdir)
    return format_launch_commands(
        cells,
        args,
        workdir,
        platform,
        launcher_args=launcher_args,
        report_command=report_command,
    )


def format_launch_commands(
    cells,
    args: dict,
    workdir: str,
    platform: str,
    *,
    launcher_args: str | None = None,
    report_command: str = "",
) -> str:
    """The launch commands of the unfinished cells (see launch_commands).

    Args:
      cells: the sweep's cells (simclr_jax.sweep.grid.Cell).
      args: {cell name: simclr_jax.sweep.commands.stage_args(...)}.
      workdir: the sweep directory as the cluster sees it (absolute, or gs://).
      platform: 'tpu' or 'slurm'.
      launcher_args: inserted verbatim after the launcher (default
        DEFAULT_LAUNCHER_ARGS[platform]).
      report_command: the command that writes the report afterwards (shown).

    Returns:
      The commands, one per line, with comments; finished cells as comments.
    """
    if platform not in PLATFORMS:
        raise ConfigError(f"platform={platform!r}: use one of {PLATFORMS}")
    extra = DEFAULT_LAUNCHER_ARGS[platform] if launcher_args is None else launcher_args
    extra = f" {extra}" if extra else ""
    method = config_checks.method_name(cells[0].pretrain) if cells else "empty"
    lines = [
        f"# {method} ablation, {len(cells)} cells; "
        f"run from the repository root ({commands.REPO_ROOT})."
    ]
    if platform == "tpu":
        lines += [
            "# Each command runs one stage on an existing TPU VM (--skip-create); create it once:",
            "#   gcloud compute tpus tpu-vm create $TPU_NAME --zone=$TPU_ZONE "
            "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base",
            "# On a pod slice the workdir must be a gs:// path every worker sees.",
        ]
    else:
        lines += [
            "# One job per stage; the linear eval waits for its pretraining (afterok).",
            "# The workdir must be on a filesystem every node sees.",
        ]
    lines += [
        "# Rerun this to print only what is still missing (a resubmitted pretraining resumes",
        "# from its checkpoint). Report: " + (report_command or "--report_only"),
    ]
    for i, cell in enumerate(cells, 1):
        status = results.cell_status(workdir, cell.name)
        lines.append(f"# cell {i}/{len(cells)} {cell.name}: {status}")
        if status == "done":
            continue
        todo = [
            kind
            for kind in results.STAGES
            if not files.exists(files.join(workdir, cell.name, kind, files.RESULTS_FILE))
        ]
        for kind in todo:
            main_args = args[cell.name][kind]
            if platform == "tpu":
                head, overrides = shlex.join(main_args[:2]), shlex.join(main_args[2:])
                cmd = f"launch/tpu.sh{extra} {head} -- {overrides}"
            else:
                script = f"{extra} launch/slurm.sbatch {shlex.join(main_args)}"
                if kind == "pretrain" and len(todo) == 2:
                    cmd = f"jid=$(sbatch --parsable{script})"
                elif len(todo) == 2:
                    cmd = f"sbatch --dependency=afterok:$jid{script}"
                else:
                    cmd = f"sbatch{script}"
            lines.append(cmd)
    return "\n".join(lines) + "\n"
