"""Tests of per-view augmentation recipes (views.view_recipe, config.augment.view1 / view2).

SimCLR unchanged: the configs' views equal the recipe composed here from the ops
with the five-way seed split the pipeline used before per-view recipes, with the
view sections empty, absent (a config.json written before them) or set to the
shared values. Asymmetry: with an op on one view only, the other view of the
real pipeline equals the pipeline without the op, bit for bit, for the same
seed; the view with the op differs.
"""

import json

import ml_collections as mlc
import numpy as np
import pytest
import tensorflow as tf

from configs import augment_recipes, cifar10, imagenet
from simclr_jax.config_checks import ConfigError
from simclr_jax.data import augment as aug
from simclr_jax.data import pipeline, preview, views

_IMAGE = np.random.default_rng(0).uniform(0.0, 1.0, (40, 36, 3)).astype(np.float32)


def _seed(i):
    return tf.constant([i, 99], tf.int64)


def _previous_pretrain_view(image, seed, cfg):
    """pretrain_view as it was before per-view recipes: five seed slots, one recipe."""
    crop_s, flip_s, jitter_s, gray_s, blur_s = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5)
    )
    x = aug.random_resized_crop(
        image,
        crop_s,
        size=cfg.image_size,
        area_range=tuple(cfg.crop_area_range),
        aspect_range=tuple(cfg.crop_aspect_range),
        max_attempts=cfg.crop_max_attempts,
    )
    x = aug.random_flip(x, flip_s, prob=cfg.flip_prob)
    x = aug.random_color_jitter(
        x,
        jitter_s,
        prob=cfg.jitter_prob,
        strength=cfg.jitter_strength,
        brightness_mode=cfg.brightness_mode,
    )
    x = aug.random_grayscale(x, gray_s, prob=cfg.grayscale_prob)
    if cfg.blur_prob > 0:
        x = aug.random_blur(
            x,
            blur_s,
            prob=cfg.blur_prob,
            sigma_range=tuple(cfg.blur_sigma_range),
            kernel_size=cfg.image_size // 10,
        )
    return x


def _as_old_config_json(cfg):
    """The augment section as a config.json written before per-view recipes holds it."""
    fields = json.loads(cfg.to_json_best_effort())
    for name in views.ADDED_FIELDS:
        del fields[name]
    return mlc.ConfigDict(fields)


def _explicit_views(cfg):
    """The augment section with every view field set to the shared value."""
    cfg = mlc.ConfigDict(cfg.to_dict())
    for view in views.VIEWS:
        for name in views.VIEW_FIELDS:
            if cfg[name] is not None:
                cfg[view][name] = cfg[name]
    return cfg


@pytest.mark.parametrize("module", [cifar10, imagenet], ids=["cifar10", "imagenet"])
def test_simclr_views_are_unchanged(module):
    cfg = module.get_config().augment
    cfg.image_size = 40  # blur (ImageNet's p 0.5) with a 4-pixel kernel; fast
    as_json = mlc.ConfigDict(json.loads(cfg.to_json_best_effort()))  # a run's config.json
    variants = [cfg, as_json, _as_old_config_json(cfg), _explicit_views(cfg)]
    for i in range(4):
        expected = _previous_pretrain_view(_IMAGE, _seed(i), cfg).numpy()
        for variant in variants:
            for view in (None, 1, 2):
                got = views.pretrain_view(_IMAGE, _seed(i), variant, view=view).numpy()
                np.testing.assert_array_equal(got, expected)


