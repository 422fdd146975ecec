"""The pretraining views composed from the augmentation ops, and the augmentation config.

pretrain_view (the two views of pretraining), finetune_view (crop + flip, for
linear evaluation and fine-tuning) and eval_view (centre crop) read the
`augment` section of a config: default_augment_config gives the reference
settings, validate_augment_config checks every field. The ops themselves are in
augment.py.

Per-view recipes. The shared fields describe both views (SimCLR's symmetric
recipe). The sections augment.view1 and augment.view2 hold, for each field of
VIEW_FIELDS, None (use the shared value) or that view's own value, so BYOL's
asymmetric recipe (Grill et al. 2020, appendix B, Table 6: blur p 1.0 / 0.1,
solarisation p 0.0 / 0.2) reads `augment.view1.blur_prob=1.0`,
`augment.view2.blur_prob=0.1`. view_recipe resolves one view's values. Crop,
image size and blur sigma range are shared: every recipe of the family uses the
same ones on both views. docs/augmentations_per_view.md has the design notes.
"""

import difflib

import ml_collections as mlc
import tensorflow as tf

from simclr_jax.config_checks import ConfigError
from simclr_jax.data import augment
from simclr_jax.data.checks import check_int, check_number, check_pair, check_prob

# Pretrain-view sub-seed slots; fixed so that, e.g., turning blur off does not
# change the crops. The seed is split six ways; the first five of a six-way
# stateless split are the five-way split the recipe used before solarisation was
# added (tests/augment_test.py composes the ops with a five-way split), so
# SimCLR's views are unchanged.
_CROP, _FLIP, _JITTER, _GRAY, _BLUR, _SOLARIZE = range(6)

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
# Fields added with per-view recipes, and the values that give the recipe as it was before
# them: a run's config.json written without them still loads (linear eval, embed).
# jitter_<op>: that op's magnitude (see augment.sample_color_jitter_params), None: derived
# from jitter_strength. view1 / view2: the per-view sections, None: no overrides.
ADDED_FIELDS = {
    "jitter_brightness": None,
    "jitter_contrast": None,
    "jitter_saturation": None,
    "jitter_hue": None,
    "solarize_prob": 0.0,
    "view1": None,
    "view2": None,
}
VIEWS = ("view1", "view2")
JITTER_MAGNITUDE_FIELDS = tuple(f"jitter_{op}" for op in augment.JITTER_OPS)
# The fields a view section may set, with their types (for typed None config fields).
VIEW_FIELDS = {
    "flip_prob": float,
    "jitter_prob": float,
    "jitter_strength": float,
    **{name: float for name in JITTER_MAGNITUDE_FIELDS},
    "brightness_mode": str,
    "grayscale_prob": float,
    "blur_prob": float,
    "solarize_prob": float,
}


def _magnitude_check(i):
    def check(name, value):
        if value is not None:
            check_number(name, value, 0.0, augment.MAX_JITTER_MAGNITUDES[i])

    return check


_FIELD_CHECKS = {
    "image_size": lambda n, v: check_int(n, v, 1),
    "crop_area_range": lambda n, v: check_pair(n, v, 0.0, 1.0),
    "crop_aspect_range": lambda n, v: check_pair(n, v, 0.0, float("inf")),
    "crop_max_attempts": lambda n, v: check_int(n, v, 1),
    "flip_prob": check_prob,
    "jitter_strength": lambda n, v: check_number(n, v, 0.0, augment.MAX_JITTER_STRENGTH),
    **{name: _magnitude_check(i) for i, name in enumerate(JITTER_MAGNITUDE_FIELDS)},
    "jitter_prob": check_prob,
    "brightness_mode": lambda n, v: augment.check_brightness_mode(v),
    "grayscale_prob": check_prob,
    "blur_prob": check_prob,
    "blur_sigma_range": lambda n, v: check_pair(n, v, 0.0, float("inf")),
    "solarize_prob": check_prob,
    "eval_crop_fraction": lambda n, v: check_number(n, v, 0.0, 1.0, lo_open=True),
}


