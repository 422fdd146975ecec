"""The representations h of a whole dataset split, written to files, with a 2-D map.

`python -m simclr_jax.embed` (simclr_jax/embed.py) is the command line; this module does
the work. The data is what the pretraining run read: its config.json's `data` and
`augment` sections (dataset, eval preprocessing), with any field overridden
(`embed_config`), and the split defaults to its data.eval_split. h comes from
features.encode_split, the path every evaluation protocol uses (eval preprocessing,
BatchNorm in inference mode, batches sharded over the local devices).

Files written to `out` (local or gs://):
  embeddings.npy  float32 [N, d]: h of every example of the split, in the split's order
  labels.npy      int32 [N]: its labels; outside [0, classes) (-1 in tfds) means unlabelled
  indices.npy     int64 [N]: each row's position in the split's fixed order (DataSource
                  'index'; with the split spec it identifies the image)
  paths.txt       N lines: each row's image file (image-folder sources only)
  map.png         the 2-D map (FIGURE_PIXELS), coloured by class, titled with the split,
                  the number of points, the method and the checkpoint step
  map_points.npy  float32 [M, 2] and map_rows.npy int64 [M]: the map's coordinates and the
                  rows of embeddings.npy they belong to (M <= max_examples)
  embed.json      checkpoint, dataset, split, N, d, class names, method, timings
"""

import dataclasses
import difflib
import io
import json
import time

import jax
import ml_collections as mlc
import numpy as np

from simclr_jax import config_checks, files, models, sharding
from simclr_jax.data import pipeline, sources
from simclr_jax.data.sources import base
from simclr_jax.eval import embedding_map, features
from simclr_jax.eval import pretrained as pretrained_lib

DEFAULT_MAX_EXAMPLES = 5000  # points of the map; embeddings.npy always holds the whole split
DEFAULT_EVAL_BATCH = 512
# The sections of the run's config that describe the data; overrides may touch only these.
SECTIONS = ("data", "augment", "eval")


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """h of a whole split.

    Attributes:
      h: float32 [N, d] representations.
      labels: int32 [N] labels (outside [0, len(class_names)): unlabelled).
      indices: int64 [N] positions in the split's fixed order.
      paths: the image files of the rows (image-folder sources), else None.
      class_names: label i is class_names[i].
      dataset: 'source:name' of the data.
      split: the split spec.
      step: the checkpoint's training step.
      checkpoint: the checkpoint step directory.
    """

    h: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    paths: tuple[str, ...] | None
    class_names: tuple[str, ...]
    dataset: str
    split: str
    step: int
    checkpoint: str


def embed_config(
    init_from: str, overrides: dict | None = None, *, field: str = "init_from"
) -> mlc.ConfigDict:
    """The data, augment and eval sections to embed with: the pretraining run's, overridden.

    Args:
      init_from: a pretraining workdir or a checkpoint step dir.
      overrides: dotted field -> value, e.g. {'data.name': 'cifar10', 'eval.batch_size': 256};
        every field must exist in the run's config ('eval.batch_size' and
        'eval.num_devices' always do) and keep its type.
      field: how init_from is named in errors.

    Returns:
      ConfigDict {init_from, data, augment, eval: {batch_size, num_devices}}, locked.

    Raises:
      ConfigError: an unknown field or a value of the wrong type (naming both).
      MissingPathError: init_from or its config.json is missing.
    """
    run = pretrained_lib.load_run_config(init_from, field=field)
    missing = [name for name in ("data", "augment") if name not in run]
    if missing:
        # E.g. a workdir written by simclr_jax.convert: the reference checkpoint names no data.
        raise config_checks.ConfigError(
            f"{field}={init_from!r}: its config.json has no {' or '.join(missing)} section, so "
            "there is no run's data to embed (a checkpoint imported with simclr_jax.convert); "
            "embed the output of a pretraining run, or evaluate the imported encoder with the "
            "kNN / linear-eval protocols, whose configs name the data"
        )
    config = mlc.ConfigDict()
    config.init_from = init_from
    config.data = run.data
    config.augment = run.augment
    config.eval = mlc.ConfigDict()
    config.eval.batch_size = int(run.get("eval", {}).get("batch_size", DEFAULT_EVAL_BATCH))
    config.eval.num_devices = 0  # 0: all local devices
    config.lock()
    for key, value in (overrides or {}).items():
        if key.split(".")[0] not in SECTIONS:
            raise config_checks.ConfigError(
                f"--config.{key}: only the sections {SECTIONS} can be overridden"
            )
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError):
            raise config_checks.ConfigError(_unknown_field_message(config, key)) from None
        except TypeError as e:
            raise config_checks.ConfigError(f"--config.{key}={value!r}: {e}") from None
    return config


def _unknown_field_message(config: mlc.ConfigDict, key: str) -> str:
    *parents, name = key.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), mlc.ConfigDict):
            return f"--config.{key}: {'.'.join(parents)} is not a section of the run's config"
        node = node[part]
    fields = sorted(node.keys())
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"--config.{key}: no such field; config.{'.'.join(parents)} has {fields}{hint}"


def open_split(config: mlc.ConfigDict, split: str) -> base.DataSource:
    """Opens `split` of config.data, or raises ConfigError listing the available splits."""
    try:
        source = sources.load_source(config.data, split)
    except base.UnknownSplitError as e:
        raise config_checks.ConfigError(f"--split={split!r} is invalid: {e}") from None
    if source.num_examples == 0:
        raise config_checks.ConfigError(f"--split={split!r} is invalid: it is empty")
    return source


