"""SimCLR image augmentations as stateless TensorFlow ops, for use in tf.data.

Every op takes one image, float32 [H, W, 3] in [0, 1] (uint8 is converted with
tf.image.convert_image_dtype), and returns float32 in [0, 1]. Random ops take a
`seed`: an integer tensor of shape [2], as used by tf.random.stateless_*. The same
seed gives the same output eagerly and inside tf.data's `.map` (graph mode), so a
pipeline that derives seeds from the element index is reproducible and resumable.
Sub-seeds are derived with tf.random.experimental.stateless_split, never by
adding constants, so the streams of different ops stay independent.
The composite views built from these ops (pretrain_view, finetune_view,
eval_view) and the augmentation config are in views.py.

The ops follow google-research/simclr (tf2/data_util.py); where it has quirks we
keep them, so that published numbers stay comparable:

- Random resized crop uses TensorFlow's own box sampler (the stateless twin of
  the one the reference calls), with the reference's min_object_covered=0.1
  against the whole image. Consequences: the aspect ratio is uniform (not
  log-uniform) in aspect_range, the crop *height* is uniform between its
  smallest and largest allowed value (so the area is not uniform), and the area
  fraction is effectively at least max(area_range[0], 0.1). After max_attempts
  failed draws the whole image is used.
- Gaussian blur pads with zeros ('SAME' convolution), which darkens a border of
  kernel_size // 2 pixels, and uses kernel_size // 2 as its radius.
- Colour jitter (color.py) clips to [0, 1] after each of its four ops.

Solarisation (random_solarize, from BYOL, not in SimCLR) inverts the pixels at
or above SOLARIZE_THRESHOLD = 0.5, BYOL's official form on [0, 1] floats; see
solarize for how this compares with the 128 of PIL-based code.

One difference by design: blur runs here, per image on the host, while the
reference applies it batch-wise on the accelerator (benchmarks/input_pipeline.py
measures its host cost).
"""

import tensorflow as tf

from simclr_jax.data.checks import check_int, check_number, check_pair
from simclr_jax.data.color import (
    BRIGHTNESS_MODES,
    JITTER_OPS,
    MAX_JITTER_MAGNITUDES,
    MAX_JITTER_STRENGTH,
    adjust_brightness,
    check_brightness_mode,
    color_jitter,
    jitter_magnitudes,
    random_color_jitter,
    random_grayscale,
    sample_color_jitter_params,
    to_grayscale,
)
from simclr_jax.data.op_inputs import as_float_image, as_seed, clip, sample_decision, sub_seeds

# The colour ops live in color.py, the seed and image inputs in op_inputs.py; this
# module is the one namespace of every op (views.py and the tests use augment.<op>).
__all__ = [
    "BRIGHTNESS_MODES",
    "CENTER_CROP_SKIP_MAX_SIZE",
    "JITTER_OPS",
    "MAX_JITTER_MAGNITUDES",
    "MAX_JITTER_STRENGTH",
    "REFERENCE_MIN_OBJECT_COVERED",
    "SOLARIZE_THRESHOLD",
    "adjust_brightness",
    "center_crop",
    "check_brightness_mode",
    "color_jitter",
    "gaussian_blur",
    "jitter_magnitudes",
    "random_blur",
    "random_color_jitter",
    "random_flip",
    "random_grayscale",
    "random_resized_crop",
    "random_solarize",
    "sample_color_jitter_params",
    "sample_crop_box",
    "sample_decision",
    "solarize",
    "sub_seeds",
    "to_grayscale",
]

# The reference passes min_object_covered=0.1 with the whole image as the object,
# which makes 0.1 the effective lower bound of the crop area fraction.
REFERENCE_MIN_OBJECT_COVERED = 0.1
# The centre crop is skipped for images this small that already have the output
# size, as the reference does for CIFAR (it disables test_crop at <= 32 px).
CENTER_CROP_SKIP_MAX_SIZE = 32
# BYOL (Grill et al. 2020, appendix B; its official code's solarize): x -> x if x < 0.5 else 1 - x.
SOLARIZE_THRESHOLD = 0.5