def view_overrides_section() -> mlc.ConfigDict:
    """An empty per-view section: every VIEW_FIELDS field a typed None (use the shared value).

    Typed, so that `--config.augment.view2.blur_prob=0.1` works on a locked config
    (config_flags cannot override a plain None field).
    """
    return mlc.ConfigDict(
        {name: mlc.FieldReference(None, field_type=kind) for name, kind in VIEW_FIELDS.items()}
    )


def default_augment_config(image_size, *, jitter_strength, blur_prob):
    """Returns the reference augmentation settings for one image size.

    Args:
      image_size: output height and width (32 CIFAR, 224 ImageNet).
      jitter_strength: colour-jitter strength (0.5 CIFAR, 1.0 ImageNet).
      blur_prob: blur probability (0.0 CIFAR, 0.5 ImageNet).

    Returns:
      An ml_collections.ConfigDict with the fields in AUGMENT_FIELDS and
      ADDED_FIELDS; both views share one recipe (empty view sections).
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
    for name in JITTER_MAGNITUDE_FIELDS:
        cfg[name] = mlc.FieldReference(None, field_type=float)
    cfg.solarize_prob = 0.0
    cfg.view1 = view_overrides_section()
    cfg.view2 = view_overrides_section()
    validate_augment_config(cfg)
    return cfg


def _get(cfg, name):
    """A field of a ConfigDict, mapping or object; ADDED_FIELDS default when absent."""
    if hasattr(cfg, "keys"):
        return cfg[name] if name in cfg else ADDED_FIELDS[name]
    return getattr(cfg, name, ADDED_FIELDS.get(name))


def _unknown(fields, allowed, where):
    """ConfigError for unknown `fields`, naming each with the closest allowed name."""
    hints = []
    for name in fields:
        close = difflib.get_close_matches(name, allowed, n=1)
        hints.append(f"{where}{name}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"unknown fields {', '.join(hints)}; allowed: {tuple(allowed)}")


def validate_augment_config(cfg):
    """Raises ConfigError (a ValueError) naming the field, its value and what is allowed.

    Args:
      cfg: a ConfigDict (or any object with the AUGMENT_FIELDS attributes;
        ADDED_FIELDS may be absent). For mappings and ConfigDicts, unknown fields
        are rejected too, in the view sections as well, so a typo cannot
        silently leave a default in place.
    """
    missing = [f for f in AUGMENT_FIELDS if not hasattr(cfg, f)]
    if missing:
        raise ConfigError(f"augment config is missing fields {missing}; required: {AUGMENT_FIELDS}")
    if hasattr(cfg, "keys"):
        allowed = AUGMENT_FIELDS + tuple(ADDED_FIELDS)
        unknown = sorted(set(cfg.keys()) - set(allowed))
        if unknown:
            raise _unknown(unknown, allowed, "config.augment.")
    for name, check in _FIELD_CHECKS.items():
        try:
            check(name, _get(cfg, name))
        except ValueError as e:
            raise ConfigError(f"config.augment.{e}") from None
    for view in VIEWS:
        section = _get(cfg, view)
        if section is None:
            continue
        if not hasattr(section, "keys"):
            raise ConfigError(
                f"config.augment.{view}={section!r}: expected a section of per-view fields "
                f"{tuple(VIEW_FIELDS)} (None: use the shared values)"
            )
        unknown = sorted(set(section.keys()) - set(VIEW_FIELDS))
        if unknown:
            raise _unknown(unknown, tuple(VIEW_FIELDS), f"config.augment.{view}.")
        for name in VIEW_FIELDS:
            value = section.get(name)
            if value is not None:
                try:
                    _FIELD_CHECKS[name](f"{view}.{name}", value)
                except ValueError as e:
                    raise ConfigError(f"config.augment.{e}") from None


def view_recipe(cfg, view):
    """The resolved recipe of one pretraining view: shared fields with the view's overrides.

    Args:
      cfg: augmentation config (see default_augment_config); validated here.
      view: 1 or 2.

    Returns:
      A dict of every field of AUGMENT_FIELDS and VIEW_FIELDS with its value for
      this view (pairs as tuples), plus 'jitter_magnitudes': the (brightness, contrast, saturation,
      hue) magnitudes, each the view's jitter_<op>, else the shared one, else
      derived from the view's jitter_strength (augment.jitter_magnitudes).

    Raises:
      ConfigError: a bad field (see validate_augment_config).
      ValueError: view is not 1 or 2.
    """
    if view not in (1, 2):
        raise ValueError(f"view={view!r}: pretraining has views 1 and 2")
    validate_augment_config(cfg)
    recipe = {name: _get(cfg, name) for name in AUGMENT_FIELDS + tuple(VIEW_FIELDS)}
    for name in ("crop_area_range", "crop_aspect_range", "blur_sigma_range"):
        recipe[name] = tuple(recipe[name])  # a list after a JSON round trip
    section = _get(cfg, VIEWS[view - 1])
    for name in VIEW_FIELDS if section is not None else ():
        value = section.get(name)
        if value is not None:
            recipe[name] = value
    derived = augment.jitter_magnitudes(recipe["jitter_strength"])
    recipe["jitter_magnitudes"] = tuple(
        d if recipe[name] is None else recipe[name]
        for name, d in zip(JITTER_MAGNITUDE_FIELDS, derived, strict=True)
    )
    return recipe


def _symmetric_recipe(cfg):
    """The one recipe of both views; ConfigError when the views differ."""
    first, second = view_recipe(cfg, 1), view_recipe(cfg, 2)
    differ = sorted(k for k in first if first[k] != second[k])
    if differ:
        raise ConfigError(
            f"config.augment: the two views' recipes differ in {differ}; "
            "pretrain_view needs view=1 or view=2"
        )
    return first


def pretrain_view(image, seed, cfg, *, view=None):
    """One pretraining view, in the reference order (BYOL's adds solarisation last).

    crop -> flip -> colour jitter (p = jitter_prob) -> grayscale
    (p = grayscale_prob) -> blur (p = blur_prob, only when blur_prob > 0) ->
    solarisation (p = solarize_prob, only when solarize_prob > 0). The seed is
    split into six fixed slots, one per op.

    Args:
      image: [H, W, 3] float32 in [0, 1] or uint8, any H and W.
      seed: int32/int64 tensor of shape [2]; use different seeds for the views.
      cfg: augmentation config (see default_augment_config).
      view: 1 or 2: that view's recipe (view_recipe). None: the config's views
        must share one recipe (SimCLR), else ConfigError, so an asymmetric
        recipe cannot silently land on the wrong view.

    Returns:
      float32 [image_size, image_size, 3] in [0, 1].
    """
    r = _symmetric_recipe(cfg) if view is None else view_recipe(cfg, view)
    seeds = augment.sub_seeds(seed, 6)
    size = r["image_size"]
    x = augment.random_resized_crop(
        image,
        seeds[_CROP],
        size=size,
        area_range=tuple(r["crop_area_range"]),
        aspect_range=tuple(r["crop_aspect_range"]),
        max_attempts=r["crop_max_attempts"],
    )
    x = augment.random_flip(x, seeds[_FLIP], prob=r["flip_prob"])
    x = augment.random_color_jitter(
        x,
        seeds[_JITTER],
        prob=r["jitter_prob"],
        magnitudes=r["jitter_magnitudes"],
        brightness_mode=r["brightness_mode"],
    )
    x = augment.random_grayscale(x, seeds[_GRAY], prob=r["grayscale_prob"])
    if r["blur_prob"] > 0:
        x = augment.random_blur(
            x,
            seeds[_BLUR],
            prob=r["blur_prob"],
            sigma_range=tuple(r["blur_sigma_range"]),
            kernel_size=size // 10,
        )
    if r["solarize_prob"] > 0:
        x = augment.random_solarize(x, seeds[_SOLARIZE], prob=r["solarize_prob"])
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
