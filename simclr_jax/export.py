r"""Export a pretrained encoder (and projection head) to a flat .npz file, or to PyTorch.

  python -m simclr_jax.export --workdir=workdirs/quickstart --out=encoder.npz
  python -m simclr_jax.export --workdir=workdirs/quickstart --format=torchvision --out=encoder.pt
  python -m simclr_jax.export --workdir=workdirs/quickstart --format=safetensors \
      --out=encoder.safetensors

--format=torchvision|safetensors write the encoder alone in torchvision's ResNet state_dict
layout (simclr_jax.torch_export says which models load into torchvision and builds a plain
torch copy of the others); they need the extra `pip install -e '.[torch]'`. The rest of this
docstring is the default npz format.

Layout: one array per variable, keyed by its '/'-joined Flax path.
Parameters keep their module path ('encoder/block1_0/conv1/kernel',
'head/dense_0/kernel'); BatchNorm running statistics are prefixed with
'batch_stats/' ('batch_stats/encoder/stem_bn/mean'). The pretraining run's
config.model is stored as JSON under '__model_config__' and the checkpoint
step under '__step__', so a reader can rebuild the network with
models.build_encoder. load_exported(path) returns the nested
{'params', 'batch_stats'} dict that Flax's apply takes. Both the workdir and
the output may be local or on cloud storage (gs://...).
"""

import io
import json

import numpy as np
from absl import app, flags, logging

from simclr_jax import cli, files, torch_export
from simclr_jax.config_checks import ConfigError
from simclr_jax.eval import pretrained as pretrained_lib

BATCH_STATS_PREFIX = "batch_stats/"
MODEL_CONFIG_KEY = "__model_config__"
STEP_KEY = "__step__"
FORMATS = ("npz", *torch_export.TORCH_FORMATS)
# --out's default file name per format: encoder<suffix>.
DEFAULT_SUFFIX = {"npz": ".npz", "torchvision": ".pt", "safetensors": ".safetensors"}


def flatten_variables(variables: dict) -> dict[str, np.ndarray]:
    """{'params': tree, 'batch_stats': tree} -> {'a/b/c': array, 'batch_stats/a/b/c': array}."""
    flat = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict) or hasattr(value, "items"):
                walk(value, prefix + key + "/")
            else:
                flat[prefix + key] = np.asarray(value)

    walk(variables.get("params", {}), "")
    walk(variables.get("batch_stats", {}), BATCH_STATS_PREFIX)
    return flat