def embed_split(
    config: mlc.ConfigDict, split: str, *, conv: models.ModuleDef | None = None
) -> Embeddings:
    """h of every example of `split`, with the labels and the examples' ids.

    Args:
      config: embed_config(...).
      split: a split spec of config.data ('test', 'train[:10%]', ...).
      conv: the encoder's convolution class (flax.linen.Conv when None).

    Returns:
      The Embeddings, rows in the split's fixed order.

    Raises:
      ConfigError: an unknown or empty split, a batch size that does not split over
        the devices, a checkpoint that does not match its config.json.
    """
    config_checks.require_positive(config, "eval.batch_size")
    pipeline.configure_tensorflow()
    source = open_split(config, split)  # before restoring: a mistyped split fails in seconds
    pretrained = pretrained_lib.load_pretrained(config.init_from, field="init_from")
    devices = sharding.select_devices(config.eval.num_devices, "eval.num_devices")
    batch = config.eval.batch_size
    config_checks.check_batch_split(batch, len(devices), jax.process_count(), "eval.batch_size")
    mesh = sharding.create_mesh(devices)
    kwargs = {} if conv is None else {"conv": conv}
    out, labels = features.encode_split(
        pretrained, config, split, mesh, batch_keys=("index",), **kwargs
    )
    indices = out["index"]
    paths = None
    if source.table is not None and source.table.keys_are_paths:
        paths = tuple(str(p) for p in source.table.keys[indices])
    return Embeddings(
        h=out["h"],
        labels=labels,
        indices=indices,
        paths=paths,
        class_names=tuple(source.class_names),
        dataset=f"{config.data.source}:{source.name}",
        split=split,
        step=pretrained.step,
        checkpoint=pretrained.path,
    )


def _save_npy(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()  # np.save needs a file object; files.py writes anywhere
    np.save(buffer, array)
    files.write_bytes(path, buffer.getbuffer())


def map_title(emb: Embeddings, num_points: int, method: str) -> str:
    """'<dataset> <split>: <method> of h, <M> [of <N>] examples, checkpoint step <step>'."""
    count = f"{num_points:,}" if num_points == len(emb.h) else f"{num_points:,} of {len(emb.h):,}"
    return (
        f"{emb.dataset} '{emb.split}': {embedding_map.METHOD_NAMES[method]} of h, "
        f"{count} examples, checkpoint step {emb.step}"
    )


def write_embeddings(
    out: str,
    config: mlc.ConfigDict,
    split: str,
    *,
    method: str = "tsne",
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    seed: int = 0,
    conv: models.ModuleDef | None = None,
) -> dict:
    """Embeds `split`, maps up to max_examples of it in 2-D and writes every file to `out`.

    Args:
      out: output directory (created; local or gs://).
      config: embed_config(...).
      split: the split spec to embed.
      method: 'tsne' or 'umap' (embedding_map.METHODS).
      max_examples: points of the map, a seeded uniform subset when the split is larger
        (0: all); embeddings.npy holds the whole split regardless.
      seed: seed of the subset and of the map.
      conv: the encoder's convolution class (flax.linen.Conv when None).

    Returns:
      The summary written to embed.json.
    """
    embedding_map.check_method(method)  # before any work
    embedding_map.subsample_rows(0, max_examples, seed)  # raises for a bad max_examples
    start = time.perf_counter()
    print(f"embedding split {split!r} of {config.data.source}:{config.data.name}", flush=True)
    emb = embed_split(config, split, conv=conv)
    encode_seconds = time.perf_counter() - start
    n, d = emb.h.shape
    print(f"encoded {n:,} examples to h [{n}, {d}] in {encode_seconds:.1f}s", flush=True)
    if n < embedding_map.MIN_MAP_ROWS:  # before anything is written
        raise config_checks.ConfigError(
            f"split {split!r} of {config.data.source}:{config.data.name} has {n} examples; a "
            f"2-D map needs at least {embedding_map.MIN_MAP_ROWS}"
        )
    files.makedirs(out)
    _save_npy(files.join(out, "embeddings.npy"), emb.h)
    _save_npy(files.join(out, "labels.npy"), emb.labels)
    _save_npy(files.join(out, "indices.npy"), emb.indices)
    if emb.paths is not None:
        files.write_text(files.join(out, "paths.txt"), "".join(p + "\n" for p in emb.paths))

    rows = embedding_map.subsample_rows(n, max_examples, seed)
    name = embedding_map.METHOD_NAMES[method]
    print(f"{name} of {len(rows):,} points (max_examples={max_examples})...", flush=True)
    start = time.perf_counter()
    points = embedding_map.map_2d(emb.h[rows], method, seed=seed)
    map_seconds = time.perf_counter() - start
    title = map_title(emb, len(rows), method)
    embedding_map.plot_map(
        points, emb.labels[rows], emb.class_names, files.join(out, "map.png"), title
    )
    _save_npy(files.join(out, "map_points.npy"), points)
    _save_npy(files.join(out, "map_rows.npy"), rows)
    print(f"{name} took {map_seconds:.1f}s", flush=True)
    summary = {
        "checkpoint": {"path": emb.checkpoint, "step": emb.step},
        "dataset": emb.dataset,
        "split": split,
        "num_examples": int(n),
        "dim": int(d),
        "class_names": list(emb.class_names),
        "map": {"method": method, "points": len(rows), "seed": seed, "title": title},
        "seconds": {"encode": round(encode_seconds, 2), "map": round(map_seconds, 2)},
    }
    files.write_text(files.join(out, "embed.json"), json.dumps(summary, indent=2) + "\n")
    return summary
