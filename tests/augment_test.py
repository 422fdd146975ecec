"""Tests for simclr_jax.data.augment, simclr_jax.data.views and the preview CLI.

Numerics are checked against NumPy formulas written here (blur, grayscale,
brightness/contrast, centre-crop window) and the crop sampler against a NumPy
simulation of the algorithm TensorFlow's box sampler documents. Rates are
checked over a few thousand seeds with 5-sigma binomial tolerances; seeds are
fixed, so the tests are deterministic.
"""

import itertools
import math

import ml_collections as mlc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_jax.data import augment as aug
from simclr_jax.data import preview, views

N_DRAWS = 3000


def _image(h, w, seed=0):
    """A smooth, coloured random image in [0.05, 0.95] (no channel is constant)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.05, 0.95, size=(4, 3))
    ramp = np.linspace(0, 3, w)[None, :] + np.linspace(0, 1.4, h)[:, None]
    image = np.stack([np.interp(ramp, np.arange(4), coarse[:, c]) for c in range(3)], -1)
    image = image + rng.uniform(-0.05, 0.05, size=image.shape)
    return np.clip(image, 0.05, 0.95).astype(np.float32)


def _seed(i):
    return tf.constant([i, 12345], tf.int64)


def _map_over_seeds(fn, n):
    """Runs fn(seed) for seeds [i, 12345], i < n, inside tf.data; returns stacked NumPy."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, tf.constant(12345, tf.int64)])))
    return next(iter(ds.batch(n)))


def _cfg(**overrides):
    cfg = views.default_augment_config(24, jitter_strength=0.5, blur_prob=0.5)
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------
# Eager vs tf.data, determinism, dtype, range, shape.

_IMAGE = _image(40, 48)
_OPS = {
    "random_resized_crop": (lambda x, s: aug.random_resized_crop(x, s, size=20), (20, 20, 3)),
    "random_flip": (lambda x, s: aug.random_flip(x, s), (40, 48, 3)),
    "color_jitter": (lambda x, s: aug.color_jitter(x, s, strength=1.0), (40, 48, 3)),
    "color_jitter_additive": (
        lambda x, s: aug.color_jitter(x, s, strength=1.0, brightness_mode="additive"),
        (40, 48, 3),
    ),
    "random_color_jitter": (lambda x, s: aug.random_color_jitter(x, s, strength=0.5), (40, 48, 3)),
    "random_grayscale": (lambda x, s: aug.random_grayscale(x, s, prob=0.5), (40, 48, 3)),
    "gaussian_blur": (lambda x, s: aug.gaussian_blur(x, s, kernel_size=5), (40, 48, 3)),
    "random_blur": (lambda x, s: aug.random_blur(x, s), (40, 48, 3)),
    "center_crop": (lambda x, s: aug.center_crop(x, size=16), (16, 16, 3)),
    "pretrain_view": (lambda x, s: views.pretrain_view(x, s, _cfg()), (24, 24, 3)),
    "finetune_view": (lambda x, s: views.finetune_view(x, s, _cfg()), (24, 24, 3)),
    "eval_view": (lambda x, s: views.eval_view(x, _cfg()), (24, 24, 3)),
}


def _dynamic_shape(image_uint8):
    """Inside tf.data: the image round-tripped through PNG, so H and W are unknown."""
    image = tf.io.decode_png(tf.io.encode_png(image_uint8), channels=3)
    assert image.shape.as_list() == [None, None, 3]
    return image


@pytest.mark.parametrize("name", sorted(_OPS))
@pytest.mark.parametrize("as_uint8", [False, True], ids=["float32", "uint8_dynamic_shape"])
def test_op_eager_matches_tf_data_and_is_deterministic(name, as_uint8):
    fn, shape = _OPS[name]
    image = np.round(_IMAGE * 255).astype(np.uint8) if as_uint8 else _IMAGE
    seeds = [_seed(i) for i in range(4)]
    eager = [fn(image, s).numpy() for s in seeds]
    again = [fn(image, s).numpy() for s in seeds]
    if as_uint8:
        ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds))
        ds = ds.map(lambda s: fn(_dynamic_shape(image), s))
    else:
        ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(lambda s: fn(image, s))
    graph = [x.numpy() for x in ds]
    for e, a, g in zip(eager, again, graph, strict=True):
        assert e.dtype == np.float32 and e.shape == shape
        assert e.min() >= 0.0 and e.max() <= 1.0
        np.testing.assert_array_equal(e, a)
        np.testing.assert_array_equal(e, g)


