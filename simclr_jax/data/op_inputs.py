"""The seed and image inputs of the augmentation ops: conversions, checks, sub-seeds.

Shared by augment.py and color.py. Argument values are Python values, checked
once at trace time; tensors are checked for dtype and shape.
"""

import tensorflow as tf

from simclr_jax.data.checks import check_prob


def as_seed(seed):
    """Returns `seed` as an int64 [2] tensor (int32 and int64 seeds agree)."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"seed has dtype {seed.dtype.name}: expected int32 or int64")
    if not seed.shape.is_compatible_with([2]):
        raise ValueError(f"seed has shape {seed.shape}: expected [2]")
    return tf.cast(tf.ensure_shape(seed, [2]), tf.int64)


def sub_seeds(seed, num):
    """Splits a seed (int32/int64 [2]) into `num` independent int64 [2] seeds."""
    return tf.unstack(tf.random.experimental.stateless_split(as_seed(seed), num=num))


def as_float_image(image):
    """Converts to float32 in [0, 1] and checks the [H, W, 3] layout."""
    image = tf.convert_to_tensor(image)
    if not image.shape.is_compatible_with([None, None, 3]):
        raise ValueError(f"image has shape {image.shape}: expected [height, width, 3]")
    if image.dtype != tf.float32:
        image = tf.image.convert_image_dtype(image, tf.float32)
    return image


def clip(image):
    """Clips to [0, 1]."""
    return tf.clip_by_value(image, 0.0, 1.0)


def sample_decision(seed, prob):
    """Returns a scalar bool tensor that is True with probability `prob`.

    Args:
      seed: int32/int64 tensor of shape [2].
      prob: probability in [0, 1]; 0 is never and 1 is always true.

    Returns:
      A scalar tf.bool tensor.
    """
    check_prob("prob", prob)
    return tf.random.stateless_uniform([], seed=as_seed(seed)) < prob
