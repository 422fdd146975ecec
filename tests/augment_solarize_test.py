"""Tests of the ops augment.py gained for the contrastive family: solarisation and per-op jitter.

References are independent of the code under test: solarisation against a
float64 NumPy form of BYOL's formula (Grill et al. 2020, appendix B) and, on the
uint8 grid, against PIL's ImageOps.solarize (threshold 128, the form solo-learn
and lightly use); rates against exact binomial quantiles; jitter ranges against
the uniform bounds of SimCLR's appendix A and BYOL's Table 6.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from simclr_jax.data import augment as aug
from simclr_jax.data import views

N_DRAWS = 2000
TAIL = 1e-7  # per-side probability that a correct implementation fails a rate check


def binomial_bounds(n, p, tail=TAIL):
    """(lo, hi): a Binomial(n, p) count is < lo or > hi with probability <= tail each.

    Exact, from the binomial pmf summed in log space (no normal approximation).
    """
    if p in (0.0, 1.0):
        return (round(n * p),) * 2
    log_pmf = [
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
        for k in range(n + 1)
    ]
    pmf = np.exp(np.array(log_pmf) - max(log_pmf))
    pmf /= pmf.sum()
    cdf = np.cumsum(pmf)
    lo = int(np.searchsorted(cdf, tail, side="right"))  # P(X < lo) <= tail
    hi = int(np.searchsorted(cdf, 1 - tail, side="left"))  # P(X > hi) <= tail
    return lo, hi


def _image(h, w, seed=0):
    """Random pixels over the whole [0, 1] range, both sides of the threshold."""
    return np.random.default_rng(seed).uniform(0.0, 1.0, (h, w, 3)).astype(np.float32)


def _seed(i):
    return tf.constant([i, 777], tf.int64)


def _map_over_seeds(fn, n):
    """fn(seed) for seeds [i, 777], i < n, inside tf.data; stacked as NumPy."""
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, tf.constant(777, tf.int64)])))
    return next(iter(ds.batch(n))).numpy()


def numpy_solarize(x, threshold=0.5):
    """BYOL's solarisation in float64: x where x < threshold, else 1 - x."""
    x = np.asarray(x, np.float64)
    return np.where(x < threshold, x, 1.0 - x)


# ----------------------------------------------------------------------------
# Solarisation.


@pytest.mark.parametrize("as_uint8", [False, True], ids=["float32", "uint8_dynamic_shape"])
@pytest.mark.parametrize(
    "fn",
    [
        lambda x, s: aug.solarize(x),
        lambda x, s: aug.random_solarize(x, s, prob=0.5),
    ],
    ids=["solarize", "random_solarize"],
)
def test_solarize_eager_matches_tf_data_and_is_deterministic(fn, as_uint8):
    image = _image(9, 11)
    if as_uint8:
        image = np.round(image * 255).astype(np.uint8)
    seeds = [_seed(i) for i in range(6)]
    eager = [fn(image, s).numpy() for s in seeds]
    again = [fn(image, s).numpy() for s in seeds]

    def graph_input():
        if not as_uint8:
            return tf.constant(image)
        decoded = tf.io.decode_png(tf.io.encode_png(image), channels=3)
        assert decoded.shape.as_list() == [None, None, 3]
        return decoded

    ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(lambda s: fn(graph_input(), s))
    for e, a, g in zip(eager, again, [x.numpy() for x in ds], strict=True):
        assert e.dtype == np.float32 and e.shape == (9, 11, 3)
        assert e.min() >= 0.0 and e.max() <= 1.0
        np.testing.assert_array_equal(e, a)
        np.testing.assert_array_equal(e, g)


def test_solarize_matches_numpy_and_pil():
    x = _image(16, 16, seed=1)
    # Values at and around the threshold: 0.5 is inverted, the float just below is kept.
    x[0, :4, 0] = [0.5, np.nextafter(np.float32(0.5), np.float32(0)), 0.0, 1.0]
    np.testing.assert_allclose(aug.solarize(x), numpy_solarize(x), rtol=0, atol=1e-7)
    assert aug.solarize(x).numpy()[0, 0, 0] == 0.5  # 1 - 0.5
    for threshold in (0.0, 0.25, 1.0):  # 0 inverts every pixel, 1 only pixels equal to 1
        got = aug.solarize(x, threshold=threshold)
        np.testing.assert_allclose(got, numpy_solarize(x, threshold), rtol=0, atol=1e-7)
    # Every uint8 value: BYOL's 0.5 on [0, 1] is PIL's threshold 128 on [0, 255].
    grid = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    pil = np.asarray(ImageOps.solarize(Image.fromarray(grid), threshold=128))
    got = np.round(aug.solarize(grid).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, pil)


@pytest.mark.parametrize("prob", [0.0, 0.2, 0.7, 1.0])
def test_solarize_rate_is_binomial(prob):
    x = _image(4, 4, seed=2)
    outs = _map_over_seeds(lambda s: aug.random_solarize(x, s, prob=prob), N_DRAWS)
    solarized = np.all(np.abs(outs - numpy_solarize(x)[None]) < 1e-6, axis=(1, 2, 3))
    untouched = np.all(outs == x[None], axis=(1, 2, 3))
    # Each output is either the input or its solarisation, never anything else.
    assert (solarized ^ untouched).all()
    lo, hi = binomial_bounds(N_DRAWS, prob)
    assert lo <= solarized.sum() <= hi, (solarized.sum(), lo, hi)