def test_views_differ_and_seed_dtype_does_not_matter():
    cfg = _cfg()
    v1 = views.pretrain_view(_IMAGE, _seed(0), cfg).numpy()
    v2 = views.pretrain_view(_IMAGE, _seed(1), cfg).numpy()
    v1_int32 = views.pretrain_view(_IMAGE, tf.constant([0, 12345], tf.int32), cfg).numpy()
    assert np.abs(v1 - v2).mean() > 1e-2
    np.testing.assert_array_equal(v1, v1_int32)


def test_pretrain_view_applies_ops_in_reference_order():
    cfg = _cfg(blur_prob=1.0, jitter_prob=1.0, grayscale_prob=0.5)
    for i in range(3):
        crop_s, flip_s, jitter_s, gray_s, blur_s = tf.unstack(
            tf.random.experimental.stateless_split(_seed(i), 5)
        )
        x = aug.random_resized_crop(_IMAGE, crop_s, size=24)
        x = aug.random_flip(x, flip_s)
        x = aug.random_color_jitter(x, jitter_s, prob=1.0, strength=0.5)
        x = aug.random_grayscale(x, gray_s, prob=0.5)
        x = aug.random_blur(x, blur_s, prob=1.0, kernel_size=2)
        np.testing.assert_array_equal(views.pretrain_view(_IMAGE, _seed(i), cfg).numpy(), x.numpy())
        # finetune_view is the same crop and flip, without colour changes.
        y = aug.random_flip(aug.random_resized_crop(_IMAGE, crop_s, size=24), flip_s)
        np.testing.assert_array_equal(views.finetune_view(_IMAGE, _seed(i), cfg).numpy(), y.numpy())


# ----------------------------------------------------------------------------
# Random resized crop.


def _reference_crop_box(height, width, rng, area_range, aspect_range, min_covered, attempts):
    """NumPy simulation of the box sampler documented by TensorFlow's kernel.

    Aspect ratio uniform; crop height uniform over the integers allowed by the
    area range; rejection if the area (after rounding fixes) or the covered
    fraction of the whole image is out of range; whole image after `attempts`.
    """
    total = height * width
    min_area, max_area = area_range[0] * total, area_range[1] * total
    for _ in range(attempts):
        ratio = rng.uniform(*aspect_range)
        h = round(math.sqrt(min_area / ratio))
        h_max = round(math.sqrt(max_area / ratio))
        if round(h_max * ratio) > width:
            h_max = int((width + 0.5 - 1e-7) / ratio)
            if round(h_max * ratio) > width:
                h_max -= 1
        h_max = min(h_max, height)
        h = min(h, h_max)
        h = int(rng.integers(h, h_max + 1))
        w = round(h * ratio)
        if w * h < min_area:
            h += 1
            w = round(h * ratio)
        if w * h > max_area:
            h -= 1
            w = round(h * ratio)
        ok = min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height
        if ok and w * h >= min_covered * total:
            return h, w
    return height, width


def _ks_distance(a, b):
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.abs(cdf_a - cdf_b).max()


def test_crop_box_statistics_match_reference_sampler():
    height, width = 300, 400
    boxes = _map_over_seeds(lambda s: aug.sample_crop_box([height, width, 3], s), N_DRAWS).numpy()
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all()
    assert (y + h <= height).all() and (x + w <= width).all()
    area = h * w / (height * width)
    aspect = w / h
    # min_object_covered=0.1 (as in the reference) raises the floor from 0.08.
    assert area.min() >= 0.1 and area.max() <= 1.0
    assert area.min() < 0.12 and area.max() > 0.9
    # Width is rounded from height * ratio, so allow half a pixel.
    assert (aspect >= 3 / 4 - 0.5 / h).all() and (aspect <= 4 / 3 + 0.5 / h).all()

    rng = np.random.default_rng(0)
    ref = np.array(
        [
            _reference_crop_box(height, width, rng, (0.08, 1.0), (3 / 4, 4 / 3), 0.1, 100)
            for _ in range(N_DRAWS)
        ]
    )
    ref_area = ref[:, 0] * ref[:, 1] / (height * width)
    ref_aspect = ref[:, 1] / ref[:, 0]
    # Two-sample Kolmogorov-Smirnov bound at alpha = 0.001.
    bound = 1.95 * math.sqrt(2 / N_DRAWS)
    assert _ks_distance(area, ref_area) < bound
    assert _ks_distance(aspect, ref_aspect) < bound
    # Uniform aspect has mean 25/24 ~ 1.042; a log-uniform one would have mean ~1.014.
    assert abs(aspect.mean() - 25 / 24) < 0.012


