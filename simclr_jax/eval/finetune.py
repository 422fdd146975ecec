"""Semi-supervised fine-tuning: the pretrained network plus a new linear classifier.

The classifier reads the projection-head layer chosen by
finetune.ft_proj_selector (0 = h, k = output of the k-th head layer; SimCLRv2
fine-tunes from the first hidden layer of its 3-layer head, i.e. 1). The
encoder, the head layers up to the selected one and the classifier are
trained on finetune.label_fraction of the labels (subsets.py) with crop + flip
augmentation. finetune.from_block = k > 0 freezes the stem and the ResNet
stages below k (their parameters and BN statistics stay as pretrained).

Steps run under jax.jit on batches sharded over the mesh; BatchNorm without an
axis name then normalises over the global batch (GSPMD inserts the
cross-device reductions), i.e. global BN as in pretraining.
"""

import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from simclr_jax import config_checks, models, optim, sharding, steps
from simclr_jax.config_checks import ConfigError
from simclr_jax.data import pipeline
from simclr_jax.eval import features as features_lib
from simclr_jax.eval import inputs as inputs_lib
from simclr_jax.eval import pretrained as pretrained_lib
from simclr_jax.eval import reports, subsets
from simclr_jax.labels import mean_labelled_cross_entropy


class FinetuneModel(nn.Module):
    """Encoder -> (projection head up to ft_proj_selector) -> linear classifier.

    Attributes:
      encoder: the ResNet.
      head: the ProjectionHead (unused when ft_proj_selector == 0).
      classifier: the new LinearHead.
      ft_proj_selector: which head output feeds the classifier (0 = h).
    """

    encoder: nn.Module
    head: nn.Module
    classifier: nn.Module
    ft_proj_selector: int

    @nn.compact
    def __call__(self, images, train: bool):
        h = jnp.asarray(self.encoder(images, train=train), jnp.float32)
        if self.ft_proj_selector == 0:
            features = h
        else:
            _, hiddens = self.head(h, train=train)
            features = models.select_ft_features(hiddens, self.ft_proj_selector)
        return self.classifier(features)


def build_finetune_model(
    model_cfg, num_classes: int, ft_proj_selector: int, *, conv: models.ModuleDef = nn.Conv
) -> FinetuneModel:
    """The fine-tuning network for a pretraining model config.

    Args:
      model_cfg: the pretraining run's config.model.
      num_classes: classes of the fine-tuning dataset.
      ft_proj_selector: 0 = h, k = k-th head layer (in [-(L+1), L]).
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      A FinetuneModel whose 'encoder' and 'head' match the pretraining model's.
    """
    pretrain = models.build_model(model_cfg, num_classes=num_classes, conv=conv)
    num = model_cfg.head_layers + 1
    if isinstance(ft_proj_selector, bool) or not isinstance(ft_proj_selector, int):
        raise ConfigError(f"finetune.ft_proj_selector={ft_proj_selector!r}: must be an int")
    if not -num <= ft_proj_selector < num:
        raise ConfigError(
            f"finetune.ft_proj_selector={ft_proj_selector}: the checkpoint's head has "
            f"{num - 1} layers; use an int in [{-num}, {num - 1}] (0 = h)"
        )
    return FinetuneModel(
        encoder=pretrain.encoder,
        head=pretrain.head,
        classifier=models.LinearHead(num_classes=num_classes),
        ft_proj_selector=ft_proj_selector % num,
    )


def frozen_mask(tree, from_block: int):
    """True for encoder leaves below stage `from_block` (stem included), else False."""

    def is_frozen(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        if from_block <= 0 or names[0] != "encoder":
            return False
        layer = names[1]
        if layer.startswith("stem"):
            return True
        return layer.startswith("block") and int(layer[5 : layer.index("_")]) < from_block

    return jax.tree_util.tree_map_with_path(is_frozen, tree)


def create_finetune_state(
    pretrained: pretrained_lib.Pretrained, model: FinetuneModel, tx, image_size: int, seed: int
) -> steps.TrainState:
    """A TrainState holding exactly the pretrained encoder/head and a new classifier.

    Args:
      pretrained: the restored checkpoint.
      model: the FinetuneModel.
      tx: the optimizer.
      image_size: input size, for initialising the classifier.
      seed: seed of the classifier's initialisation.

    Returns:
      The state at step 0.
    """
    fresh = model.init(jax.random.key(seed), jnp.zeros((2, image_size, image_size, 3)), train=False)
    names = [n for n in ("encoder", "head") if n in fresh["params"]]
    if "head" in names and "head" not in pretrained.params:
        raise ConfigError(
            f"finetune.ft_proj_selector={model.ft_proj_selector}: the checkpoint is a "
            f"{pretrained.method} run without SimCLR's projection head 'head'; fine-tune from h "
            "with finetune.ft_proj_selector=0"
        )
    params = {n: pretrained.params[n] for n in names}
    params["classifier"] = fresh["params"]["classifier"]
    batch_stats = {n: pretrained.batch_stats[n] for n in names if n in pretrained.batch_stats}
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree_util.tree_map(jnp.asarray, batch_stats),
        opt_state=tx.init(params),
    )


