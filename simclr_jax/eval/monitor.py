"""The pretraining run's evaluator: kNN on the encoder's h and the online probe's accuracy.

`make_evaluator` builds it once per run; the kNN monitor during training (`run_monitor`,
eval.every_epochs) and the evaluation at the end (`evaluate_pretrained`) share it, so it
compiles once. Features come from the one extraction path (simclr_jax.eval.features) and the
one kNN (simclr_jax.eval.knn) that the standalone protocols use.
"""

import json
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np

from simclr_jax import labels as labels_lib
from simclr_jax import methods, models, sharding
from simclr_jax.eval import features, knn, reports
from simclr_jax.metrics import MetricLogger

# (params, batch_stats, prefix='') -> {'<prefix>knn_top1', ...}; see make_evaluator.
Evaluator = Callable[..., dict]


def make_evaluator(
    config: mlc.ConfigDict,
    *,
    mesh: jax.sharding.Mesh,
    num_classes: int,
    conv: models.ModuleDef = nn.Conv,
) -> Evaluator:
    """The run's evaluator: (params, batch_stats, prefix='') -> kNN and probe accuracies.

    kNN (config.eval.knn_k, knn_temperature) with the train split's features as
    the memory and the eval split's as queries, and the online probe's top-1/5
    on the eval split; features of the encoder in inference mode (BN running
    statistics), extracted over every host's devices; the kNN memory is
    sharded over the mesh (knn.knn_scores). The train split gives h only.

    Args:
      config: the pretraining config (model, data, augment, eval).
      mesh: the device mesh the features are extracted on.
      num_classes: classes of the dataset (the probe's outputs).
      conv: the encoder's convolution class.

    Returns:
      evaluate(params, batch_stats, prefix='') -> {'<prefix>knn_top1',
      '<prefix>knn_top5'} and, without a prefix, also 'probe_top1', 'probe_top5',
      'eval_examples' (the eval split's labelled examples) and
      'knn_memory_examples' (the train split's labelled examples, the kNN memory).
      Accuracies are fractions of the eval split's labelled examples, each
      scored once; examples labelled outside [0, num_classes) (simclr_jax.labels)
      are neither scored nor in the memory.
    """
    # Inference only: BN uses running statistics, no axis name is needed.
    model = methods.build_model(config, num_classes=num_classes, bn_axis_name=None, conv=conv)
    replicated = sharding.replicated_sharding(mesh)

    # Variables are an argument, not a closure: closed-over arrays would be
    # baked into the executable as constants. The memory (train) split needs
    # only h; the probe's logits are for the eval split alone.
    @jax.jit
    def apply_h(variables, images):
        return {"h": model.apply(variables, images, train=False)["h"]}

    @jax.jit
    def apply_h_and_probe(variables, images):
        out = model.apply(variables, images, train=False)
        return {"h": out["h"], "probe_logits": out["probe_logits"]}

    def split_features(apply, variables, split):
        return features.extract_features(
            lambda images: apply(variables, images), features.eval_batches(config, split), mesh
        )

    def knn_and_probe(params, batch_stats, prefix=""):
        variables = jax.device_put({"params": params, "batch_stats": batch_stats}, replicated)
        train_out, train_labels = split_features(apply_h, variables, config.data.train_split)
        eval_out, eval_labels = split_features(apply_h_and_probe, variables, config.data.eval_split)
        # Only labelled eval rows are scored; knn_scores drops unlabelled memory rows.
        eval_labels, eval_h, probe = labels_lib.keep_labelled(
            eval_labels, num_classes, eval_out["h"], eval_out["probe_logits"]
        )
        scores = knn.knn_scores(
            train_out["h"],
            train_labels,
            eval_h,
            num_classes=num_classes,
            k=config.eval.knn_k,
            temperature=config.eval.knn_temperature,
            mesh=mesh,
        )
        out = {
            f"{prefix}knn_top1": reports.topk_accuracy(scores, eval_labels, 1),
            f"{prefix}knn_top5": reports.topk_accuracy(scores, eval_labels, 5),
        }
        if not prefix:
            out["probe_top1"] = reports.topk_accuracy(probe, eval_labels, 1)
            out["probe_top5"] = reports.topk_accuracy(probe, eval_labels, 5)
            out["eval_examples"] = int(len(eval_labels))
            out["knn_memory_examples"] = int(
                np.sum(labels_lib.is_labelled(train_labels, num_classes))
            )
        return out

    return knn_and_probe


def run_monitor(evaluator: Evaluator, state, step: int, logger: MetricLogger) -> None:
    """The kNN monitor during training: kNN and probe on the eval split, logged at `step`.

    Args:
      evaluator: from make_evaluator.
      state: the train state (not pmap-replicated).
      step: the training step the scalars are logged at ('eval/knn_top1', ...).
      logger: the run's MetricLogger (TensorBoard and metrics.jsonl).
    """
    t0 = time.time()
    results = evaluator(state.params, state.batch_stats)
    keys = ("knn_top1", "knn_top5", "probe_top1", "probe_top5")
    scalars = {f"eval/{k}": results[k] for k in keys}
    logger.write_scalars(step, scalars)
    print(
        f"[step {step}] kNN monitor ({time.time() - t0:.1f}s): "
        + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()),
        flush=True,
    )


def evaluate_pretrained(
    config: mlc.ConfigDict, state, evaluator: Evaluator, initial_state: Callable
) -> dict:
    """kNN (train split as memory, eval split as queries) and the probe's top-1.

    With config.eval.compare_random_init, the same kNN protocol also runs on
    the randomly initialised encoder this run started from (step 0), so the
    gain from pretraining is visible in one results file.

    Args:
      config: the run's config.
      state: the train state (not pmap-replicated).
      evaluator: from make_evaluator.
      initial_state: () -> the run's step-0 state; called only with compare_random_init.

    Returns:
      {'knn_top1', 'knn_top5', 'probe_top1', 'probe_top5', 'eval_examples',
      'knn_memory_examples'} and, with the baseline, 'random_init_knn_top1/5'.
    """
    t0 = time.time()
    results = evaluator(state.params, state.batch_stats, "")
    if config.eval.get("compare_random_init", False):
        initial = initial_state()
        results.update(evaluator(initial.params, initial.batch_stats, "random_init_"))
    print(
        f"evaluated in {time.time() - t0:.1f}s: "
        + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})
    )
    return results