def test_crop_falls_back_to_whole_image():
    # A 4 x 100 image has no box with area >= 0.5 and aspect in [3/4, 4/3].
    for i in range(5):
        box = aug.sample_crop_box([4, 100, 3], _seed(i), area_range=(0.5, 1.0)).numpy()
        np.testing.assert_array_equal(box, [0, 0, 4, 100])


def test_crop_uses_sampled_box_and_full_box_is_identity():
    for i in range(3):
        box = aug.sample_crop_box(tf.shape(_IMAGE), _seed(i)).numpy()
        y, x, h, w = box
        expected = tf.image.resize(_IMAGE[y : y + h, x : x + w], [20, 20], method="bicubic")
        got = aug.random_resized_crop(_IMAGE, _seed(i), size=20)
        np.testing.assert_allclose(got, np.clip(expected, 0, 1), atol=1e-6)
    square = _image(24, 24)
    same = aug.random_resized_crop(
        square, _seed(0), size=24, area_range=(1, 1), aspect_range=(1, 1)
    )
    np.testing.assert_allclose(same, square, atol=1e-6)


# ----------------------------------------------------------------------------
# Decision rates.


def _is_flipped(out, x):
    return np.all(out == x[:, :, ::-1], axis=(1, 2, 3))


def _is_gray(out, x):
    return np.all(np.abs(out - out[..., :1]) < 1e-7, axis=(1, 2, 3))


def _is_changed(out, x):
    return np.any(out != x, axis=(1, 2, 3))


@pytest.mark.parametrize(
    "op, prob, detect",
    [
        (lambda x, s: aug.random_flip(x, s), 0.5, _is_flipped),
        (lambda x, s: aug.random_color_jitter(x, s, strength=0.5), 0.8, _is_changed),
        (lambda x, s: aug.random_grayscale(x, s), 0.2, _is_gray),
        # sigma >= 1 so that every applied blur visibly changes the image.
        (
            lambda x, s: aug.random_blur(x, s, sigma_range=(1.0, 2.0), kernel_size=5),
            0.5,
            _is_changed,
        ),
    ],
    ids=["flip", "jitter", "grayscale", "blur"],
)
def test_decision_rates(op, prob, detect):
    x = _image(8, 8)
    outs = _map_over_seeds(lambda s: op(x, s), N_DRAWS).numpy()
    applied = detect(outs, x[None])
    # Outputs not detected as transformed must be the input itself.
    np.testing.assert_array_equal(outs[~applied], np.broadcast_to(x, outs[~applied].shape))
    sigma = math.sqrt(prob * (1 - prob) / N_DRAWS)
    assert abs(applied.mean() - prob) < 5 * sigma


# ----------------------------------------------------------------------------
# Colour jitter.


