"""Every config field the code reads is declared in configs/ (so --config.<field>=... works).

The configs are locked: a field that the code reads with `.get(name, default)`
but that no config declares cannot be set from the command line. The test
walks the library's source (ast) for reads of config fields and checks each
against the union of the fields the configs in configs/ declare.
"""

import ast
import importlib
import os

import ml_collections as mlc
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every config module with each argument its get_config accepts.
CONFIGS = {
    "cifar10": [None, "runlocal"],
    "imagenet": [None, "sqrt"],
    "quickstart": [None],
    "byol_cifar10": [None, "quickstart", "runlocal"],
    "mocov2_cifar10": [None, "quickstart", "runlocal"],
    "mocov3_cifar10": [None, "quickstart", "runlocal"],
    "barlow_twins_cifar10": [None, "quickstart", "runlocal"],
    "vicreg_cifar10": [None, "quickstart", "runlocal"],
    "nnclr_cifar10": [None, "quickstart", "runlocal"],
    "instdisc_cifar10": [None, "quickstart", "runlocal"],
    "byol_imagenet": [None, "runlocal"],
    "mocov3_imagenet": [None, "runlocal"],
    "barlow_twins_imagenet": [None, "runlocal"],
    "vicreg_imagenet": [None, "runlocal"],
    "mocov2_imagenet": [None, "runlocal"],
    "linear_eval": [None, "reference"],
    "knn": [None],
    "finetune": ["1pct", "10pct", "100pct"],
    "ablation_cifar10": [None],
    "ablation_imagenet": [None],
    "ablation_tiny": [None, "simclr", "byol", "mocov3", "mocov2", "barlow_twins", "vicreg"]
    + ["nnclr", "instdisc"],
}
# Local names the library gives to one section of the config.
SECTION_VARIABLES = {
    "data_cfg": "data",
    "aug_cfg": "augment",
    "model_cfg": "model",
    "model_config": "model",
    "optim_cfg": "optim",
    "linear_cfg": "linear",
}
_METHODS = {name for name in dir(mlc.ConfigDict) if not name.startswith("_")}


def declared_fields() -> tuple[set[str], set[str]]:
    """('section.field' for every field of every nested section plus top-level fields,
    the names of the sections)."""
    fields, sections = set(), set()

    def walk(section: str | None, cfg: mlc.ConfigDict):
        for key, value in cfg.items():
            fields.add(f"{section}.{key}" if section else key)
            if isinstance(value, mlc.ConfigDict):
                sections.add(key)
                walk(key, value)

    for name, args in CONFIGS.items():
        module = importlib.import_module(f"configs.{name}")
        for arg in args:
            walk(None, module.get_config(arg) if arg else module.get_config())
    return fields, sections


def _chain(node: ast.AST) -> list[str] | None:
    """config.a.b -> ['a', 'b']; data_cfg.x -> ['data', 'x']; anything else -> None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.reverse()
    if node.id == "config":
        return parts
    if node.id in SECTION_VARIABLES:
        return [SECTION_VARIABLES[node.id], *parts]
    return None


def _read_of(node: ast.AST) -> list[str] | None:
    """The attribute path an expression reads from a config, if it reads one."""
    if (  # config.section.get("field") / data_cfg.get("field")
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        owner = _chain(node.func.value)
        return None if owner is None else [*owner, node.args[0].value]
    if (  # a helper given a section and a field name: _cfg_float(optim_cfg, "b1", 0.9)
        isinstance(node, ast.Call)
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        owner = _chain(node.args[0])
        if owner:
            return [*owner, node.args[1].value]
    if isinstance(node, ast.Attribute):
        return _chain(node)
    return None


def _field(path: list[str], sections: set[str]) -> str | None:
    """The config field a path reads: its first (section, non-section) pair, or a top-level
    field; None for a ConfigDict method (config.to_dict, config.data.get, ...)."""
    for i, part in enumerate(path):
        if part in _METHODS:
            return None
        if part not in sections:
            return f"{path[i - 1]}.{part}" if i else part
    return None  # a whole section


def code_reads(sections: set[str]) -> dict[str, str]:
    """'section.field' -> 'file:line' of one place that reads it."""
    reads = {}
    paths = [os.path.join(REPO, "main.py")]
    for root, _, files in os.walk(os.path.join(REPO, "simclr_jax")):
        paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    for path in sorted(paths):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            read = _read_of(node)
            field = read and _field(read, sections)
            if field:
                reads.setdefault(field, f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return reads


def test_the_walker_finds_reads_of_each_kind():
    reads = code_reads(declared_fields()[1])
    # Attribute chains on `config`, `.get` on a section variable or on config.section, a helper
    # given a section and a field name.
    for field in ("model.depth", "data.extract_dir", "eval.compare_random_init", "optim.b1"):
        assert field in reads, field


def test_every_field_the_code_reads_is_declared_in_a_config():
    declared, sections = declared_fields()
    missing = {f: where for f, where in code_reads(sections).items() if f not in declared}
    assert not missing, f"read but declared in no configs/*.py: {missing}"


@pytest.mark.parametrize(
    "flag,value",
    [("data.extract_dir", "/tmp/archives"), ("data.split_seed", 7), ("data.shuffle_buffer", 1000),
     ("optim.b1", 0.8), ("eval.compare_random_init", True)],
)  # fmt: skip
def test_fields_once_undeclared_can_be_overridden_on_the_locked_config(flag, value):
    """What --config.<flag>=<value> does in main.py: set a field of the locked config."""
    from configs import cifar10

    config = cifar10.get_config()
    config.lock()  # main.py's config flag is lock_config=True: undeclared fields raise
    section, name = flag.split(".")
    config[section][name] = value
    assert config[section][name] == value
