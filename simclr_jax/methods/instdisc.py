"""InstDisc, instance discrimination with a memory bank (Wu, Xiong, Yu, Lin 2018,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination", arXiv 1805.01978)
on the train step.

Model: encoder -> one Linear layer to 128 (the paper's and lemniscate.pytorch's low-dim
embedding; heads.MLPHead with num_layers=1), and the online probe on stop_gradient(h).

Memory bank: one unit vector per training example (methods.memory_bank: [N, d] float32,
replicated), row i for the example at position i of the training split (the pipeline's
batch['index'], attached before any shuffling). After each step the rows of the global batch's
examples become normalise(m * old + (1 - m) * new), m = 0.5.

Loss: memory_losses.instdisc_loss, the non-parametric softmax over the WHOLE bank (exact; the
paper approximates it with NCE on ImageNet), tau 0.07 (ImageNet) / 0.1 (the official CIFAR
code). TWO views per step, not the paper's one: the trainer augments every image twice for
every method, so each view is scored against the bank as a separate sample of the paper's
loss (the loss is the mean over the 2n rows) and the bank's new vector for an example is
normalise(v1 + v2), the mean direction of its two views' unit embeddings. The two views are
not compared with each other. The paper's proximal regulariser is not in its public code and
not here.

Config fields read (config.method): name ('instdisc'), temperature (> 0), bank_momentum (in
[0, 1]), projector_dim (> 0). The bank's size is the training split's (train.py passes it).

Checkpoint tree: a MemoryBankTrainState: params {'encoder', 'projector', 'probe'},
batch_stats {'encoder'}, opt_state, bank [N, projector_dim].
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from simclr_jax import config_checks, memory_losses, models, train_state
from simclr_jax.losses import l2_normalize
from simclr_jax.methods import diagnostics, memory_bank
from simclr_jax.methods.heads import ProjectorModel, build_projector_model

NAME = "instdisc"
TITLE = "InstDisc"  # in progress lines and tables
# fold_in of the state's PRNG key that draws the initial bank (the parameters use the key).
BANK_RNG_FOLD = 1


def build_model(
    config: mlc.ConfigDict,
    *,
    num_classes: int,
    bn_axis_name: str | None = None,
    conv: models.ModuleDef = nn.Conv,
) -> ProjectorModel:
    """config.model's encoder, a Linear layer to config.method.projector_dim, the probe."""
    return build_projector_model(
        config, num_classes=num_classes, bn_axis_name=bn_axis_name, conv=conv, num_layers=1
    )


@dataclasses.dataclass(frozen=True)
class InstDisc:
    """InstDisc's part of the train step.

    Attributes:
      temperature: tau of the non-parametric softmax.
      bank_momentum: m of the bank update (the stored row's weight).
      num_examples: N, the bank's rows (the training split's size).
    """

    temperature: float
    bank_momentum: float
    num_examples: int
    name: str = NAME
    supports_micro_batching: bool = False

    def create_state(
        self, model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
    ) -> train_state.MemoryBankTrainState:
        """The plain state and a bank of random unit vectors, one per training example.

        Raises:
          ValueError: num_examples < 1 (the step object was built without the split's size).
        """
        if self.num_examples < 1:
            raise ValueError(
                f"InstDisc's memory bank needs the training split's size: build the step object "
                f"with methods.from_config(config, total_steps=..., num_examples=<split size>) "
                f"(got num_examples={self.num_examples})."
            )
        base = train_state.create_train_state(model, tx, rng, image_shape)
        bank = memory_bank.init(
            jax.random.fold_in(rng, BANK_RNG_FOLD), self.num_examples, model.projector.out_dim
        )
        return train_state.extend(base, train_state.MemoryBankTrainState, bank=bank)

    def targets(self, model, state, images, *, axis_name, freeze_bn, index=None):
        """({'bank': the bank [N, d] without gradient, 'index': the batch's examples [n]},
        None).

        Raises:
          ValueError: no index (a batch without 'index': the pipeline supplies one).
        """
        del model, images, axis_name, freeze_bn
        if index is None:
            raise ValueError(
                "InstDisc needs batch['index'], each example's position in the training split "
                "(data.pipeline's training batches carry it)."
            )
        return {"bank": jax.lax.stop_gradient(state.bank), "index": index}, None

    def objective(self, outputs: dict, targets: dict, *, n: int, axis_name: str | None):
        """(loss, loss, aux): memory_losses.instdisc_loss of both views' z [2n, d].

        aux: the diagnostics (view 1 retrieving its own view 2 among the global batch's, at
        the loss's temperature) and, as 'step_outputs', normalise(v1) + normalise(v2) [n, d]
        without gradient, the bank's new direction for each example.
        """
        z = outputs["z"]
        index = targets["index"]
        loss, _ = memory_losses.instdisc_loss(
            z, jnp.concatenate([index, index]), targets["bank"], self.temperature, axis_name
        )
        aux = diagnostics.view_retrieval(z[:n], z[n:], axis_name, self.temperature)
        unit = l2_normalize(jax.lax.stop_gradient(z))
        aux["step_outputs"] = unit[:n] + unit[n:]
        return loss, loss, aux

    def embedding_loss(self, z1, z2, axis_name):
        raise NotImplementedError("InstDisc does not support micro-batching (docs/methods.md).")

    def after_step(
        self, new_state, *, step, target_batch_stats, targets=None, outputs=None, axis_name=None
    ):
        """The bank rows of the global batch's examples moved towards their new embeddings.

        Args:
          new_state: the MemoryBankTrainState after the optimizer step.
          step, target_batch_stats: unused (no target network).
          targets: what `targets` returned (its 'index' names the rows).
          outputs: this device's [n, d] new directions (objective's 'step_outputs').
          axis_name: the device axis they are gathered over, or None.
        """
        del step, target_batch_stats
        bank = memory_bank.update(
            new_state.bank, targets["index"], outputs, self.bank_momentum, axis_name
        )
        return new_state.replace(bank=bank)


def from_config(config: mlc.ConfigDict, *, total_steps: int, num_examples: int = 0) -> InstDisc:
    """InstDisc with config.method.temperature and bank_momentum, a bank of num_examples rows.

    num_examples must be the size of the split the pipeline's batch['index'] counts in (train.py
    passes PipelineInfo.num_examples; pretraining reads the whole split, so the two agree).
    """
    del total_steps
    return InstDisc(
        temperature=config.method.temperature,
        bank_momentum=config.method.bank_momentum,
        num_examples=num_examples,
    )


def check_config(config: mlc.ConfigDict) -> None:
    """Raises ConfigError for a temperature <= 0, a bank momentum outside [0, 1] or a
    projector_dim <= 0."""
    config_checks.require_positive(config, "method.temperature")
    config_checks.require_positive(config, "method.projector_dim")
    m = config.method.bank_momentum
    if isinstance(m, bool) or not isinstance(m, int | float) or not 0.0 <= m <= 1.0:
        config_checks.fail("method.bank_momentum", m, "the bank's momentum must lie in [0, 1].")
