"""Colour ops of the augmentations: colour jitter and grayscale, stateless TensorFlow ops.

Conventions as in augment.py (which re-exports every name here, the one
namespace of the ops): float32 [H, W, 3] images in [0, 1], int [2] seeds. As in
the SimCLR reference (google-research/simclr, tf2/data_util.py), colour jitter
applies brightness, contrast, saturation and hue in a random order and clips to
[0, 1] after each. Its magnitudes come from one strength s (SimCLR: 0.8 s for
the first three, 0.2 s for hue) or are given per op (BYOL, Grill et al. 2020,
appendix B: 0.4, 0.4, 0.2, 0.1 with an additive brightness shift).
"""

import tensorflow as tf

from simclr_jax.data.checks import check_number
from simclr_jax.data.op_inputs import as_float_image, clip, sample_decision, sub_seeds

# Contrast and saturation factors are 1 +- 0.8 * strength and must stay >= 0.
MAX_JITTER_STRENGTH = 1.25
# Per-op jitter magnitudes (brightness, contrast, saturation, hue); a contrast or
# saturation factor 1 - m must stay >= 0, and a hue shift of 0.5 is half the circle.
MAX_JITTER_MAGNITUDES = (1.0, 1.0, 1.0, 0.5)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
BRIGHTNESS_MODES = ("multiplicative", "additive")


def check_brightness_mode(value):
    """Raises ValueError unless `value` is one of BRIGHTNESS_MODES."""
    if value not in BRIGHTNESS_MODES:
        raise ValueError(f"brightness_mode={value!r}: allowed values are {BRIGHTNESS_MODES}")


def jitter_magnitudes(strength):
    """SimCLR's (brightness, contrast, saturation, hue) magnitudes for a strength s in
    [0, 1.25]: (0.8 s, 0.8 s, 0.8 s, 0.2 s) as Python floats (Chen et al. 2020, appendix A)."""
    check_number("strength", strength, 0.0, MAX_JITTER_STRENGTH)
    s = 0.8 * strength
    return (s, s, s, 0.2 * strength)


def _resolve_magnitudes(strength, magnitudes):
    """Exactly one of strength / magnitudes -> the four magnitudes, checked."""
    if (strength is None) == (magnitudes is None):
        raise ValueError(f"strength={strength!r}, magnitudes={magnitudes!r}: give exactly one")
    if magnitudes is None:
        return jitter_magnitudes(strength)
    if not isinstance(magnitudes, tuple | list) or len(magnitudes) != 4:
        raise ValueError(f"magnitudes={magnitudes!r}: expected 4 numbers {JITTER_OPS}")
    for name, m, hi in zip(JITTER_OPS, magnitudes, MAX_JITTER_MAGNITUDES, strict=True):
        check_number(f"jitter_{name}", m, 0.0, hi)
    return tuple(magnitudes)


def sample_color_jitter_params(
    seed, *, strength=None, magnitudes=None, brightness_mode="multiplicative"
):
    """Samples the colour-jitter factors and the order of the four ops.

    Args:
      seed: int32/int64 tensor of shape [2].
      strength: jitter strength s in [0, 1.25]; brightness, contrast and
        saturation use the magnitude 0.8 s, hue 0.2 s (jitter_magnitudes).
      magnitudes: instead of strength, the four magnitudes (b, c, s, h) directly,
        as BYOL gives them (0.4, 0.4, 0.2, 0.1); each in [0, MAX_JITTER_MAGNITUDES].
      brightness_mode: 'multiplicative' (SimCLR v2: factor uniform in
        [max(0, 1 - b), 1 + b]) or 'additive' (SimCLR v1 and BYOL: delta uniform
        in [-b, b]).

    Returns:
      A dict of scalar float32 tensors 'brightness', 'contrast' (uniform in
      [1 - c, 1 + c]), 'saturation' (uniform in [1 - s, 1 + s]), 'hue' (uniform
      in [-h, h]) and an int32 tensor 'order' [4], a permutation of
      (brightness=0, contrast=1, saturation=2, hue=3) giving the order they are
      applied in.

    Raises:
      ValueError: both or neither of strength and magnitudes, or a value out of range.
    """
    b, c, sat, h = _resolve_magnitudes(strength, magnitudes)
    check_brightness_mode(brightness_mode)
    seeds = sub_seeds(seed, 5)

    def uniform(i, lo, hi):
        return tf.random.stateless_uniform([], seed=seeds[i], minval=lo, maxval=hi)

    if brightness_mode == "multiplicative":
        brightness = uniform(0, max(0.0, 1.0 - b), 1.0 + b)
    else:
        brightness = uniform(0, -b, b)
    return {
        "brightness": brightness,
        "contrast": uniform(1, 1.0 - c, 1.0 + c),
        "saturation": uniform(2, 1.0 - sat, 1.0 + sat),
        "hue": uniform(3, -h, h),
        # argsort of i.i.d. uniforms is a uniformly random permutation.
        "order": tf.argsort(tf.random.stateless_uniform([4], seed=seeds[4])),
    }


