"""kNN evaluation: weighted kNN classification and the kNN protocol.

kNN follows the protocol of solo-learn and lightly (from InstDisc, Wu et al.
2018): cosine similarity between l2-normalised features, the k most similar
training examples vote for their class with weight exp(similarity / T). The
same `knn_scores` serves the trainer (the kNN monitor and the evaluation at
the end of pretraining) and the standalone protocol (config.protocol='knn',
`run`), which evaluates a restored checkpoint.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from simclr_jax import models
from simclr_jax.eval import features, reports
from simclr_jax.eval import inputs as inputs_lib
from simclr_jax.eval import pretrained as pretrained_lib
from simclr_jax.losses import l2_normalize


@jax.jit
def _knn_chunk_scores(train_feats, train_onehot, test_feats, temperature, k_arr):
    k = k_arr.shape[0]
    sims = test_feats @ train_feats.T  # [m, N]
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)  # [m, k]
    votes = train_onehot[top_idx]  # [m, k, classes]
    return jnp.einsum("mk,mkc->mc", weights, votes)


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 512,
) -> np.ndarray:
    """Class scores of weighted kNN for every test example.

    Args:
      train_features: [N, C] features of the labelled (memory) set.
      train_labels: [N] int labels in [0, num_classes).
      test_features: [M, C] features to classify.
      num_classes: number of classes.
      k: neighbours (clipped to N).
      temperature: weight = exp(cosine / temperature).
      chunk_size: test rows per device call (bounds memory to chunk x N).

    Returns:
      [M, num_classes] float32 scores; argmax is the prediction.
    """
    if k <= 0:
        raise ValueError(f"k={k} must be a positive number of neighbours")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    k = min(k, len(train_features))
    train = l2_normalize(train_features)
    onehot = jax.nn.one_hot(jnp.asarray(train_labels), num_classes, dtype=jnp.float32)
    test = l2_normalize(test_features)
    k_arr = jnp.zeros((k,))
    scores = []
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start : start + chunk_size]
        scores.append(
            np.asarray(_knn_chunk_scores(train, onehot, chunk, jnp.float32(temperature), k_arr))
        )
    return np.concatenate(scores) if scores else np.zeros((0, num_classes), np.float32)


def knn_logits(
    pretrained, config, mesh, num_classes, *, conv: models.ModuleDef = nn.Conv
) -> tuple[np.ndarray, np.ndarray]:
    """kNN class scores of the eval split with the train split as memory, and eval labels."""
    train_h, train_y = features.extract_encoder_features(
        pretrained, config, config.data.train_split, mesh, conv=conv
    )
    eval_h, eval_y = features.extract_encoder_features(
        pretrained, config, config.data.eval_split, mesh, conv=conv
    )
    scores = knn_scores(
        train_h,
        train_y,
        eval_h,
        num_classes=num_classes,
        k=config.eval.knn_k,
        temperature=config.eval.knn_temperature,
    )
    return scores, eval_y


def run(config: mlc.ConfigDict, workdir: str, *, conv: models.ModuleDef = nn.Conv) -> dict:
    """kNN evaluation of config.init_from; writes workdir/results.json.

    Args:
      config: configs/knn.py.
      workdir: output directory.
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass with its
        parameters, e.g. simclr_jax.cpu.conv_class's choice).

    Returns:
      The results dict (provenance, 'summary', 'top1', 'top5', 'k',
      'temperature', and 'random_init' when compared).
    """
    inputs = inputs_lib.open_inputs(config)
    pretrained, mesh, class_names = inputs.pretrained, inputs.mesh, inputs.class_names
    num_classes = inputs.num_classes
    scores, labels = knn_logits(pretrained, config, mesh, num_classes, conv=conv)
    results = pretrained_lib.provenance("knn", config, pretrained)
    results.update(k=int(config.eval.knn_k), temperature=float(config.eval.knn_temperature))
    results["summary"] = reports.summarize(scores, labels, class_names)
    results["top1"], results["top5"] = results["summary"]["top1"], results["summary"]["top5"]
    if config.eval.compare_random_init:
        baseline = pretrained_lib.random_init_like(pretrained, config.seed)
        base_scores, _ = knn_logits(baseline, config, mesh, num_classes, conv=conv)
        results["random_init"] = {
            "top1": reports.topk_accuracy(base_scores, labels, 1),
            "top5": reports.topk_accuracy(base_scores, labels, 5),
        }
    reports.write_results(workdir, results, step=pretrained.step)
    print(f"kNN (k={config.eval.knn_k}): top-1 {results['top1']:.4f}; results in {workdir}")
    return results
