"""Linear evaluation of a frozen pretrained encoder (config.protocol='linear_eval').

Linear evaluation trains a linear classifier (dense + bias) on h, the
encoder's pooled representation; the encoder is frozen: BatchNorm uses its
running statistics and no encoder variable is ever updated. Two modes
(config.linear.mode):
- 'cached': h is extracted once for the train split with the eval
  preprocessing and the classifier is trained on the cached features in JAX.
  Seconds on CPU; the default for small runs.
- 'reference': the reference recipe, crop + flip augmentation on every step
  (pipeline.build_finetune_dataset), h computed by the frozen encoder inside
  the step; momentum SGD (Nesterov) with cosine decay.
The kNN protocol is simclr_jax.eval.knn.

With config.eval.compare_random_init the same protocol also runs on a
randomly initialised encoder of the same architecture and results.json holds
both ('random_init').
"""

import math
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from simclr_jax import config_checks, models, optim, sharding
from simclr_jax.data import pipeline
from simclr_jax.eval import features as features_lib
from simclr_jax.eval import inputs as inputs_lib
from simclr_jax.eval import pretrained as pretrained_lib
from simclr_jax.eval import reports, subsets
from simclr_jax.labels import keep_labelled, mean_labelled_cross_entropy

MODES = ("cached", "reference")


@flax.struct.dataclass
class LinearState:
    """Classifier training state; `frozen` holds the encoder's variables (never updated)."""

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any


def _classifier_optimizer(linear_cfg, batch_size: int, total_steps: int):
    optim_cfg = mlc.ConfigDict(
        {
            "name": "sgd",
            "base_lr": linear_cfg.base_lr,
            "lr_scaling": linear_cfg.lr_scaling,
            "weight_decay": linear_cfg.weight_decay,
            "momentum": linear_cfg.momentum,
            "nesterov": linear_cfg.nesterov,
        }
    )
    return optim.create_optimizer(
        optim_cfg, batch_size=batch_size, total_steps=total_steps, warmup_steps=0
    )


def _check_linear_config(linear_cfg) -> None:
    if linear_cfg.mode not in MODES:
        raise config_checks.ConfigError(
            f"config.linear.mode={linear_cfg.mode!r}: use one of {MODES}"
        )
    if not linear_cfg.epochs or linear_cfg.epochs <= 0:
        raise config_checks.ConfigError(f"config.linear.epochs={linear_cfg.epochs!r}: must be > 0")
    if not linear_cfg.batch_size or linear_cfg.batch_size <= 0:
        raise config_checks.ConfigError(
            f"config.linear.batch_size={linear_cfg.batch_size!r}: must be > 0"
        )


def train_linear_on_features(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    linear_cfg: mlc.ConfigDict,
    *,
    seed: int = 0,
    init_params: Any = None,
) -> Any:
    """Trains a LinearHead on fixed features ('cached' mode).

    Args:
      features: [N, C] float32 features.
      labels: [N] int labels; rows outside [0, num_classes) (tfds's -1: unlabelled) are
        dropped before training.
      num_classes: number of classes.
      linear_cfg: config.linear (epochs, batch_size, base_lr, lr_scaling,
        weight_decay, momentum, nesterov).
      seed: seed of the initialisation and the per-epoch shuffles.
      init_params: optional initial classifier parameters (e.g. the probe).

    Returns:
      The trained LinearHead parameters.

    Raises:
      ConfigError: for a bad linear config, or when no row has a label in [0, num_classes).
    """
    _check_linear_config(linear_cfg)
    labels, features = keep_labelled(labels, num_classes, features)
    if len(labels) == 0:
        raise config_checks.ConfigError(
            "linear evaluation: the train split has no labelled example (labels in "
            f"[0, {num_classes})); set config.data.train_split to a labelled split"
        )
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    n = features.shape[0]
    batch = min(int(linear_cfg.batch_size), n)
    steps_per_epoch = n // batch
    epochs = int(math.ceil(linear_cfg.epochs))
    head = models.LinearHead(num_classes=num_classes)
    key = jax.random.key(seed)
    params = init_params or head.init(key, features[:1])["params"]
    tx, _ = _classifier_optimizer(linear_cfg, batch, epochs * steps_per_epoch)

    def loss_fn(params, x, y):
        logits = head.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # Features are arguments, not closed-over constants, which XLA would fold
    # into the executable (slow compiles, a copy per call).
    @jax.jit
    def train_epoch(params, opt_state, epoch, features, labels):
        # One compiled scan per epoch: the whole loop stays on device.
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
        perm = perm[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)

        def step(carry, idx):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, features[idx], labels[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), perm)
        return params, opt_state

    opt_state = tx.init(params)
    for epoch in range(epochs):
        params, opt_state = train_epoch(params, opt_state, epoch, features, labels)
    return params


def classify(params: Any, features: np.ndarray, num_classes: int) -> np.ndarray:
    """Logits [N, num_classes] of a LinearHead on features [N, C]."""
    head = models.LinearHead(num_classes=num_classes)
    return np.asarray(jax.jit(head.apply)({"params": params}, jnp.asarray(features)))


class _FrozenEncoderClassifier(nn.Module):
    encoder: nn.Module
    classifier: nn.Module

    def __call__(self, images, encoder_variables):
        # The encoder runs with its running BN statistics and outside the
        # gradient: only the classifier's parameters are differentiated.
        h = self.encoder.apply(encoder_variables, images, train=False)
        return self.classifier(jax.lax.stop_gradient(h))