def test_config_declares_the_view_fields():
    section = cifar10.get_config().augment.view1
    assert set(section.keys()) == set(views.VIEW_FIELDS)
    assert all(section[name] is None for name in views.VIEW_FIELDS)
    assert section.to_dict() == views.view_overrides_section().to_dict()
    # Every augment field of the config is one the views know, and the reverse.
    declared = set(cifar10.get_config().augment.keys())
    assert declared == set(views.AUGMENT_FIELDS) | set(views.ADDED_FIELDS)
    # Typed: a locked config takes a view field from the command line.
    config = cifar10.get_config()
    config.lock()
    config.update_from_flattened_dict({"augment.view2.blur_prob": 0.3})
    assert views.view_recipe(config.augment, 2)["blur_prob"] == 0.3
    assert views.view_recipe(config.augment, 1)["blur_prob"] == 0.0


def test_byol_recipe():
    """BYOL, Grill et al. 2020, appendix B Table 6 (and its official augment_config)."""
    cfg = augment_recipes.byol_views(cifar10.get_config()).augment
    expected = {
        1: {"blur_prob": 1.0, "solarize_prob": 0.0},
        2: {"blur_prob": 0.1, "solarize_prob": 0.2},
    }
    for view in (1, 2):
        r = views.view_recipe(cfg, view)
        assert r["jitter_magnitudes"] == (0.4, 0.4, 0.2, 0.1)
        assert (r["jitter_prob"], r["grayscale_prob"], r["flip_prob"]) == (0.8, 0.2, 0.5)
        assert r["brightness_mode"] == "additive"
        assert tuple(r["blur_sigma_range"]) == (0.1, 2.0)
        assert {k: r[k] for k in expected[view]} == expected[view]
    with pytest.raises(ConfigError, match="differ in.*blur_prob"):
        views.pretrain_view(_IMAGE, _seed(0), cfg)
    # A run's config.json keeps the recipe.
    reloaded = mlc.ConfigDict(json.loads(cfg.to_json_best_effort()))
    for view in (1, 2):
        assert views.view_recipe(reloaded, view) == views.view_recipe(cfg, view)


_BATCHES = {}


def _first_batch(aug_cfg, seed=5):
    """The first batch of the real pipeline on the embedded sample (memoised per recipe)."""
    key = (aug_cfg.to_json_best_effort(), seed)
    if key not in _BATCHES:
        data = mlc.ConfigDict({"source": "embedded", "name": "cifar10_sample", "cache": False})
        ds, _ = pipeline.build_pretrain_dataset(data, aug_cfg, global_batch_size=32, seed=seed)
        _BATCHES[key] = next(ds.as_numpy_iterator())
    return _BATCHES[key]