# ----------------------------------------------------------------------------
# Sampled parameters (public so tests can check their statistics; the ops below
# use exactly these helpers; sample_decision is in op_inputs.py, the colour-jitter
# parameters in color.py).


def sample_crop_box(
    image_shape,
    seed,
    *,
    area_range=(0.08, 1.0),
    aspect_range=(3 / 4, 4 / 3),
    max_attempts=100,
):
    """Samples the random-resized-crop box the way the reference does.

    Args:
      image_shape: int tensor [3] (height, width, channels), e.g. tf.shape(image).
      seed: int32/int64 tensor of shape [2].
      area_range: (low, high) crop area as a fraction of the image, in (0, 1].
      aspect_range: (low, high) crop width / height, positive; sampled uniformly.
      max_attempts: draws before falling back to the whole image.

    Returns:
      An int32 tensor [4]: (offset_y, offset_x, height, width).
    """
    check_pair("area_range", area_range, 0.0, 1.0)
    check_pair("aspect_range", aspect_range, 0.0, float("inf"))
    check_int("max_attempts", max_attempts, 1)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.cast(image_shape, tf.int32),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=as_seed(seed),
        min_object_covered=REFERENCE_MIN_OBJECT_COVERED,
        aspect_ratio_range=tuple(float(a) for a in aspect_range),
        area_range=tuple(float(a) for a in area_range),
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


# ----------------------------------------------------------------------------
# Ops.


def random_resized_crop(
    image,
    seed,
    *,
    size,
    area_range=(0.08, 1.0),
    aspect_range=(3 / 4, 4 / 3),
    max_attempts=100,
):
    """Crops a random box (see sample_crop_box) and resizes it bicubically.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      size: output height and width in pixels.
      area_range: (low, high) crop area fraction; see sample_crop_box.
      aspect_range: (low, high) crop width / height.
      max_attempts: draws before falling back to the whole image.

    Returns:
      float32 [size, size, 3] in [0, 1] (clipped: bicubic overshoots).
    """
    check_int("size", size, 1)
    image = as_float_image(image)
    box = sample_crop_box(
        tf.shape(image),
        seed,
        area_range=area_range,
        aspect_range=aspect_range,
        max_attempts=max_attempts,
    )
    crop = tf.slice(image, [box[0], box[1], 0], [box[2], box[3], 3])
    out = tf.image.resize(crop, [size, size], method=tf.image.ResizeMethod.BICUBIC)
    return tf.ensure_shape(clip(out), [size, size, 3])


def random_flip(image, seed, *, prob=0.5):
    """Flips left-right with probability `prob`.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      prob: flip probability in [0, 1].

    Returns:
      float32 image of the input's shape.
    """
    image = as_float_image(image)
    return tf.cond(
        sample_decision(seed, prob), lambda: tf.image.flip_left_right(image), lambda: image
    )


def gaussian_blur(image, seed, *, sigma_range=(0.1, 2.0), kernel_size=None):
    """Separable Gaussian blur with sigma drawn uniformly from `sigma_range`.

    As in the reference, the radius is kernel_size // 2 (so the filter has
    2 * (kernel_size // 2) + 1 taps, even sizes round up) and the convolution
    is 'SAME' with zero padding.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      sigma_range: (low, high), both > 0; equal ends give a fixed sigma.
      kernel_size: filter size; None means image height // 10 (the reference).

    Returns:
      float32 image in [0, 1] of the input's shape.
    """
    check_pair("sigma_range", sigma_range, 0.0, float("inf"))
    if kernel_size is not None:
        check_int("kernel_size", kernel_size, 0)
    image = as_float_image(image)
    if kernel_size is None:
        height = image.shape[0]
        kernel_size = height // 10 if height is not None else tf.shape(image)[0] // 10
    radius = kernel_size // 2
    sigma = tf.random.stateless_uniform(
        [], seed=as_seed(seed), minval=sigma_range[0], maxval=sigma_range[1]
    )
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    taps = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    taps /= tf.reduce_sum(taps)
    # depthwise_conv2d filters are [rows, cols, in_channels, multiplier].
    horizontal = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, 3, 1])
    vertical = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, 3, 1])
    out = tf.nn.depthwise_conv2d(image[None], horizontal, [1, 1, 1, 1], "SAME")
    out = tf.nn.depthwise_conv2d(out, vertical, [1, 1, 1, 1], "SAME")[0]
    return clip(tf.ensure_shape(out, image.shape))