def unflatten_variables(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of flatten_variables."""
    variables = {"params": {}, "batch_stats": {}}
    for key, value in flat.items():
        if key.startswith("__"):
            continue
        if key.startswith(BATCH_STATS_PREFIX):
            node, key = variables["batch_stats"], key[len(BATCH_STATS_PREFIX) :]
        else:
            node = variables["params"]
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return variables


def _check_out(out: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    suffixes = torch_export.SUFFIXES.get(fmt, (".npz",))
    if not out.endswith(suffixes):
        raise ConfigError(
            f"out={out!r}: --format={fmt} writes {' or '.join(suffixes)} files; name the file "
            f"*{suffixes[0]}"
        )


def export_encoder(init_from: str, out: str, *, include_head: bool = True, fmt: str = "npz") -> str:
    """Writes the checkpoint's encoder (and head) variables to `out`.

    Args:
      init_from: a pretraining workdir or checkpoint step dir.
      out: destination path: '*.npz' for fmt 'npz', '*.pt' or '*.pth' for 'torchvision',
        '*.safetensors' for 'safetensors'.
      include_head: also export the projection head (for ft_proj_selector > 0); npz only, the
        PyTorch formats hold the encoder alone.
      fmt: one of FORMATS (see the module docstring and simclr_jax.torch_export).

    Returns:
      The path written.

    Raises:
      ConfigError: unknown format, a file name that does not fit it, or a model with no
        torchvision layout. MissingDependencyError: torch/safetensors missing for their format.
    """
    _check_out(out, fmt)
    if fmt in torch_export.TORCH_FORMATS:
        # Before the checkpoint is read: fail fast on a missing extra.
        torch_export.import_optional("safetensors" if fmt == "safetensors" else "torch")
    pretrained = pretrained_lib.load_pretrained(init_from)
    if fmt in torch_export.TORCH_FORMATS:
        return _export_torch(pretrained, out, fmt)
    if include_head and "head" not in pretrained.params:
        # Other methods' heads (BYOL's projector, predictor) have no ft_proj_selector layout.
        print(f"a {pretrained.method} checkpoint has no SimCLR head: exporting the encoder only")
        include_head = False
    names = ("encoder", "head") if include_head else ("encoder",)
    flat = flatten_variables(pretrained.variables(*names))
    flat[MODEL_CONFIG_KEY] = np.array(pretrained.model_config.to_json())
    flat[STEP_KEY] = np.array(pretrained.step, np.int64)
    buffer = io.BytesIO()  # np.savez needs a seekable file; files.py writes anywhere
    np.savez(buffer, **flat)
    files.write_bytes(out, buffer.getbuffer())  # a view: no second copy
    return out


def _export_torch(pretrained: pretrained_lib.Pretrained, out: str, fmt: str) -> str:
    torch_export.check_exportable(pretrained.model_config)
    encoder = pretrained.variables("encoder")
    state = torch_export.torchvision_state_dict(
        encoder["params"]["encoder"], encoder["batch_stats"]["encoder"], step=pretrained.step
    )
    metadata = {
        torch_export.MODEL_CONFIG_KEY: pretrained.model_config.to_json(),
        torch_export.STEP_KEY: str(pretrained.step),
    }
    return torch_export.save_state_dict(state, out, fmt, metadata)


def _load_npz(path: str):
    # np.load reads local files only; a remote file is read into memory first.
    return np.load(io.BytesIO(files.read_bytes(path)) if files.is_remote(path) else path)


def load_exported(path: str) -> dict:
    """Loads an export as Flax variables {'params': {...}, 'batch_stats': {...}}.

    Args:
      path: the .npz file (local or remote).

    Returns:
      {'params': {...}, 'batch_stats': {...}} of NumPy arrays.
    """
    with _load_npz(path) as data:
        return unflatten_variables({k: data[k] for k in data.files})


def load_exported_model_config(path: str) -> dict:
    """The pretraining config.model stored in an export (to rebuild the network).

    Args:
      path: the .npz file (local or remote).

    Returns:
      The config.model fields as a dict.
    """
    with _load_npz(path) as data:
        return json.loads(str(data[MODEL_CONFIG_KEY]))


def _define_flags() -> None:
    # Defined only when run as a program, not at import: the other command-line modules
    # (simclr_jax.convert, simclr_jax.embed) have an --out of their own.
    flags.DEFINE_string("workdir", None, "Pretraining workdir or checkpoint step dir.")
    flags.DEFINE_string(
        "out",
        None,
        "Output path (.npz, .pt/.pth, .safetensors); default encoder.<format's suffix>.",
    )
    flags.DEFINE_bool("include_head", True, "Also export the projection head (npz only).")
    # A string, not an enum flag, so a wrong value is one `error:` line like the other inputs.
    flags.DEFINE_string(
        "format", "npz", "npz (Flax paths), torchvision (torch.save state_dict) or safetensors."
    )
    flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # as main.py: orbax logs every restore at INFO
    f = flags.FLAGS
    out = f.out or "encoder" + DEFAULT_SUFFIX.get(f.format, ".npz")
    path = export_encoder(f.workdir, out, include_head=f.include_head, fmt=f.format)
    print(f"wrote {path}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)  # A user error (bad --out, missing checkpoint) prints one line, exit status 2.