@pytest.mark.parametrize("blurred", [1, 2])
def test_asymmetric_ops_land_on_their_view(blurred):
    # Blur p 1.0 on one view, solarisation p 1.0 on the other, each 0.0 on the other view.
    solarized = 3 - blurred
    plain = _first_batch(cifar10.get_config().augment)
    cfg = cifar10.get_config().augment
    cfg[f"view{blurred}"].blur_prob = 1.0
    cfg[f"view{solarized}"].blur_prob = 0.0
    cfg[f"view{solarized}"].solarize_prob = 1.0
    cfg[f"view{blurred}"].solarize_prob = 0.0
    batch = _first_batch(cfg)
    np.testing.assert_array_equal(batch["label"], plain["label"])
    # The solarised view is the plain pipeline's view, solarised, and not blurred: exact.
    x = plain[f"view{solarized}"]
    np.testing.assert_allclose(batch[f"view{solarized}"], np.where(x < 0.5, x, 1 - x), atol=1e-7)
    assert np.any(batch[f"view{solarized}"] != x)
    # The blurred view differs from the plain one (sigma near 0.1 may leave a 3-tap blur exact).
    changed = np.any(batch[f"view{blurred}"] != plain[f"view{blurred}"], axis=(1, 2, 3))
    assert changed.mean() > 0.75, changed.mean()
    # Turning the op off on the other view leaves it as it was: the blurred view with
    # solarisation on the other view equals the pipeline with blur alone on that view.
    blur_only = cifar10.get_config().augment
    blur_only[f"view{blurred}"].blur_prob = 1.0
    np.testing.assert_array_equal(
        batch[f"view{blurred}"], _first_batch(blur_only)[f"view{blurred}"]
    )
    np.testing.assert_array_equal(_first_batch(blur_only)[f"view{solarized}"], x)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"view2.blurprob": 0.1}, r"config\.augment\.view2\.blurprob .*did you mean 'blur_prob'"),
        ({"view1.crop_area_range": (0.2, 1.0)}, r"config\.augment\.view1\.crop_area_range"),
        ({"view2.blur_prob": 1.5}, r"^config\.augment\.view2\.blur_prob=1\.5: allowed range"),
        ({"view1.brightness_mode": "gamma"}, r"brightness_mode='gamma'"),
        ({"view1.jitter_saturation": 1.2}, r"config\.augment\.view1\.jitter_saturation=1\.2"),
        ({"jitter_hue": 0.7}, r"^config\.augment\.jitter_hue=0\.7"),
        ({"solarize_prob": -0.5}, r"^config\.augment\.solarize_prob=-0\.5"),
        ({"solarise_prob": 0.2}, r"config\.augment\.solarise_prob .*'solarize_prob'"),
        ({"view2": 0.2}, r"config\.augment\.view2=0\.2: expected a section"),
    ],
)
def test_bad_view_fields_raise_config_errors(change, match):
    fields = cifar10.get_config().augment.to_dict()
    for key, value in change.items():
        section, _, name = key.rpartition(".")
        (fields[section] if section else fields)[name] = value
    cfg = mlc.ConfigDict(fields)
    with pytest.raises(ConfigError, match=match):
        views.validate_augment_config(cfg)
    data = mlc.ConfigDict({"source": "embedded", "name": "cifar10_sample"})
    with pytest.raises(ConfigError, match=match):  # before any image is read
        pipeline.build_pretrain_dataset(data, cfg, global_batch_size=8, seed=0)


def test_view_recipe_resolution():
    cfg = cifar10.get_config().augment
    cfg.jitter_saturation = 0.2
    cfg.view2.jitter_strength = 1.0
    cfg.view2.jitter_hue = 0.05
    # A set magnitude wins over one derived from jitter_strength, the view's over the shared.
    assert views.view_recipe(cfg, 1)["jitter_magnitudes"] == (0.4, 0.4, 0.2, 0.1)
    assert views.view_recipe(cfg, 2)["jitter_magnitudes"] == (0.8, 0.8, 0.2, 0.05)
    with pytest.raises(ValueError, match="view=3"):
        views.view_recipe(cfg, 3)


def test_preview_captions_each_views_recipe(tmp_path, capsys):
    config_file = tmp_path / "byol.py"
    config_file.write_text(
        "from configs import augment_recipes, cifar10\n"
        "def get_config(arg=None):\n"
        "    return augment_recipes.byol_views(cifar10.get_config('runlocal'))\n"
    )
    out = tmp_path / "views.png"
    preview.main([f"--config={config_file}", f"--out={out}", "--num_images=2"])
    printed = capsys.readouterr().out
    assert "view 1: blur 1.0, solarize 0.0," in printed
    assert "view 2: blur 0.1, solarize 0.2," in printed
    cfg = augment_recipes.byol_views(cifar10.get_config()).augment
    assert preview.describe_recipe(cfg, 2).startswith("blur 0.1, solarize 0.2, jitter 0.8")
    # The same seeds give the views the pipeline-independent make_views draws.
    images, _, _ = preview.load_embedded_images(2, interleave_classes=True)
    v1, v2 = preview.make_views(images, cfg)
    seeds = tf.random.experimental.stateless_split(tf.constant([0, 1], tf.int64), 2)
    np.testing.assert_array_equal(v2[1], views.pretrain_view(images[1], seeds[1], cfg, view=2))
    np.testing.assert_array_equal(v1[1], views.pretrain_view(images[1], seeds[0], cfg, view=1))
