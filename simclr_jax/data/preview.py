"""Writes a PNG grid of original images next to two SimCLR pretraining views.

  python -m simclr_jax.data.preview --config=configs/cifar10.py --out=views.png --num_images=8

Each row shows an original image, then the two views from views.pretrain_view
with the config's `augment` section, view k with view k's recipe; the caption
above each view column lists that recipe (blur, solarisation, jitter, grayscale
and flip probabilities, the jitter magnitudes), so a recipe, and which view gets
the asymmetric ops, can be checked by eye. The images
come from the CIFAR-10 sample embedded in the package (no download): used when
config.data.source is 'embedded' or the config has no `data` section, and as a
fallback (with a printed note) for any other source. Without --config the
32-pixel CIFAR recipe (jitter strength 0.5, no blur) is used. A config path may
end in ':arg', passed to get_config(arg), as with ml_collections config flags.
"""

import argparse
import importlib.util
import math
import os

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from simclr_jax.data import views as views_lib
from simclr_jax.data.sources import embedded

COLUMNS = ("original", "view 1", "view 2")
# Layout in pixels: gap between cells, height of the header (column title and up
# to CAPTION_LINES lines of recipe caption), height of one text line, smallest
# cell side (32-pixel images are upscaled by an integer factor so they stay sharp).
PAD = 4
LINE = 12
CAPTION_LINES = 4
HEADER = 4 + (1 + CAPTION_LINES) * LINE
MIN_CELL = 128


def load_embedded_images(num_images=None, *, split=0, interleave_classes=False):
    """Decodes images of the embedded CIFAR-10 sample.

    Args:
      num_images: how many to return; None for all.
      split: 0 for the sample's train part, 1 for its test part.
      interleave_classes: order as the first image of each class, then the
        second, ... (the stored order is grouped by class).

    Returns:
      (images uint8 [n, 32, 32, 3], labels int32 [n], class_names tuple of str).
    """
    with np.load(embedded.embedded_sample_path()) as data:
        offsets, jpeg = data["offsets"], data["jpeg"]
        index = np.flatnonzero(data["split"] == split)
        if interleave_classes:
            labels = data["labels"][index]
            rank = np.zeros(len(index), np.int64)
            for c in np.unique(labels):
                rank[labels == c] = np.arange(np.sum(labels == c))
            index = index[np.lexsort((labels, rank))]
        labels = data["labels"][index]
        class_names = tuple(str(c) for c in data["class_names"])
    if num_images is not None:
        if num_images < 1 or num_images > len(index):
            raise ValueError(f"num_images={num_images}: allowed range is [1, {len(index)}]")
        index, labels = index[:num_images], labels[:num_images]
    images = [
        tf.io.decode_jpeg(jpeg[offsets[i] : offsets[i + 1]].tobytes(), channels=3).numpy()
        for i in index
    ]
    return np.stack(images), labels, class_names


