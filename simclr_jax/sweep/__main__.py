r"""The sweep's command line: run a batch-size ablation, print its launch commands, or report.

  python -m simclr_jax.sweep --config=configs/ablation_tiny.py --workdir=/tmp/ablation_tiny
  python -m simclr_jax.sweep --config=configs/ablation_imagenet.py \
      --workdir=gs://bucket/ablation --print_commands=tpu
  python -m simclr_jax.sweep --config=configs/ablation_cifar10.py --workdir=DIR --report_only

The config is an ablation config (configs/ablation_*.py; its fields are
described in simclr_jax.sweep.grid). By default the cells run locally, one
stage after another, each in a child process (simclr_jax.sweep.runner);
--print_commands prints the same main.py arguments wrapped in launch/tpu.sh or
launch/slurm.sbatch instead (simclr_jax.sweep.launch). Before anything runs,
every cell's override list is parsed back with main.py's flag parser and must
rebuild the cell's config exactly, so what runs is what the manifest says
(simclr_jax.sweep.commands). The sweep directory may be gs:// for printed TPU
commands and --report_only: cell files are read through simclr_jax.files.

A failed stage does not stop the sweep: the cell is reported as failed and the
command exits with status 1 at the end (as does --report_only while a cell is
unfinished). An error in the ablation config stops the sweep before anything
runs: one line, `error: ...`, and exit status 2 (simclr_jax/cli.py). The summary
(summary.json, summary.csv) and the report (ablation.md, ablation.csv,
ablation.png; see simclr_jax.sweep.report) are rewritten at the end of every
run and by --report_only.
"""

import shlex
import sys

from simclr_jax import cli, files
from simclr_jax.sweep import commands, launch, report, runner


def argv_without(argv, *names: str) -> list[str]:
    """argv minus the flags called names (as --name=value)."""
    return [a for a in argv if not any(a == n or a.startswith(n + "=") for n in names)]


def main(argv) -> None:
    """CLI: run the sweep (default), --print_commands=tpu|slurm, or --report_only."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    flag_values = flags.FLAGS
    config, workdir = flag_values.config, flag_values.workdir
    if flag_values.print_commands:
        report_command = shlex.join(
            ["python", "-m", "simclr_jax.sweep"]
            + [a for a in argv_without(sys.argv[1:], "--print_commands", "--launcher_args")]
            + ["--report_only"]
        )
        sys.stdout.write(
            launch.launch_commands(
                config,
                workdir,
                flag_values.print_commands,
                launcher_args=flag_values.launcher_args,
                report_command=report_command,
            )
        )
        return
    if flag_values.report_only:
        if not files.exists(workdir):
            raise app.UsageError(f"--workdir={workdir} does not exist: no sweep to report on")
        rows = report.write_summary_and_report(config, workdir, report_dir=flag_values.report_dir)
        sys.exit(0 if all(r["status"] == "done" for r in rows) else 1)
    stage_runner = runner.SubprocessStageRunner(compilation_cache=flag_values.compilation_cache)
    sys.exit(
        runner.run_sweep(
            config, workdir, stage_runner=stage_runner, report_dir=flag_values.report_dir
        )
    )


def _define_flags() -> None:
    # Defined only when run as a program, not at import: main.py defines a
    # --config flag of its own.
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "An ablation config (configs/ablation_*.py).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "The sweep directory; a rerun resumes.")
    flags.DEFINE_bool("report_only", False, "Only collect results and write the report.")
    flags.DEFINE_enum(
        "print_commands", "", ["", *launch.PLATFORMS], "Print launch commands instead of running."
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
    # configs/ablation_*.py import `configs.*` relative to the repository root.
    if commands.REPO_ROOT not in sys.path:
        sys.path.insert(0, commands.REPO_ROOT)
    _define_flags()
    cli.run(main)  # A user error (config_checks.UserInputError) prints one line, exit status 2.
