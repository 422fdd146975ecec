"""SimCLR heads: the projection head g, the linear probe, and the full pretraining model.

Following the reference code (google-research/simclr, tf2/model.py):
- ProjectionHead: num_layers dense layers without bias, each followed by BatchNorm. Hidden
  layers (as wide as h unless hidden_dim is set) have BN with beta and a ReLU; the last layer
  maps to out_dim with BN without beta and no ReLU. Dense kernels start as N(0, 0.01^2).
- The head also returns every intermediate output so fine-tuning can start from any of them
  (select_ft_features; SimCLRv2 fine-tunes from the first hidden layer of a 3-layer head).
- LinearHead: dense layer with bias, used as the online probe on stop_gradient(h) during
  pretraining and as the linear-evaluation classifier.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Reference: tf.keras.initializers.RandomNormal(stddev=0.01) for every head dense layer.
DENSE_INIT = nn.initializers.normal(stddev=0.01)


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{extra}, got {value!r}.")


def select_ft_features(hiddens: Sequence[jax.Array], ft_proj_selector: int) -> jax.Array:
    """Picks the projection-head layer that feeds fine-tuning.

    Args:
      hiddens: [h, out_layer1, ..., out_layerL] as returned by ProjectionHead.
      ft_proj_selector: 0 = h, k = output of the k-th head layer (after its ReLU for hidden
        layers), -1 = the last layer (z); Python-style negative indices in [-(L+1), -1].

    Returns:
      The selected [n, d] array.

    Raises:
      ValueError: if ft_proj_selector is not an int in [-(L+1), L].
    """
    num = len(hiddens)
    if (
        isinstance(ft_proj_selector, bool)
        or not isinstance(ft_proj_selector, int)
        or not -num <= ft_proj_selector < num
    ):
        raise ValueError(
            f"ft_proj_selector must be an int in [{-num}, {num - 1}] for a head with "
            f"{num - 1} layers (0 = h, -1 = last layer), got {ft_proj_selector!r}."
        )
    return hiddens[ft_proj_selector]


class ProjectionHead(nn.Module):
    """Nonlinear projection head g(h) -> z.

    Attributes:
      num_layers: number of dense layers (SimCLRv1: 2, SimCLRv2: 3).
      out_dim: width of z.
      hidden_dim: width of the hidden layers; None means the width of the input h.
      bn_axis_name: axis name for cross-device BatchNorm statistics; None = per-device.
      bn_momentum: BN running-average momentum.
      bn_epsilon: BN epsilon.
      dtype: computation dtype; parameters and BN statistics stay float32.
    """

    num_layers: int = 3
    out_dim: int = 128
    hidden_dim: int | None = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_positive_int("num_layers", self.num_layers)
        _check_positive_int("out_dim", self.out_dim)
        _check_positive_int("hidden_dim", self.hidden_dim, allow_none=True)
        super().__post_init__()

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> tuple[jax.Array, list[jax.Array]]:
        """Projects h.

        Args:
          h: representation [n, C].
          train: batch statistics (update with mutable=['batch_stats']) vs running ones.

        Returns:
          (z, hiddens): z float32 [n, out_dim]; hiddens = [h, out_1, ..., out_L] (float32,
          hidden outputs after their ReLU, out_L = z) for select_ft_features.
        """
        hidden_dim = self.hidden_dim or h.shape[-1]
        hiddens = [jnp.asarray(h, jnp.float32)]
        x = h
        for j in range(self.num_layers):
            last = j == self.num_layers - 1
            x = nn.Dense(
                self.out_dim if last else hidden_dim,
                use_bias=False,
                kernel_init=DENSE_INIT,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"dense_{j}",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                # Reference (center=use_bias): the output BN has gamma but no beta.
                use_bias=not last,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                axis_name=self.bn_axis_name,
                use_fast_variance=False,
                name=f"bn_{j}",
            )(x)
            if not last:
                x = nn.relu(x)
            hiddens.append(x.astype(jnp.float32))
        return hiddens[-1], hiddens


class LinearHead(nn.Module):
    """Linear classifier (dense with bias) giving float32 logits.

    Attributes:
      num_classes: number of output classes.
      dtype: computation dtype; the logits are returned in float32.
    """

    num_classes: int
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_positive_int("num_classes", self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns logits [n, num_classes] (float32) for features x [n, d]."""
        logits = nn.Dense(
            self.num_classes,
            kernel_init=DENSE_INIT,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="dense",
        )(x)
        return logits.astype(jnp.float32)


class SimCLRModel(nn.Module):
    """Encoder + projection head + online linear probe.

    The caller concatenates both augmented views into one batch so BatchNorm normalises them
    together (as in the reference).

    Attributes:
      encoder: module mapping (images, train) -> h [n, C].
      head: ProjectionHead.
      probe: LinearHead applied to stop_gradient(h), so the probe's labels never train the
        encoder or the head.
    """

    encoder: nn.Module
    head: nn.Module
    probe: nn.Module

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Runs the model.

        Args:
          images: [n, H, W, 3] (both views concatenated along the batch for pretraining).
          train: batch statistics (update with mutable=['batch_stats']) vs running ones.

        Returns:
          {'h': [n, C], 'z': [n, out_dim], 'probe_logits': [n, num_classes]}, all float32.
        """
        h = jnp.asarray(self.encoder(images, train=train), jnp.float32)
        z, _ = self.head(h, train=train)
        probe_logits = self.probe(jax.lax.stop_gradient(h))
        return {
            "h": h,
            "z": jnp.asarray(z, jnp.float32),
            "probe_logits": jnp.asarray(probe_logits, jnp.float32),
        }
