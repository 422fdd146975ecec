"""The SimCLR views composed from the augmentation ops, and the augmentation config.

pretrain_view (the two views of pretraining), finetune_view (crop + flip, for
linear evaluation and fine-tuning) and eval_view (centre crop) read the
`augment` section of a config: default_augment_config gives the reference
settings, validate_augment_config checks every field. The ops themselves are in
augment.py.
"""

import ml_collections as mlc
import tensorflow as tf

from simclr_jax.config_checks import ConfigError
from simclr_jax.data import augment
from simclr_jax.data.checks import check_int, check_number, check_pair, check_prob

# Pretrain-view sub-seed slots; fixed so that, e.g., turning blur off does not
# change the crops.
_CROP, _FLIP, _JITTER, _GRAY, _BLUR = range(5)

AUGMENT_FIELDS = (
    "image_size",
    "crop_area_range",
    "crop_aspect_range",
    "crop_max_attempts",
    "flip_prob",
    "jitter_strength",
    "jitter_prob",
    "brightness_mode",
    "grayscale_prob",
    "blur_prob",
    "blur_sigma_range",
    "eval_crop_fraction",
)


def default_augment_config(image_size, *, jitter_strength, blur_prob):
    """Returns the reference augmentation settings for one image size.

    Args:
      image_size: output height and width (32 CIFAR, 224 ImageNet).
      jitter_strength: colour-jitter strength (0.5 CIFAR, 1.0 ImageNet).
      blur_prob: blur probability (0.0 CIFAR, 0.5 ImageNet).

    Returns:
      An ml_collections.ConfigDict with exactly the fields in AUGMENT_FIELDS.
    """
    cfg = mlc.ConfigDict(
        {
            "image_size": image_size,
            "crop_area_range": (0.08, 1.0),
            "crop_aspect_range": (3 / 4, 4 / 3),
            "crop_max_attempts": 100,
            "flip_prob": 0.5,
            "jitter_strength": jitter_strength,
            "jitter_prob": 0.8,
            "brightness_mode": "multiplicative",
            "grayscale_prob": 0.2,
            "blur_prob": blur_prob,
            "blur_sigma_range": (0.1, 2.0),
            "eval_crop_fraction": 0.875,
        }
    )
    validate_augment_config(cfg)
    return cfg


def validate_augment_config(cfg):
    """Raises ValueError naming the field, its value and what is allowed.

    Args:
      cfg: a ConfigDict (or any object with the AUGMENT_FIELDS attributes). For
        mappings and ConfigDicts, unknown fields are rejected too, so a typo
        cannot silently leave a default in place.
    """
    missing = [f for f in AUGMENT_FIELDS if not hasattr(cfg, f)]
    if missing:
        raise ConfigError(f"augment config is missing fields {missing}; required: {AUGMENT_FIELDS}")
    if hasattr(cfg, "keys"):
        unknown = sorted(set(cfg.keys()) - set(AUGMENT_FIELDS))
        if unknown:
            raise ConfigError(
                f"augment config has unknown fields {unknown}; allowed: {AUGMENT_FIELDS}"
            )
    field_checks = {
        "image_size": lambda n, v: check_int(n, v, 1),
        "crop_area_range": lambda n, v: check_pair(n, v, 0.0, 1.0),
        "crop_aspect_range": lambda n, v: check_pair(n, v, 0.0, float("inf")),
        "crop_max_attempts": lambda n, v: check_int(n, v, 1),
        "flip_prob": check_prob,
        "jitter_strength": lambda n, v: check_number(n, v, 0.0, augment.MAX_JITTER_STRENGTH),
        "jitter_prob": check_prob,
        "brightness_mode": lambda n, v: augment.check_brightness_mode(v),
        "grayscale_prob": check_prob,
        "blur_prob": check_prob,
        "blur_sigma_range": lambda n, v: check_pair(n, v, 0.0, float("inf")),
        "eval_crop_fraction": lambda n, v: check_number(n, v, 0.0, 1.0, lo_open=True),
    }
    for name, check in field_checks.items():
        try:
            check(name, getattr(cfg, name))
        except ValueError as e:
            raise ConfigError(f"config.augment.{e}") from None


def pretrain_view(image, seed, cfg):
    """One SimCLR pretraining view, in the reference order.

    crop -> flip -> colour jitter (p = jitter_prob) -> grayscale
    (p = grayscale_prob) -> blur (p = blur_prob, only when blur_prob > 0).
    The seed is split into five fixed slots, one per op.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8, any H and W.
      seed: int32/int64 tensor of shape [2]; use different seeds for the views.
      cfg: augmentation config (see default_augment_config).

    Returns:
      float32 [image_size, image_size, 3] in [0, 1].
    """
    validate_augment_config(cfg)
    seeds = augment.sub_seeds(seed, 5)
    size = cfg.image_size
    x = augment.random_resized_crop(
        image,
        seeds[_CROP],
        size=size,
        area_range=tuple(cfg.crop_area_range),
        aspect_range=tuple(cfg.crop_aspect_range),
        max_attempts=cfg.crop_max_attempts,
    )
    x = augment.random_flip(x, seeds[_FLIP], prob=cfg.flip_prob)
    x = augment.random_color_jitter(
        x,
        seeds[_JITTER],
        prob=cfg.jitter_prob,
        strength=cfg.jitter_strength,
        brightness_mode=cfg.brightness_mode,
    )
    x = augment.random_grayscale(x, seeds[_GRAY], prob=cfg.grayscale_prob)
    if cfg.blur_prob > 0:
        x = augment.random_blur(
            x,
            seeds[_BLUR],
            prob=cfg.blur_prob,
            sigma_range=tuple(cfg.blur_sigma_range),
            kernel_size=size // 10,
        )
    return tf.ensure_shape(x, [size, size, 3])


def finetune_view(image, seed, cfg):
    """Linear-eval / fine-tuning training view: random resized crop + flip.

    Uses the same seed slots as pretrain_view for the crop and the flip.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      seed: int32/int64 tensor of shape [2].
      cfg: augmentation config.

    Returns:
      float32 [image_size, image_size, 3] in [0, 1].
    """
    validate_augment_config(cfg)
    seeds = augment.sub_seeds(seed, 5)
    x = augment.random_resized_crop(
        image,
        seeds[_CROP],
        size=cfg.image_size,
        area_range=tuple(cfg.crop_area_range),
        aspect_range=tuple(cfg.crop_aspect_range),
        max_attempts=cfg.crop_max_attempts,
    )
    return augment.random_flip(x, seeds[_FLIP], prob=cfg.flip_prob)


def eval_view(image, cfg):
    """Evaluation view: center_crop to image_size with eval_crop_fraction.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8.
      cfg: augmentation config.

    Returns:
      float32 [image_size, image_size, 3] in [0, 1].
    """
    validate_augment_config(cfg)
    return augment.center_crop(image, size=cfg.image_size, crop_fraction=cfg.eval_crop_fraction)
