"""Augmentation recipes of the contrastive family that method configs apply to config.augment.

  from configs import augment_recipes
  augment_recipes.byol_views(config)  # in a method config's get_config

Each function changes the shared augment fields and the per-view sections
(config.augment.view1 / view2, see configs/cifar10.py) of a config built from
configs/cifar10.py, and leaves the image size, the crop and every other section
alone. `python -m simclr_jax.data.preview --config=...` draws the result.
"""

import ml_collections as mlc


def byol_views(config: mlc.ConfigDict, *, blur: bool = True) -> mlc.ConfigDict:
    """Sets BYOL's asymmetric two-view recipe on config.augment and returns config.

    Source: Grill et al. 2020, "Bootstrap your own latent", arXiv 2006.07733,
    appendix B (Table 6), and its official code (byol/utils/augmentations.py,
    augment_config): flip p 0.5; colour jitter with p 0.8, in a random order,
    brightness 0.4 (an additive shift), contrast 0.4, saturation 0.2, hue 0.1;
    grayscale p 0.2; Gaussian blur, sigma in [0.1, 2.0], kernel 10% of the image
    side, p 1.0 on view 1 and 0.1 on view 2; solarisation (threshold 0.5) p 0.0 on
    view 1 and 0.2 on view 2. BYOL's crop is SimCLR's (area 0.08-1, aspect 3/4-4/3),
    which the config already has; MoCo v3, Barlow Twins and VICReg reuse this
    recipe (MoCo v3 with crop area (0.2, 1), set by its config).

    On 32x32 images (blur=False) both views go without blur, as solo-learn's CIFAR recipes
    (scripts/pretrain/cifar/augmentations/asymmetric.yaml: blur p 0.0 on both views,
    solarisation 0.0 / 0.2) and SimCLR's CIFAR recipe do.

    Args:
      config: a config with the augment section of configs/cifar10.py.
      blur: False for small images: blur p 0.0 on both views.

    Returns:
      The same config, changed in place.
    """
    aug = config.augment
    aug.flip_prob = 0.5
    aug.jitter_prob = 0.8
    aug.brightness_mode = "additive"
    aug.jitter_brightness = 0.4
    aug.jitter_contrast = 0.4
    aug.jitter_saturation = 0.2
    aug.jitter_hue = 0.1
    aug.grayscale_prob = 0.2
    aug.blur_sigma_range = (0.1, 2.0)
    aug.view1.blur_prob = 1.0 if blur else 0.0
    aug.view2.blur_prob = 0.1 if blur else 0.0
    aug.view1.solarize_prob = 0.0
    aug.view2.solarize_prob = 0.2
    return config


def mocov2_views(config: mlc.ConfigDict, *, blur: bool = True) -> mlc.ConfigDict:
    """Sets MoCo v2's symmetric two-view recipe on config.augment and returns config.

    Source: Chen, Fan, Girshick, He 2020, "Improved baselines with momentum contrastive
    learning", arXiv 2003.04297, and its official code (facebookresearch/moco main_moco.py,
    --aug-plus): RandomResizedCrop scale (0.2, 1); colour jitter (torchvision ColorJitter:
    multiplicative brightness) 0.4 / 0.4 / 0.4 / 0.1 with p 0.8; grayscale p 0.2; Gaussian
    blur sigma in [0.1, 2.0] with p 0.5; horizontal flip p 0.5; the same recipe on both
    views, no solarisation.

    On 32x32 images (blur=False) neither view is blurred, as SimCLR's CIFAR recipe and this
    repository's other CIFAR recipes (solo-learn's MoCo V2+ CIFAR recipe,
    scripts/pretrain/cifar/augmentations/symmetric_weak.yaml, keeps blur p 0.5 and crops
    from area 0.08).

    Args:
      config: a config with the augment section of configs/cifar10.py.
      blur: False for small images: blur p 0.0.

    Returns:
      The same config, changed in place.
    """
    aug = config.augment
    aug.crop_area_range = (0.2, 1.0)
    aug.flip_prob = 0.5
    aug.jitter_prob = 0.8
    aug.brightness_mode = "multiplicative"
    aug.jitter_brightness = 0.4
    aug.jitter_contrast = 0.4
    aug.jitter_saturation = 0.4
    aug.jitter_hue = 0.1
    aug.grayscale_prob = 0.2
    aug.blur_prob = 0.5 if blur else 0.0
    aug.blur_sigma_range = (0.1, 2.0)
    aug.solarize_prob = 0.0
    return config


def instdisc_views(config: mlc.ConfigDict) -> mlc.ConfigDict:
    """Sets InstDisc's augmentations (the same recipe on both views) and returns config.

    Source: Wu et al. 2018, arXiv 1805.01978, and its official code (lemniscate.pytorch):
    RandomResizedCrop scale (0.2, 1); colour jitter (torchvision ColorJitter: multiplicative
    brightness) 0.4 / 0.4 / 0.4 / 0.4 applied to every image (p 1.0); grayscale p 0.2; no blur,
    no solarisation. Its cifar.py jitters before the grayscale (this pipeline's order too) and
    does not flip (the flip is commented out); its ImageNet main.py applies grayscale first and
    flips with p 0.5. Here: horizontal flip p 0.5 on both (as every recipe of this repository).

    Args:
      config: a config with the augment section of configs/cifar10.py.

    Returns:
      The same config, changed in place.
    """
    mocov2_views(config, blur=False)
    config.augment.jitter_prob = 1.0
    config.augment.jitter_hue = 0.4
    return config
