"""Finding and reading a checkpoint of the reference SimCLR TF2 code, and naming its variables.

The reference (google-research/simclr, tf2/) builds a Keras `model.Model` with `resnet_model`
(tf2/resnet.py), `_projection_head` and, with linear eval, `supervised_head` (tf2/model.py),
and saves it with `tf.train.Checkpoint(model=...)`. Its variables are named by the object
graph, e.g. `model/resnet_model/block_groups/0/layers/0/conv2d_bn_layers/0/conv2d/kernel`.

Each variable is named by a path through the checkpoint's object graph
(`_CHECKPOINTABLE_OBJECT_GRAPH`) that avoids Keras' alias lists (`variables`,
`trainable_variables`, `keras_api`, `layer_with_weights-N`, ...), so a SavedModel whose
checkpoint keys are aliases still yields structural names. The `.ATTRIBUTES/VARIABLE_VALUE`
suffix and everything before the first `resnet_model`, `_projection_head` or
`supervised_head` component are dropped, so any root object (`model/`, a SavedModel's exported
module) works. Optimizer slots, `optimizer/...`, `global_step` and `save_counter` are not
model variables; any other name outside the three parts is an error.

The released TF2 SavedModels (converted from TF1 by the authors) were not available to check
their names against; reference_layout maps what is found here.
"""

import collections
import dataclasses
import re
from typing import Any

import numpy as np

from simclr_jax import cli, files
from simclr_jax.config_checks import ConfigError, MissingPathError

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
# Object-graph edges that alias variables reachable structurally (Keras' SavedModel lists).
_ALIAS_EDGES = frozenset(
    {
        "variables",
        "trainable_variables",
        "non_trainable_variables",
        "weights",
        "trainable_weights",
        "non_trainable_weights",
        "keras_api",
        "regularization_losses",
        "_variables",
    }
)
_ALIAS_EDGE_PATTERN = re.compile(r"^(layer_with_weights|layer)-\d+$")
# The first component of each part of the reference model; the names are those of
# tf2/model.py (attribute names) and of its SupervisedHead's default Keras name.
ANCHORS = {
    "resnet_model": "encoder",
    "_projection_head": "head",
    "projection_head": "head",
    "supervised_head": "supervised",
    "head_supervised": "supervised",
}
# Bookkeeping outside the model: never imported.
_SKIPPED_LEAVES = frozenset({"global_step", "save_counter", OBJECT_GRAPH_KEY})


@dataclasses.dataclass
class ReferenceVariables:
    """The model variables of a reference checkpoint, by part.

    Attributes:
      prefix: the checkpoint prefix read.
      parts: {'encoder' | 'head' | 'supervised': {name inside the part: array}}, names with
        the suffix and the object-graph prefix removed, e.g. 'block_groups/0/layers/0/...'.
      full_names: {(part, name): the variable's name in the checkpoint} for error messages.
      step: the checkpoint's global_step (0 if it has none).
    """

    prefix: str
    parts: dict[str, dict[str, np.ndarray]]
    full_names: dict[tuple[str, str], str]
    step: int


def resolve_prefix(path: str) -> str:
    """The checkpoint prefix for a path the user gave.

    Args:
      path: a checkpoint prefix (model_dir/ckpt-0), a directory holding a `checkpoint` file
        (its latest checkpoint), a SavedModel directory, or a SavedModel's
        saved_model/variables/variables prefix.

    Returns:
      A prefix for tf.train.load_checkpoint.

    Raises:
      MissingPathError: nothing readable as a TF checkpoint is there.
    """
    if files.is_remote(path):  # files reads remote paths through TensorFlow.
        cli.import_tensorflow_quietly()
    if files.exists(path + ".index"):
        return path
    if files.isdir(path):
        for candidate in (
            files.join(path, "variables", "variables"),
            files.join(path, "saved_model", "variables", "variables"),
        ):
            if files.exists(candidate + ".index"):
                return candidate
        cli.import_tensorflow_quietly()
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(path)
        if latest:
            return latest
    raise MissingPathError(
        f"--from={path!r} is not a TF checkpoint: give a checkpoint prefix (model_dir/ckpt-0, "
        "with ckpt-0.index beside it), a model_dir with a 'checkpoint' file, or a SavedModel "
        "directory / its saved_model/variables/variables prefix"
    )