def test_solarize_decisions_are_independent_of_the_other_ops_and_of_the_other_view():
    # A view whose only random ops are grayscale (p 0.5) and solarisation (p 0.5): every
    # output is one of four images, so the joint decisions can be read off exactly.
    x = _image(6, 6, seed=3)
    cfg = views.default_augment_config(6, jitter_strength=0.5, blur_prob=0.0)
    cfg.update(
        dict(
            crop_area_range=(1.0, 1.0),
            crop_aspect_range=(1.0, 1.0),
            flip_prob=0.0,
            jitter_prob=0.0,
            grayscale_prob=0.5,
            solarize_prob=0.5,
        )
    )
    gray = x @ np.array([0.2989, 0.5870, 0.1140])
    gray = np.repeat(gray[..., None], 3, -1)
    candidates = np.stack([x, gray, numpy_solarize(x), numpy_solarize(gray)])

    def two_views(seed):
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return tf.stack([views.pretrain_view(x, s, cfg, view=k) for k, s in ((1, s1), (2, s2))])

    outs = _map_over_seeds(two_views, N_DRAWS)  # [N, 2 views, 6, 6, 3]
    dist = np.abs(outs[:, :, None] - candidates[None, None]).max(axis=(3, 4, 5))
    assert (dist.min(axis=2) < 1e-5).all()
    kind = dist.argmin(axis=2)  # 0 none, 1 gray, 2 solarised, 3 both
    is_sol, is_gray = kind >= 2, kind % 2 == 1
    lo, hi = binomial_bounds(N_DRAWS, 0.25)
    for a, b in [
        (is_sol[:, 0], is_gray[:, 0]),  # solarisation vs grayscale, same view
        (is_sol[:, 1], is_gray[:, 1]),
        (is_sol[:, 0], is_sol[:, 1]),  # solarisation of view 1 vs view 2
    ]:
        for va in (False, True):
            for vb in (False, True):
                count = np.sum((a == va) & (b == vb))
                assert lo <= count <= hi, (va, vb, count, lo, hi)


def test_solarize_argument_errors():
    with pytest.raises(ValueError, match="threshold=1.5"):
        aug.solarize(_image(2, 2), threshold=1.5)
    with pytest.raises(ValueError, match="prob=-0.1"):
        aug.random_solarize(_image(2, 2), _seed(0), prob=-0.1)


# ----------------------------------------------------------------------------
# Per-op colour-jitter magnitudes (BYOL's 0.4 / 0.4 / 0.2 / 0.1).


@pytest.mark.parametrize("mode", aug.BRIGHTNESS_MODES)
def test_jitter_magnitudes_set_each_range(mode):
    b, c, s, h = 0.4, 0.3, 0.2, 0.1
    params = _map_over_seeds(
        lambda seed: tf.stack(
            [
                v
                for k, v in sorted(
                    aug.sample_color_jitter_params(
                        seed, magnitudes=(b, c, s, h), brightness_mode=mode
                    ).items()
                )
                if k != "order"
            ]
        ),
        N_DRAWS,
    )
    names = sorted(["brightness", "contrast", "saturation", "hue"])
    brightness = (max(0.0, 1 - b), 1 + b) if mode == "multiplicative" else (-b, b)
    ranges = {"brightness": brightness, "contrast": (1 - c, 1 + c)}
    ranges.update({"saturation": (1 - s, 1 + s), "hue": (-h, h)})
    for i, name in enumerate(names):
        v, (lo, hi) = params[:, i], ranges[name]
        width = hi - lo
        assert v.min() >= lo - 1e-7 and v.max() <= hi + 1e-7, name
        assert v.min() < lo + 0.01 * width and v.max() > hi - 0.01 * width, name
        assert abs(v.mean() - (lo + hi) / 2) < 5 * width / math.sqrt(12 * N_DRAWS), name


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_strength_is_the_simclr_magnitudes(strength):
    magnitudes = (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    assert aug.jitter_magnitudes(strength) == magnitudes
    x = _image(8, 8, seed=4)
    for i in range(4):
        np.testing.assert_array_equal(
            aug.color_jitter(x, _seed(i), strength=strength),
            aug.color_jitter(x, _seed(i), magnitudes=magnitudes),
        )
    np.testing.assert_array_equal(aug.color_jitter(x, _seed(0), magnitudes=(0, 0, 0, 0)), x)


def test_jitter_magnitude_errors():
    x = _image(2, 2)
    with pytest.raises(ValueError, match="give exactly one"):
        aug.color_jitter(x, _seed(0), strength=0.5, magnitudes=(0.4, 0.4, 0.2, 0.1))
    with pytest.raises(ValueError, match="give exactly one"):
        aug.color_jitter(x, _seed(0))
    with pytest.raises(ValueError, match="jitter_saturation=1.2"):
        aug.color_jitter(x, _seed(0), magnitudes=(0.4, 0.4, 1.2, 0.1))
    with pytest.raises(ValueError, match="jitter_hue=0.6"):
        aug.random_color_jitter(x, _seed(0), magnitudes=(0.4, 0.4, 0.2, 0.6))
    with pytest.raises(ValueError, match="4 numbers"):
        aug.color_jitter(x, _seed(0), magnitudes=(0.4, 0.4))