@pytest.mark.parametrize("strength", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("mode", aug.BRIGHTNESS_MODES)
def test_jitter_params_ranges_and_order(strength, mode):
    params = _map_over_seeds(
        lambda s: aug.sample_color_jitter_params(s, strength=strength, brightness_mode=mode),
        N_DRAWS,
    )
    p = {k: v.numpy() for k, v in params.items()}
    s = 0.8 * strength
    if mode == "multiplicative":
        lo, hi = max(0.0, 1 - s), 1 + s
    else:
        lo, hi = -s, s
    ranges = {
        "brightness": (lo, hi),
        "contrast": (1 - s, 1 + s),
        "saturation": (1 - s, 1 + s),
        "hue": (-0.2 * strength, 0.2 * strength),
    }
    for name, (lo, hi) in ranges.items():
        v = p[name]
        width = hi - lo
        assert v.min() >= lo and v.max() <= hi, name
        # Uniform: the draws reach both ends and have the midpoint as mean.
        assert v.min() < lo + 0.01 * width and v.max() > hi - 0.01 * width, name
        assert abs(v.mean() - (lo + hi) / 2) < 5 * width / math.sqrt(12 * N_DRAWS), name
    orders = p["order"]
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in orders:
        counts[tuple(row)] += 1
    q = 1 / 24
    assert all(abs(c / N_DRAWS - q) < 5 * math.sqrt(q * (1 - q) / N_DRAWS) for c in counts.values())


def test_brightness_modes():
    x = _image(6, 7)
    np.testing.assert_allclose(
        aug.adjust_brightness(x, 1.3, mode="multiplicative"), np.clip(x * 1.3, 0, 1)
    )
    np.testing.assert_allclose(
        aug.adjust_brightness(x, 0.3, mode="additive"), np.clip(x + 0.3, 0, 1)
    )
    np.testing.assert_allclose(
        aug.adjust_brightness(x, -0.2, mode="additive"), np.clip(x - 0.2, 0, 1)
    )


@pytest.mark.parametrize("mode", aug.BRIGHTNESS_MODES)
def test_color_jitter_matches_numpy_on_gray_image(mode):
    # On a gray image saturation and hue are no-ops, so the result is brightness
    # and contrast in the sampled order, clipped after each op.
    rng = np.random.default_rng(1)
    gray = np.repeat(rng.uniform(0.0, 1.0, size=(10, 12, 1)), 3, axis=-1).astype(np.float32)
    for i in range(8):
        p = aug.sample_color_jitter_params(_seed(i), strength=1.0, brightness_mode=mode)
        expected = gray.astype(np.float64)
        for op in p["order"].numpy():
            if op == 0:
                b = float(p["brightness"])
                expected = expected * b if mode == "multiplicative" else expected + b
            elif op == 1:
                mean = expected.mean(axis=(0, 1), keepdims=True)
                expected = (expected - mean) * float(p["contrast"]) + mean
            expected = np.clip(expected, 0.0, 1.0)
        got = aug.color_jitter(gray, _seed(i), strength=1.0, brightness_mode=mode)
        np.testing.assert_allclose(got, expected, atol=2e-5)
    multiplicative = aug.color_jitter(
        gray, _seed(0), strength=1.0, brightness_mode="multiplicative"
    )
    additive = aug.color_jitter(gray, _seed(0), strength=1.0, brightness_mode="additive")
    assert np.abs(multiplicative - additive).max() > 1e-3


def test_zero_strength_jitter_is_identity():
    np.testing.assert_array_equal(aug.color_jitter(_IMAGE, _seed(0), strength=0.0), _IMAGE)


# ----------------------------------------------------------------------------
# Grayscale, blur, centre crop.


def test_grayscale_matches_luma_formula():
    luma = _IMAGE @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    np.testing.assert_allclose(
        aug.to_grayscale(_IMAGE), np.repeat(luma[..., None], 3, -1), atol=1e-6
    )


def _numpy_blur(image, sigma, radius):
    """Direct 2-D Gaussian convolution with zero padding (not separable)."""
    d = np.arange(-radius, radius + 1)
    kernel = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    h, w, _ = image.shape
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)))
    out = np.zeros(image.shape)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


@pytest.mark.parametrize(
    "shape, kernel_size, radius",
    [((20, 24), 7, 3), ((20, 24), 6, 3), ((40, 30), None, 2), ((9, 9), 1, 0)],
)
def test_gaussian_blur_matches_numpy(shape, kernel_size, radius):
    x = _image(*shape, seed=3)
    got = aug.gaussian_blur(x, _seed(0), sigma_range=(1.3, 1.3), kernel_size=kernel_size)
    np.testing.assert_allclose(got, _numpy_blur(x, 1.3, radius), atol=1e-5)


def test_blur_sigma_is_drawn_from_range():
    # Blurring a centred impulse with radius 6 gives the kernel; its variance is sigma^2.
    impulse = np.zeros((13, 13, 3), np.float32)
    impulse[6, 6] = 1.0
    d = np.arange(-6, 7)
    sigmas = []
    for i in range(200):
        k = aug.gaussian_blur(impulse, _seed(i), kernel_size=13).numpy()[:, 6, 0]
        sigmas.append(math.sqrt(max((k * d**2).sum() / k.sum(), 0.0)))
    sigmas = np.array(sigmas)
    assert sigmas.max() <= 2.0 + 1e-3
    assert sigmas.min() < 0.3 and sigmas.max() > 1.8
    assert abs(np.median(sigmas) - 1.05) < 0.2


@pytest.mark.parametrize(
    "h, w, size", [(40, 60, 35), (60, 40, 35), (32, 32, 28), (36, 36, 32), (50, 70, 20)]
)
def test_center_crop_window(h, w, size):
    x = _image(h, w)
    side = int(np.rint(0.875 * min(h, w)))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    got = aug.center_crop(x, size=size).numpy()
    if side == size:
        # Resizing to the same size is exact, so the window can be checked directly.
        np.testing.assert_allclose(got, x[top : top + side, left : left + side], atol=1e-6)
    else:
        expected = tf.image.resize(x[top : top + side, left : left + side], [size, size], "bicubic")
        np.testing.assert_allclose(got, np.clip(expected, 0, 1), atol=1e-6)


def test_center_crop_skipped_for_cifar_sized_images():
    x = _image(32, 32)
    x8 = np.round(x * 255).astype(np.uint8)
    ds = tf.data.Dataset.from_tensors(x8).map(lambda v: aug.center_crop(_dynamic_shape(v), size=32))
    np.testing.assert_allclose(next(iter(ds)), x8 / 255, atol=1e-7)
    np.testing.assert_array_equal(aug.center_crop(x, size=32), x)
    np.testing.assert_array_equal(
        views.eval_view(x, views.default_augment_config(32, jitter_strength=0.5, blur_prob=0.0)), x
    )


