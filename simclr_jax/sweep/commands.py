"""main.py command lines of the sweep's cells.

Each cell stage is an ordinary `python main.py --config=<base file>
--workdir=<stage dir> --config.<field>=<value>...` run. config_overrides()
finds the overrides that turn the base config file into the cell's config and
checks them by parsing them back with main.py's own flag parser, so what runs
is exactly what the manifest records. simclr_jax.sweep.launch wraps the same
arguments in launch/tpu.sh or launch/slurm.sbatch.
"""

import os
import sys
import warnings
from collections.abc import Mapping

import ml_collections as mlc

from simclr_jax import config_checks, files

# simclr_jax/sweep/commands.py -> the repository root (where main.py and configs/ are).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN_PY = os.path.join(REPO_ROOT, "main.py")


def resolve_config_file(spec: str, field: str) -> tuple[str, str]:
    """Finds a config file named by the ablation config.

    Args:
      spec: 'path[:arg]', relative to the current directory or REPO_ROOT.
      field: the ablation config's field it came from (for error messages).

    Returns:
      (absolute 'path[:arg]', the 'path[:arg]' main.py gets when run from REPO_ROOT).

    Raises:
      ValueError: no such file.
    """
    if not spec or not isinstance(spec, str):
        config_checks.fail(field, spec, "name a config file, e.g. 'configs/cifar10.py'.")
    path, sep, arg = spec.partition(":")
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path), f"{REPO_ROOT}/{path}"]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        config_checks.fail(field, spec, f"no such config file (looked at {candidates}).")
    rel = os.path.relpath(found, REPO_ROOT)
    shown = found if rel.startswith("..") else rel
    return found + sep + arg, shown + sep + arg


def _parse_main_flags(config_spec: str, overrides) -> mlc.ConfigDict:
    """The config main.py would build from --config=config_spec and the overrides."""
    from absl import flags
    from ml_collections import config_flags

    # configs/*.py import their siblings as `configs.<name>`, which main.py finds
    # because it runs from the repository root.
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    argv = ["main.py", f"--config={config_spec}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    with warnings.catch_warnings():
        # ml_collections loads config files with the deprecated load_module().
        warnings.simplefilter("ignore", DeprecationWarning)
        flag_values(argv)
    return flag_values.config


def flatten_config(tree: Mapping, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples (as main.py parses them)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def _flag_value(key: str, value, where: str) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float | str):
        return value if isinstance(value, str) else repr(value)
    if isinstance(value, tuple | list):
        return repr(tuple(value))
    raise config_checks.ConfigError(
        f"config field {key}={value!r} differs from {where} but main.py cannot set a "
        f"{type(value).__name__} from the command line; set it in a config file instead."
    )


def config_overrides(config_spec: str, target: mlc.ConfigDict, section: str) -> list[str]:
    """--config.<field>=<value> flags that turn config_spec's config into target.

    Args:
      config_spec: 'path[:arg]' of the config file main.py starts from.
      target: the config the run must use.
      section: the ablation config's field it came from (for error messages).

    Returns:
      The override flags, sorted by field; checked: parsing them with main.py's
      flag parser gives exactly target.

    Raises:
      ValueError: a field of target is not in the file's config (or the other
        way round), or a value cannot be written on a command line.
    """
    base = flatten_config(_parse_main_flags(config_spec, []).to_dict())
    want = flatten_config(target.to_dict())
    for key in sorted(set(want) ^ set(base)):
        where = (
            "is not a field of"
            if key in want
            else "is missing from config." + section + " but is in"
        )
        raise config_checks.ConfigError(
            f"config.{section}.{key} {where} {config_spec}: main.py runs that file with "
            "--config.<field> overrides, so the two must have the same fields."
        )
    overrides = []
    for key in sorted(want):
        if want[key] != base[key] or type(want[key]) is not type(base[key]):
            overrides.append(f"--config.{key}={_flag_value(key, want[key], config_spec)}")
    try:
        rebuilt = flatten_config(_parse_main_flags(config_spec, overrides).to_dict())
    except Exception as e:  # absl's flag errors have no common base class worth naming
        raise config_checks.ConfigError(
            f"config.{section}: main.py cannot take {overrides} on top of {config_spec}: {e} "
            "(a field that file sets to None can be overridden only if it is declared as "
            "mlc.FieldReference(None, field_type=...))."
        ) from e
    wrong = [k for k in sorted(want) if rebuilt.get(k) != want[k]]
    if wrong:
        raise config_checks.ConfigError(
            f"config.{section}: the overrides of {config_spec} do not rebuild "
            f"{', '.join(f'{k}={want[k]!r} (parsed: {rebuilt.get(k)!r})' for k in wrong[:5])}."
        )
    return overrides


def stage_args(config: mlc.ConfigDict, cell, workdir: str) -> dict[str, tuple[str, ...]]:
    """main.py arguments of a cell's two runs.

    Args:
      config: the ablation config (names the base config files).
      cell: a simclr_jax.sweep.grid.Cell (name, pretrain and linear_eval configs).
      workdir: the sweep directory.

    Returns:
      {'pretrain': (...), 'linear_eval': (...)}: --config, --workdir, then the
      checked --config.* overrides.
    """
    out = {}
    for kind, spec_field, target in (
        ("pretrain", "pretrain_config", cell.pretrain),
        ("linear_eval", "linear_eval_config", cell.linear_eval),
    ):
        absolute, shown = resolve_config_file(config[spec_field], spec_field)
        overrides = config_overrides(absolute, target, kind)
        run_dir = files.join(workdir, cell.name, kind)
        out[kind] = (f"--config={shown}", f"--workdir={run_dir}", *overrides)
    return out