def adjust_brightness(image, value, *, mode="multiplicative"):
    """Scales (multiplicative) or shifts (additive) all pixels, then clips.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      value: scalar factor ('multiplicative') or delta ('additive').
      mode: one of BRIGHTNESS_MODES.

    Returns:
      float32 image in [0, 1].
    """
    check_brightness_mode(mode)
    image = as_float_image(image)
    out = image * value if mode == "multiplicative" else image + value
    return clip(out)


def color_jitter(image, seed, *, strength=None, magnitudes=None, brightness_mode="multiplicative"):
    """Brightness, contrast, saturation and hue jitter in a random order.

    Each of the four ops is always applied, with a factor drawn by
    sample_color_jitter_params, and the image is clipped to [0, 1] after each.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      strength: jitter strength s in [0, 1.25] (1.0 ImageNet, 0.5 CIFAR).
      magnitudes: instead of strength, the four magnitudes (brightness,
        contrast, saturation, hue); see sample_color_jitter_params.
      brightness_mode: 'multiplicative' (v2) or 'additive' (v1, BYOL).

    Returns:
      float32 image in [0, 1] of the input's shape.
    """
    params = sample_color_jitter_params(
        seed, strength=strength, magnitudes=magnitudes, brightness_mode=brightness_mode
    )
    image = as_float_image(image)
    if not any(_resolve_magnitudes(strength, magnitudes)):
        # All factors are neutral; skip the ops (and their rounding), as the reference does.
        return image

    def branches(x):
        return [
            lambda: adjust_brightness(x, params["brightness"], mode=brightness_mode),
            lambda: tf.image.adjust_contrast(x, params["contrast"]),
            lambda: tf.image.adjust_saturation(x, params["saturation"]),
            lambda: tf.image.adjust_hue(x, params["hue"]),
        ]

    for i in range(4):
        image = clip(tf.switch_case(params["order"][i], branches(image)))
    return image


def random_color_jitter(
    image, seed, *, prob=0.8, strength=None, magnitudes=None, brightness_mode="multiplicative"
):
    """Applies color_jitter with probability `prob`.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      prob: probability in [0, 1] of jittering.
      strength: jitter strength, see color_jitter.
      magnitudes: instead of strength, the four magnitudes, see color_jitter.
      brightness_mode: 'multiplicative' or 'additive', see color_jitter.

    Returns:
      float32 image in [0, 1] of the input's shape.
    """
    decide_seed, jitter_seed = sub_seeds(seed, 2)
    image = as_float_image(image)
    return tf.cond(
        sample_decision(decide_seed, prob),
        lambda: color_jitter(
            image,
            jitter_seed,
            strength=strength,
            magnitudes=magnitudes,
            brightness_mode=brightness_mode,
        ),
        lambda: image,
    )


def to_grayscale(image):
    """Converts to luma (ITU-R 601 weights) and keeps 3 identical channels.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.

    Returns:
      float32 [H, W, 3] image.
    """
    image = as_float_image(image)
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def random_grayscale(image, seed, *, prob=0.2):
    """Converts to grayscale (3 channels kept) with probability `prob`.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      prob: probability in [0, 1].

    Returns:
      float32 image of the input's shape.
    """
    image = as_float_image(image)
    return tf.cond(sample_decision(seed, prob), lambda: to_grayscale(image), lambda: image)