# ----------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 0),
        ("image_size", 32.0),
        ("crop_area_range", (0.0, 1.0)),
        ("crop_area_range", (0.5, 0.2)),
        ("crop_area_range", (0.1, 1.5)),
        ("crop_aspect_range", (0.0, 1.0)),
        ("crop_max_attempts", 0),
        ("flip_prob", 1.5),
        ("jitter_strength", 2.0),
        ("jitter_prob", -0.1),
        ("brightness_mode", "gamma"),
        ("grayscale_prob", 2),
        ("blur_prob", -1.0),
        ("blur_sigma_range", (0.0, 2.0)),
        ("eval_crop_fraction", 0.0),
        ("eval_crop_fraction", 1.5),
    ],
)
def test_bad_config_raises(field, value):
    fields = _cfg().to_dict()
    fields[field] = value
    cfg = mlc.ConfigDict(fields)
    with pytest.raises(ValueError, match=field) as info:
        views.validate_augment_config(cfg)
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=field):
        views.pretrain_view(_IMAGE, _seed(0), cfg)


def test_missing_and_unknown_config_fields_raise():
    cfg = _cfg().to_dict()
    del cfg["flip_prob"]
    with pytest.raises(ValueError, match="flip_prob"):
        views.validate_augment_config(mlc.ConfigDict(cfg))
    cfg = _cfg()
    cfg.blur_sigma = 1.0
    with pytest.raises(ValueError, match="blur_sigma"):
        views.validate_augment_config(cfg)


def test_bad_op_arguments_raise():
    with pytest.raises(ValueError, match="prob=1.5"):
        aug.random_flip(_IMAGE, _seed(0), prob=1.5)
    with pytest.raises(ValueError, match="seed"):
        aug.random_flip(_IMAGE, [1, 2, 3])
    with pytest.raises(ValueError, match="image"):
        aug.random_flip(np.zeros((4, 4, 4), np.float32), _seed(0))
    with pytest.raises(ValueError, match="size=0"):
        aug.random_resized_crop(_IMAGE, _seed(0), size=0)
    with pytest.raises(ValueError, match="strength=2.0"):
        aug.color_jitter(_IMAGE, _seed(0), strength=2.0)
    with pytest.raises(ValueError, match="brightness_mode"):
        aug.color_jitter(_IMAGE, _seed(0), strength=1.0, brightness_mode="linear")


# ----------------------------------------------------------------------------
# Preview CLI.


def test_preview_writes_grid(tmp_path, capsys):
    out = tmp_path / "views.png"
    preview.main(["--out", str(out), "--num_images", "3"])
    cell = preview.cell_size(32)
    assert cell == 128
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (
        preview.HEADER + 3 * (cell + preview.PAD) + preview.PAD,
        3 * cell + 4 * preview.PAD,
        3,
    )
    originals, labels, _ = preview.load_embedded_images(3, interleave_classes=True)
    np.testing.assert_array_equal(labels, [0, 1, 2])
    top, pad = preview.HEADER, preview.PAD
    # The first cell holds the first image upscaled x4 by nearest neighbour.
    np.testing.assert_array_equal(grid[top : top + cell : 4, pad : pad + cell : 4], originals[0])
    view1 = grid[top : top + cell, 2 * pad + cell : 2 * pad + 2 * cell]
    view2 = grid[top : top + cell, 3 * pad + 2 * cell : 3 * pad + 3 * cell]
    assert np.abs(view1.astype(int) - view2.astype(int)).mean() > 1

    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "import ml_collections as mlc\n"
        "from simclr_jax.data import views\n"
        "def get_config(arg=None):\n"
        "    c = mlc.ConfigDict()\n"
        "    c.augment = views.default_augment_config(int(arg or 48), jitter_strength=1.0,"
        " blur_prob=0.5)\n"
        "    c.data = mlc.ConfigDict({'source': 'tfds'})\n"
        "    return c\n"
    )
    out2 = tmp_path / "views48.png"
    preview.main([f"--config={config_file}:48", f"--out={out2}", "--num_images=2"])
    assert "embedded" in capsys.readouterr().out
    cell = preview.cell_size(48)
    assert cell == 144
    assert Image.open(out2).size == (
        3 * cell + 4 * preview.PAD,
        preview.HEADER + 2 * (cell + preview.PAD) + preview.PAD,
    )
