"""The batch-size ablation tool: a resumable grid of pretraining + linear-evaluation runs.

Run it as `python -m simclr_jax.sweep --config=configs/ablation_*.py --workdir=DIR`
(__main__.py: the command line). The modules, each importable on its own:
grid.py: the ablation config's checks and its cells; commands.py: each cell's
main.py arguments, checked against main.py's flag parser; runner.py: running
the cells locally in child processes; launch.py: the same runs as
launch/tpu.sh or launch/slurm.sbatch commands; results.py: the sweep
directory's layout, the cells' state and results, the summary; report.py: the
Markdown/CSV tables and the plot; reference.py: the paper's figures shown
beside ours.
"""