def make_train_step(model: FinetuneModel, tx, from_block: int):
    """A jitted (state, images, labels) -> (state, loss) step with frozen stages masked."""

    @jax.jit
    def train_step(state, images, labels):
        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            # Unlabelled rows (tfds's -1) of a split that has them get no loss.
            return mean_labelled_cross_entropy(logits, labels), new_vars["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        frozen = frozen_mask(updates, from_block)
        updates = jax.tree_util.tree_map(
            lambda u, f: jnp.zeros_like(u) if f else u, updates, frozen
        )
        # Frozen stages keep their pretrained running statistics.
        stats_frozen = frozen_mask(batch_stats, from_block)
        batch_stats = jax.tree_util.tree_map(
            lambda new, old, f: old if f else new, batch_stats, state.batch_stats, stats_frozen
        )
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new, loss

    return train_step


def run(config: mlc.ConfigDict, workdir: str, *, conv: models.ModuleDef = nn.Conv) -> dict:
    """Fine-tunes config.init_from on a label fraction and evaluates it.

    Args:
      config: configs/finetune.py.
      workdir: output directory (results.json, metrics, confusion matrix).
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      The results dict (provenance, label_fraction, labelled_examples,
      'summary', 'top1', 'top5').
    """
    ft = config.finetune
    fraction = subsets.check_fraction(ft.label_fraction)
    inputs = inputs_lib.open_inputs(config, batch_fields=("finetune.batch_size",))
    pretrained, mesh = inputs.pretrained, inputs.mesh
    data_cfg, subset = subsets.resolve_finetune_data(
        config.data, fraction, ft.subset_seed, official_imagenet=ft.official_imagenet_subsets
    )
    if subset is not None or data_cfg is config.data:  # (an official subset is another dataset)
        examples = None if subset is None else len(subset)
        config_checks.check_batch_fits(
            ft.batch_size, inputs.train_split, "finetune.batch_size", examples
        )
    ds, info = pipeline.build_finetune_dataset(
        data_cfg,
        config.augment,
        global_batch_size=ft.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        subset_indices=subset,
    )
    total_steps = int(math.ceil(ft.epochs * info.steps_per_epoch))
    model = build_finetune_model(
        pretrained.model_config, info.num_classes, ft.ft_proj_selector, conv=conv
    )
    tx, _ = optim.create_optimizer(
        ft.optim,
        batch_size=ft.batch_size,
        total_steps=total_steps,
        warmup_steps=int(round(ft.optim.warmup_epochs * info.steps_per_epoch)),
    )
    state = create_finetune_state(pretrained, model, tx, config.augment.image_size, config.seed)
    state = jax.device_put(state, sharding.replicated_sharding(mesh))
    train_step = make_train_step(model, tx, ft.from_block)
    t0 = time.time()
    batches = iter(pipeline.as_numpy_iterator(ds))
    for _ in range(total_steps):
        batch = sharding.make_global_batch(next(batches), mesh)
        state, loss = train_step(state, batch["image"], batch["label"])
    train_seconds = time.time() - t0

    @jax.jit
    def predict(variables, images):
        return {"logits": model.apply(variables, images, train=False)}

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    eval_ds = pipeline.build_eval_dataset(
        config.data,
        config.augment,
        split=config.data.eval_split,
        global_batch_size=config.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    out, labels = features_lib.extract_features(
        lambda images: predict(variables, images), pipeline.as_numpy_iterator(eval_ds), mesh
    )
    results = pretrained_lib.provenance("finetune", config, pretrained)
    results.update(
        label_fraction=fraction,
        labelled_examples=int(info.num_examples),
        finetune_dataset=f"{data_cfg.source}:{data_cfg.name}",
        steps=total_steps,
        final_train_loss=float(np.asarray(loss)) if total_steps else float("nan"),
        train_seconds=train_seconds,
        ft_proj_selector=int(ft.ft_proj_selector),
        from_block=int(ft.from_block),
    )
    results["summary"] = reports.summarize(out["logits"], labels, inputs.class_names)
    results["top1"], results["top5"] = results["summary"]["top1"], results["summary"]["top5"]
    reports.write_results(workdir, results, step=pretrained.step)
    print(f"fine-tuned on {fraction:.0%} of labels: top-1 {results['top1']:.4f}; in {workdir}")
    return results
