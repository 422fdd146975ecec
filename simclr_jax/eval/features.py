"""Feature extraction for evaluation: one path for the trainer and every protocol.

`extract_features` runs any per-example function of a global image batch over
an evaluation split (padded, masked batches from pipeline.build_eval_dataset)
on every host's devices and returns the whole split's outputs on every host.
`extract_encoder_features` is that for a restored encoder's h (inference-mode
BatchNorm) with the eval preprocessing; `encode_split` also returns batch columns
such as each example's 'index' in the split.
"""

import functools
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import models, sharding
from simclr_jax.data import pipeline
from simclr_jax.eval import pretrained as pretrained_lib


def extract_features(
    embed_fn: Callable[[jax.Array], dict[str, jax.Array]],
    batches: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    batch_keys: tuple[str, ...] = (),
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Runs `embed_fn` over every batch and keeps the unpadded rows.

    Args:
      embed_fn: function from a global image batch [B, H, W, 3] to a dict of
        per-example outputs (e.g. {'h': [B, C], 'probe_logits': [B, K]}).
      batches: this host's batches {'image', 'label', 'mask', ...} (padded, masked).
      mesh: the device mesh the global batch is sharded over.
      batch_keys: integer columns of the batches to return beside the outputs,
        row-aligned with them (e.g. 'index', the example's position in the split).

    Returns:
      (outputs, labels): every output for the whole split as float32 NumPy
      arrays (and each batch key as int64), and the int32 labels, gathered from
      every process (all processes get the same arrays) with the padding removed.
    """
    outputs, labels, masks = [], [], []
    for batch in batches:
        images = sharding.make_global_batch({"image": batch["image"]}, mesh)["image"]
        out = embed_fn(images)
        # int32 on the way: without jax_enable_x64 an int64 column would be cast anyway.
        columns = {k: np.asarray(batch[k], np.int32) for k in batch_keys}
        if jax.process_count() > 1:
            # Labels and masks travel as global arrays like the images, so their
            # rows land where the outputs' rows do whatever the mesh's process
            # layout (gathering the host-local arrays in process order would not
            # match on meshes that interleave hosts).
            local = {"label": batch["label"], "mask": np.asarray(batch["mask"], np.int32)}
            global_ = sharding.make_global_batch({**local, **columns}, mesh)
            out, global_ = multihost_utils.process_allgather((out, global_), tiled=True)
            label, mask = global_["label"], global_["mask"]
            columns = {k: global_[k] for k in batch_keys}
        else:
            label, mask = batch["label"], batch["mask"]
        out = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), out)
        outputs.append({**out, **{k: np.asarray(v, np.int64) for k, v in columns.items()}})
        labels.append(np.asarray(label))
        masks.append(np.asarray(mask, bool))
    if not outputs:
        raise ValueError("the evaluation split produced no batches")
    mask = np.concatenate(masks)
    merged = {k: np.concatenate([o[k] for o in outputs])[mask] for k in outputs[0]}
    return merged, np.concatenate(labels)[mask].astype(np.int32)


def extract_encoder_features(
    pretrained: pretrained_lib.Pretrained,
    config: mlc.ConfigDict,
    split: str,
    mesh,
    *,
    conv: models.ModuleDef = nn.Conv,
) -> tuple[np.ndarray, np.ndarray]:
    """h (inference-mode BN) and labels for a whole split, with eval preprocessing.

    Args:
      pretrained: the network to encode with.
      config: the protocol config (data, augment, eval.batch_size).
      split: the split to encode.
      mesh: the device mesh.
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      (features [N, C] float32, labels [N] int32).
    """
    out, labels = encode_split(pretrained, config, split, mesh, conv=conv)
    return out["h"], labels


def encode_split(
    pretrained: pretrained_lib.Pretrained,
    config: mlc.ConfigDict,
    split: str,
    mesh,
    *,
    conv: models.ModuleDef = nn.Conv,
    batch_keys: tuple[str, ...] = (),
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """extract_encoder_features, also returning batch columns such as 'index'.

    Args:
      pretrained, config, split, mesh, conv: as for extract_encoder_features.
      batch_keys: columns of the eval batches to return, e.g. ('index',): each
        example's position in the split's fixed order (pipeline.build_eval_dataset).

    Returns:
      ({'h': [N, C] float32, **{key: [N] int64}}, labels [N] int32).
    """
    encoder = models.build_encoder(pretrained.model_config, conv=conv)
    variables = jax.device_put(
        {"params": pretrained.params["encoder"], "batch_stats": pretrained.batch_stats["encoder"]},
        sharding.replicated_sharding(mesh),
    )
    return extract_features(
        lambda images: _encode(encoder, variables, images),
        eval_batches(config, split),
        mesh,
        batch_keys=batch_keys,
    )


def eval_batches(config: mlc.ConfigDict, split: str):
    """This host's batches of `split` with the eval preprocessing (padded, masked).

    Args:
      config: a config with data, augment and eval.batch_size (the global batch).
      split: the split to read.

    Returns:
      An iterator of {'image', 'label', 'mask'} NumPy batches, for extract_features.
    """
    ds = pipeline.build_eval_dataset(
        config.data,
        config.augment,
        split=split,
        global_batch_size=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return pipeline.as_numpy_iterator(ds)


@functools.partial(jax.jit, static_argnums=0)
def _encode(encoder, variables, images):
    # Module-level and keyed on the (hashable) module: every split, and the
    # random-init baseline of the same architecture, reuse one executable.
    return {"h": encoder.apply(variables, images, train=False)}