def load_config(spec):
    """Loads configs/<x>.py[:arg] and returns get_config() or get_config(arg).

    Args:
      spec: path to a Python file defining get_config, optionally ':arg'.

    Returns:
      The ConfigDict returned by get_config.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"--config={spec!r}: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_preview_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def cell_size(image_size):
    """Side in pixels of one grid cell for a given view size."""
    return image_size * max(1, math.ceil(MIN_CELL / image_size))


def make_views(images, cfg, seed=0):
    """Two pretraining views per image; view k of image i uses split([seed, i])[k] and
    view k's recipe.

    Args:
      images: uint8 or float [n, H, W, 3].
      cfg: augmentation config.
      seed: integer base seed.

    Returns:
      Two float32 arrays [n, image_size, image_size, 3] in [0, 1].
    """
    views = ([], [])
    for i, image in enumerate(images):
        seeds = tf.random.experimental.stateless_split(tf.constant([seed, i], tf.int64), 2)
        for k in range(2):
            views[k].append(views_lib.pretrain_view(image, seeds[k], cfg, view=k + 1).numpy())
    return np.stack(views[0]), np.stack(views[1])


def describe_recipe(cfg, view):
    """The caption of one view column: its recipe as comma-separated 'name value' items.

    Args:
      cfg: augmentation config.
      view: 1 or 2.

    Returns:
      e.g. 'blur 1.0, solarize 0.0, jitter 0.8, b/c/s/h 0.4/0.4/0.2/0.1 additive,
      gray 0.2, flip 0.5'.
    """
    r = views_lib.view_recipe(cfg, view)

    def num(name):
        return float(r[name])

    magnitudes = "/".join(str(float(m)) for m in r["jitter_magnitudes"])
    return (
        f"blur {num('blur_prob')}, solarize {num('solarize_prob')}, "
        f"jitter {num('jitter_prob')}, b/c/s/h {magnitudes} {r['brightness_mode']}, "
        f"gray {num('grayscale_prob')}, flip {num('flip_prob')}"
    )


def _wrap(draw, text, width, max_lines):
    """Greedy word wrap of `text` into at most max_lines lines of `width` pixels ('...' cut)."""
    lines = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + " ..."
    return lines


def _to_cell(image, cell):
    """Scales an image (uint8 or float in [0, 1]) to fit a cell, centred, nearest."""
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    pil = Image.fromarray(image)
    scale = cell / max(pil.size)
    pil = pil.resize(
        (max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
        Image.Resampling.NEAREST,
    )
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(pil, ((cell - pil.width) // 2, (cell - pil.height) // 2))
    return canvas


def render_grid(originals, views1, views2, cell, captions=("", "")):
    """Lays out rows of (original, view 1, view 2) with titles and captions on white.

    Args:
      originals: sequence of uint8 [H, W, 3] images.
      views1: float [n, S, S, 3] in [0, 1].
      views2: float [n, S, S, 3] in [0, 1].
      cell: cell side in pixels.
      captions: the text under the titles of the view 1 and view 2 columns
        (describe_recipe), wrapped to the cell width in up to CAPTION_LINES lines.

    Returns:
      A PIL RGB image of width 3 * cell + 4 * PAD and height
      HEADER + n * (cell + PAD) + PAD.
    """
    n = len(originals)
    width = len(COLUMNS) * cell + (len(COLUMNS) + 1) * PAD
    height = HEADER + n * (cell + PAD) + PAD
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for col, (title, caption) in enumerate(zip(COLUMNS, ("", *captions), strict=True)):
        left = PAD + col * (cell + PAD)
        draw.text((left, 4), title, fill=(0, 0, 0))
        for i, line in enumerate(_wrap(draw, caption, cell, CAPTION_LINES) if caption else ()):
            draw.text((left, 4 + (i + 1) * LINE), line, fill=(80, 80, 80))
    for row, images in enumerate(zip(originals, views1, views2, strict=True)):
        top = HEADER + row * (cell + PAD)
        for col, image in enumerate(images):
            grid.paste(_to_cell(np.asarray(image), cell), (PAD + col * (cell + PAD), top))
    return grid


def main(argv=None):
    """Parses flags, writes the grid and returns the output path.

    Args:
      argv: command-line arguments without the program name; None for sys.argv.

    Returns:
      The path of the written PNG.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="configs/<x>.py[:arg]")
    parser.add_argument("--out", default="views.png", help="output PNG path")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.config is None:
        cfg = views_lib.default_augment_config(32, jitter_strength=0.5, blur_prob=0.0)
    else:
        config = load_config(args.config)
        if "augment" not in config:
            raise ValueError(f"--config={args.config!r} has no 'augment' section")
        cfg = config.augment
        source = config.data.get("source", "embedded") if "data" in config else "embedded"
        if source != "embedded":
            print(
                f"note: config.data.source={source!r}; the preview uses the embedded "
                "CIFAR-10 sample instead (no download)."
            )
    views_lib.validate_augment_config(cfg)
    images, _, _ = load_embedded_images(args.num_images, interleave_classes=True)
    views1, views2 = make_views(images, cfg, args.seed)
    captions = tuple(describe_recipe(cfg, view) for view in (1, 2))
    grid = render_grid(images, views1, views2, cell_size(cfg.image_size), captions)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}: {len(images)} rows of (original, 2 views), {grid.size} px")
    for view, caption in enumerate(captions, 1):
        print(f"view {view}: {caption}")
    return args.out


if __name__ == "__main__":
    main()
