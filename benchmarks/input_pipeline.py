"""Host input-pipeline throughput of the SimCLR two-view augmentation (tf.data).

  python benchmarks/input_pipeline.py [--seconds=10] [--threads=1,2] \
      [--recipes=cifar,imagenet_noblur,imagenet] [--json=input_pipeline.json]

Recipes (augmentation from simclr_jax.data.views.default_augment_config):
  cifar            32 px, jitter 0.5, no blur; the embedded CIFAR-10 sample's
                   train images, decoded once and held in memory.
  imagenet_noblur  224 px, jitter 1.0, blur off; synthetic JPEGs of 300-500 px
                   (smooth random content, quality 90) read and decoded per element.
  imagenet         the same with blur p = 0.5 (kernel 22 -> 23 taps), on the host.

Per element: [read + decode] -> two pretrain_view calls with seeds split from
[seed, element index] -> batch. "T threads" means tf.data's private thread pool
has T threads, map runs T elements in parallel and each op is single-threaded
(max_intra_op_parallelism = 1), i.e. T host cores' worth of work. Reported:
images/s (each image yields two views; best of 3 timing windows and the mean),
process CPU ms per image (robust to other load on a shared machine), and the
process's peak RSS so far (resource.getrusage; cumulative over the runs).
"""

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from simclr_jax.data import views
from simclr_jax.data.preview import load_embedded_images

RECIPES = {
    # name: (image_size, jitter_strength, blur_prob, batch size)
    "cifar": (32, 0.5, 0.0, 256),
    "imagenet_noblur": (224, 1.0, 0.0, 32),
    "imagenet": (224, 1.0, 0.5, 32),
}


def write_synthetic_jpegs(directory, num_images, seed=0):
    """Writes JPEGs of random size 300-500 px with smooth random content.

    Smooth content (upsampled coarse noise plus mild pixel noise) keeps file
    sizes and decode cost close to natural photos; pure noise would inflate both.

    Args:
      directory: where to write img_XXXX.jpg.
      num_images: how many files.
      seed: NumPy seed.

    Returns:
      (list of paths, mean file size in bytes).
    """
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        h, w = rng.integers(300, 501, size=2)
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((int(w), int(h)), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"img_{i:04d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths, float(np.mean([os.path.getsize(p) for p in paths]))


def build_dataset(source, cfg, *, threads, batch_size, decode, seed=0):
    """Repeating dataset of batched view pairs, seeds from the element index.

    Args:
      source: tf.data.Dataset of uint8 images, or of JPEG paths when `decode`.
      cfg: augmentation config.
      threads: tf.data private thread pool size and map parallelism.
      batch_size: images per batch.
      decode: read and decode JPEG files per element.
      seed: base seed.

    Returns:
      A tf.data.Dataset of (views1, views2), each [batch, S, S, 3] float32.
    """

    def two_views(index, item):
        image = tf.io.decode_jpeg(tf.io.read_file(item), channels=3) if decode else item
        seeds = tf.random.experimental.stateless_split(
            tf.stack([tf.constant(seed, tf.int64), index]), 2
        )
        return views.pretrain_view(image, seeds[0], cfg), views.pretrain_view(image, seeds[1], cfg)

    ds = source.repeat().enumerate().map(two_views, num_parallel_calls=threads)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def measure(ds, *, seconds, batch_size, windows=3, warmup_batches=2):
    """Times the dataset in `windows` consecutive windows after a warm-up.

    On a shared machine, wall-clock rates vary with other load; the best window
    and the process CPU time per image (which contention inflates much less)
    are both reported.

    Args:
      ds: batched dataset.
      seconds: total measuring time, split evenly over the windows.
      batch_size: images per batch.
      windows: number of timing windows.
      warmup_batches: batches consumed before timing (tracing, thread start).

    Returns:
      dict with images_per_s (best window), images_per_s_mean (all windows)
      and cpu_ms_per_image (process CPU time over all windows).
    """
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    rates, total_images = [], 0
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(windows):
        batches, start = 0, time.perf_counter()
        while batches < 2 or time.perf_counter() - start < seconds / windows:
            next(it)
            batches += 1
        rates.append(batches * batch_size / (time.perf_counter() - start))
        total_images += batches * batch_size
    wall = time.perf_counter() - wall_start
    return {
        "images_per_s": max(rates),
        "images_per_s_mean": total_images / wall,
        "cpu_ms_per_image": 1000 * (time.process_time() - cpu_start) / total_images,
    }


def peak_rss_mib():
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    """Runs the requested recipes and thread counts; prints and optionally saves JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--num_jpegs", type=int, default=200)
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise ValueError(f"--recipes={args.recipes!r}: unknown {unknown}; allowed: {list(RECIPES)}")
    thread_counts = [int(t) for t in args.threads.split(",")]

    info = {
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_start": os.getloadavg(),
    }
    print(f"tf {info['tensorflow']}, {info['cpu_count']} CPUs, load {info['load_average_start']}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cifar_images = jpeg_paths = None
        for name in recipes:
            size, strength, blur_prob, batch_size = RECIPES[name]
            cfg = views.default_augment_config(size, jitter_strength=strength, blur_prob=blur_prob)
            decode = name != "cifar"
            if decode and jpeg_paths is None:
                jpeg_paths, mean_bytes = write_synthetic_jpegs(tmp, args.num_jpegs)
                info["synthetic_jpeg_mean_kb"] = mean_bytes / 1024
                print(f"wrote {len(jpeg_paths)} JPEGs, mean {mean_bytes / 1024:.0f} KiB")
            if not decode and cifar_images is None:
                cifar_images, _, _ = load_embedded_images()
            source = tf.data.Dataset.from_tensor_slices(jpeg_paths if decode else cifar_images)
            for threads in thread_counts:
                ds = build_dataset(
                    source, cfg, threads=threads, batch_size=batch_size, decode=decode
                )
                timing = measure(ds, seconds=args.seconds, batch_size=batch_size)
                row = {
                    "recipe": name,
                    "image_size": size,
                    "blur_prob": blur_prob,
                    "threads": threads,
                    "batch_size": batch_size,
                    **timing,
                    "peak_rss_mib": peak_rss_mib(),
                }
                results.append(row)
                print(
                    f"{name:16s} {size:3d}px threads={threads}: "
                    f"{timing['images_per_s']:7.1f} images/s best window "
                    f"({timing['images_per_s_mean']:7.1f} mean), "
                    f"{timing['cpu_ms_per_image']:6.2f} CPU ms/image, "
                    f"peak RSS {row['peak_rss_mib']:.0f} MiB"
                )
    info["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
