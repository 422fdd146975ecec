"""Feature extraction for evaluation: one path for the trainer and every protocol.

`extract_features` runs any per-example function of a global image batch over
an evaluation split (padded, masked batches from pipeline.build_eval_dataset)
on every host's devices and returns the whole split's outputs on every host.
`extract_encoder_features` is that for a restored encoder's h (inference-mode
BatchNorm) with the eval preprocessing.
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
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Runs `embed_fn` over every batch and keeps the unpadded rows.

    Args:
      embed_fn: function from a global image batch [B, H, W, 3] to a dict of
        per-example outputs (e.g. {'h': [B, C], 'probe_logits': [B, K]}).
      batches: this host's batches {'image', 'label', 'mask'} (padded, masked).
      mesh: the device mesh the global batch is sharded over.

    Returns:
      (outputs, labels): every output for the whole split as float32 NumPy
      arrays and the int32 labels, gathered from every process (all processes
      get the same arrays) with the padding removed.
    """
    outputs, labels, masks = [], [], []
    for batch in batches:
        images = sharding.make_global_batch({"image": batch["image"]}, mesh)["image"]
        out = embed_fn(images)
        if jax.process_count() > 1:
            # Labels and masks travel as global arrays like the images, so their
            # rows land where the outputs' rows do whatever the mesh's process
            # layout (gathering the host-local arrays in process order would not
            # match on meshes that interleave hosts).
            local = {"label": batch["label"], "mask": np.asarray(batch["mask"], np.int32)}
            global_ = sharding.make_global_batch(local, mesh)
            out, global_ = multihost_utils.process_allgather((out, global_), tiled=True)
            label, mask = global_["label"], global_["mask"]
        else:
            label, mask = batch["label"], batch["mask"]
        outputs.append(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), out))
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
    encoder = models.build_encoder(pretrained.model_config, conv=conv)
    variables = jax.device_put(
        {"params": pretrained.params["encoder"], "batch_stats": pretrained.batch_stats["encoder"]},
        sharding.replicated_sharding(mesh),
    )

    out, labels = extract_features(
        lambda images: _encode(encoder, variables, images), eval_batches(config, split), mesh
    )
    return out["h"], labels


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