def random_blur(image, seed, *, prob=0.5, sigma_range=(0.1, 2.0), kernel_size=None):
    """Applies gaussian_blur with probability `prob`.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      prob: probability in [0, 1] of blurring.
      sigma_range: see gaussian_blur.
      kernel_size: see gaussian_blur.

    Returns:
      float32 image in [0, 1] of the input's shape.
    """
    decide_seed, blur_seed = sub_seeds(seed, 2)
    image = as_float_image(image)
    return tf.cond(
        sample_decision(decide_seed, prob),
        lambda: gaussian_blur(image, blur_seed, sigma_range=sigma_range, kernel_size=kernel_size),
        lambda: image,
    )


def solarize(image, *, threshold=SOLARIZE_THRESHOLD):
    """Inverts the pixels at or above `threshold`: x -> x if x < threshold else 1 - x.

    The form of BYOL's official code (Grill et al. 2020, appendix B, "solarization"),
    on float images in [0, 1] with threshold 0.5. PIL-based code (solo-learn,
    lightly: ImageOps.solarize) inverts uint8 pixels >= 128; on images that are
    still on the uint8 grid the two agree exactly (127/255 < 0.5 <= 128/255).
    Here the image is float after jitter and blur, so BYOL's 0.5 is the one that
    carries over.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      threshold: number in [0, 1]; 0 inverts every pixel, 1 only those equal to 1.

    Returns:
      float32 image in [0, 1] of the input's shape.
    """
    check_number("threshold", threshold, 0.0, 1.0)
    image = as_float_image(image)
    return tf.where(image < threshold, image, 1.0 - image)


def random_solarize(image, seed, *, prob=0.2, threshold=SOLARIZE_THRESHOLD):
    """Applies solarize to the whole image with probability `prob` (BYOL: 0.0 / 0.2).

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      prob: probability in [0, 1].
      threshold: see solarize.

    Returns:
      float32 image in [0, 1] of the input's shape.
    """
    check_number("threshold", threshold, 0.0, 1.0)
    image = as_float_image(image)
    return tf.cond(
        sample_decision(seed, prob), lambda: solarize(image, threshold=threshold), lambda: image
    )


def center_crop(image, *, size, crop_fraction=0.875):
    """Evaluation crop: the central crop_fraction of the shorter side, resized.

    The crop is square with side rint(crop_fraction * min(H, W)) and offsets
    ((H - side) + 1) // 2, ((W - side) + 1) // 2, as in the reference; it is
    resized bicubically to [size, size] and clipped. When size <= 32 and the
    image is already size x size (CIFAR), the image is returned unchanged: the
    reference disables the test crop for such small images.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      size: output height and width.
      crop_fraction: fraction in (0, 1] of the shorter side to keep.

    Returns:
      float32 [size, size, 3] in [0, 1].
    """
    check_int("size", size, 1)
    check_number("crop_fraction", crop_fraction, 0.0, 1.0, lo_open=True)
    image = as_float_image(image)

    def crop_and_resize():
        shape = tf.shape(image)
        side = tf.cast(
            tf.math.rint(crop_fraction * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)),
            tf.int32,
        )
        side = tf.maximum(side, 1)
        top = (shape[0] - side + 1) // 2
        left = (shape[1] - side + 1) // 2
        crop = tf.slice(image, [top, left, 0], [side, side, 3])
        out = tf.image.resize(crop, [size, size], method=tf.image.ResizeMethod.BICUBIC)
        return clip(out)

    static_hw = image.shape[:2]
    if size > CENTER_CROP_SKIP_MAX_SIZE:
        out = crop_and_resize()
    elif static_hw.is_fully_defined():
        out = clip(image) if tuple(static_hw) == (size, size) else crop_and_resize()
    else:
        already_sized = tf.reduce_all(tf.shape(image)[:2] == size)
        out = tf.cond(
            already_sized, lambda: tf.reshape(clip(image), [size, size, 3]), crop_and_resize
        )
    return tf.ensure_shape(out, [size, size, 3])