def _is_alias(edge: str) -> bool:
    return edge in _ALIAS_EDGES or bool(_ALIAS_EDGE_PATTERN.match(edge))


def structural_names(graph: Any) -> dict[str, str]:
    """{checkpoint key: structural path} for every variable of a TrackableObjectGraph.

    Breadth-first from the root, first along non-alias edges only, then along all edges for
    the nodes not reached yet, so each variable is named by its shortest structural path.
    """
    paths: dict[int, str] = {0: ""}
    for allow_alias in (False, True):
        queue = collections.deque(paths)
        while queue:
            node_id = queue.popleft()
            for child in graph.nodes[node_id].children:
                if child.node_id in paths or (not allow_alias and _is_alias(child.local_name)):
                    continue
                base = paths[node_id]
                paths[child.node_id] = f"{base}/{child.local_name}" if base else child.local_name
                queue.append(child.node_id)
    names = {}
    for node_id, node in enumerate(graph.nodes):
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE" and node_id in paths:
                names[attribute.checkpoint_key] = paths[node_id]
    return names


def _split_part(name: str) -> tuple[str, str] | None:
    """(part, name inside it) for a structural name, None for bookkeeping; raises otherwise."""
    components = name.split("/")
    for i, component in enumerate(components):
        if component in ANCHORS:
            return ANCHORS[component], "/".join(components[i + 1 :])
    if components[-1] in _SKIPPED_LEAVES or "optimizer" in components:
        return None
    if "base_model" in components:
        raise ConfigError(
            f"variable {name!r} is named as in the reference's TF1 code (base_model/conv2d_N/...), "
            "which is not supported: give a checkpoint of its TF2 code (names with resnet_model/)"
        )
    raise ConfigError(
        f"unexpected variable {name!r} in the reference checkpoint: it belongs to none of "
        f"{sorted(set(ANCHORS))} (a SimCLR TF2 model's parts)"
    )


def read_reference(path: str) -> ReferenceVariables:
    """Reads the model variables of a reference SimCLR TF2 checkpoint or SavedModel.

    Args:
      path: see resolve_prefix.

    Returns:
      The ReferenceVariables (float32 NumPy arrays).

    Raises:
      MissingPathError: path is not a TF checkpoint.
      ConfigError: a variable belongs to no part of the model, or there is no encoder.
    """
    prefix = resolve_prefix(path)  # Before importing TensorFlow: a bad path fails fast.
    cli.import_tensorflow_quietly()
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise MissingPathError(
            f"--from={path!r}: cannot read {prefix} as a TF checkpoint: {e}"
        ) from e
    keys = sorted(reader.get_variable_to_shape_map())
    if OBJECT_GRAPH_KEY in keys:
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
        names = structural_names(graph)
    else:  # A name-based (TF1-style) checkpoint: its keys are the names.
        names = {}
    parts: dict[str, dict[str, np.ndarray]] = {"encoder": {}, "head": {}, "supervised": {}}
    full_names = {}
    step = 0
    for key in keys:
        if key == OBJECT_GRAPH_KEY or ".OPTIMIZER_SLOT" in key:
            continue
        name = names.get(key, key.removesuffix(VALUE_SUFFIX))
        if name.split("/")[-1] == "global_step":
            step = int(reader.get_tensor(key))
        located = _split_part(name)
        if located is None:
            continue
        part, inner = located
        if inner in parts[part]:
            raise ConfigError(f"variable {name!r} appears twice in {prefix}")
        parts[part][inner] = np.asarray(reader.get_tensor(key), np.float32)
        full_names[(part, inner)] = key.removesuffix(VALUE_SUFFIX)
    if not parts["encoder"]:
        raise ConfigError(
            f"{prefix} holds no reference ResNet variables (names containing 'resnet_model/'): "
            "is it a checkpoint of the SimCLR TF2 code (google-research/simclr, tf2/)?"
        )
    return ReferenceVariables(prefix=prefix, parts=parts, full_names=full_names, step=step)