def train_linear_reference(
    pretrained: pretrained_lib.Pretrained,
    config: mlc.ConfigDict,
    num_classes: int,
    mesh,
    *,
    init_params: Any = None,
    conv: models.ModuleDef = nn.Conv,
) -> LinearState:
    """Trains the classifier on augmented images through the frozen encoder ('reference').

    Args:
      pretrained: the encoder to evaluate.
      config: the protocol config (data, augment, linear, seed).
      num_classes: classes of the dataset.
      mesh: the device mesh; batches are sharded over it.
      init_params: optional initial classifier parameters.
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      The final LinearState; `frozen` is the encoder's variables as used.
    """
    linear_cfg = config.linear
    _check_linear_config(linear_cfg)
    ds, info = pipeline.build_finetune_dataset(
        config.data,
        config.augment,
        global_batch_size=linear_cfg.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        subset_indices=subsets.labelled_subset(config.data),  # (None: every example labelled)
    )
    total_steps = int(math.ceil(linear_cfg.epochs * info.steps_per_epoch))
    model = _FrozenEncoderClassifier(
        encoder=models.build_encoder(pretrained.model_config, conv=conv),
        classifier=models.LinearHead(num_classes=num_classes, name="classifier"),
    )
    tx, _ = _classifier_optimizer(linear_cfg, linear_cfg.batch_size, total_steps)
    frozen = pretrained.variables("encoder")
    frozen = {
        "params": frozen["params"]["encoder"],
        "batch_stats": frozen["batch_stats"]["encoder"],
    }
    size = config.augment.image_size
    if init_params is None:
        dummy = jnp.zeros((1, size, size, 3))
        init_params = model.init(jax.random.key(config.seed), dummy, frozen)["params"]
    state = LinearState(
        step=jnp.zeros((), jnp.int32),
        params=init_params,
        opt_state=tx.init(init_params),
        frozen=frozen,
    )
    state = jax.device_put(state, sharding.replicated_sharding(mesh))

    @jax.jit
    def train_step(state, images, labels):
        def loss_fn(params):
            logits = model.apply({"params": params}, images, state.frozen)
            return mean_labelled_cross_entropy(logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return new, loss

    batches = iter(pipeline.as_numpy_iterator(ds))
    for _ in range(total_steps):
        batch = sharding.make_global_batch(next(batches), mesh)
        state, _ = train_step(state, batch["image"], batch["label"])
    return state


def _check_probe_classes(pretrained, num_classes: int) -> None:
    pretrained_lib.check_num_classes(
        pretrained.probe_classes,
        num_classes,
        head="checkpoint's online probe",
        fix="set --config.linear.init_from_probe=False to train a new classifier.",
    )


def _linear_once(pretrained, config, mesh, num_classes, train_feats, seed, conv):
    """Trains the classifier for `pretrained`; returns eval-split logits and labels."""
    init = None
    if config.linear.init_from_probe:  # (its class count is checked up front, in run)
        init = {"dense": pretrained.params["probe"]["dense"]}
    eval_feats, eval_labels = features_lib.extract_encoder_features(
        pretrained, config, config.data.eval_split, mesh, conv=conv
    )
    if config.linear.mode == "cached":
        feats, labels = train_feats(pretrained)
        params = train_linear_on_features(
            feats, labels, num_classes, config.linear, seed=seed, init_params=init
        )
    else:
        state = train_linear_reference(
            pretrained, config, num_classes, mesh, init_params=init, conv=conv
        )
        params = {"dense": jax.device_get(state.params)["classifier"]["dense"]}
    return classify(params, eval_feats, num_classes), eval_labels


def run(config: mlc.ConfigDict, workdir: str, *, conv: models.ModuleDef = nn.Conv) -> dict:
    """Linear evaluation of config.init_from; writes workdir/results.json.

    Args:
      config: configs/linear_eval.py.
      workdir: output directory.
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      The results dict (provenance, 'summary' with top1/top5/per_class/confusion,
      'top1', 'top5', and 'random_init' when compared).
    """
    _check_linear_config(config.linear)
    inputs = inputs_lib.open_inputs(
        config, batch_fields=("linear.batch_size",) if config.linear.mode == "reference" else ()
    )
    pretrained, mesh, class_names = inputs.pretrained, inputs.mesh, inputs.class_names
    num_classes = inputs.num_classes
    if config.linear.init_from_probe:
        _check_probe_classes(pretrained, num_classes)
    if config.linear.mode == "reference":  # ('cached' clips its batch to the data)
        config_checks.check_batch_fits(
            config.linear.batch_size, inputs.train_split, "linear.batch_size"
        )

    def train_feats(p):
        return features_lib.extract_encoder_features(
            p, config, config.data.train_split, mesh, conv=conv
        )

    t0 = time.time()
    logits, eval_labels = _linear_once(
        pretrained, config, mesh, num_classes, train_feats, config.seed, conv
    )
    results = pretrained_lib.provenance("linear_eval", config, pretrained)
    results["mode"] = config.linear.mode
    results["summary"] = reports.summarize(logits, eval_labels, class_names)
    results["top1"], results["top5"] = results["summary"]["top1"], results["summary"]["top5"]
    if config.eval.compare_random_init:
        baseline = pretrained_lib.random_init_like(pretrained, config.seed)
        base_logits, _ = _linear_once(
            baseline, config, mesh, num_classes, train_feats, config.seed, conv
        )
        results["random_init"] = {
            "top1": reports.topk_accuracy(base_logits, eval_labels, 1),
            "top5": reports.topk_accuracy(base_logits, eval_labels, 5),
        }
    results["seconds"] = time.time() - t0
    reports.write_results(workdir, results, step=pretrained.step)
    print(f"linear eval ({config.linear.mode}): top-1 {results['top1']:.4f}; results in {workdir}")
    return results
