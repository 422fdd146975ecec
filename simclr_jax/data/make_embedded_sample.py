"""Builds the embedded CIFAR-10 sample shipped inside the package.

The sample is a class-balanced, seeded subset of the CIFAR-10 training images
(a .tar.gz of JPEG class folders, <top>/<class>/<name>.jpg), stored as the original JPEG
bytes so nothing is re-encoded. It is split into a 'train' and a disjoint 'test'
part so the quickstart can report held-out accuracy with no network.

  python -m simclr_jax.data.make_embedded_sample \
      --src=cifar10-jpeg/train.tar.gz \
      --out=simclr_jax/data/assets/cifar10_sample.npz
"""

import argparse
import io
import tarfile

import numpy as np

CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def build_sample(src: str, train_per_class: int, test_per_class: int, seed: int) -> dict:
    """Reads the archive and returns the arrays stored in the .npz file.

    Args:
      src: path to train.tar.gz holding train/<class>/<NNNN>.jpg.
      train_per_class: images per class in the 'train' split.
      test_per_class: images per class in the disjoint 'test' split.
      seed: seed of the per-class selection.

    Returns:
      A dict of NumPy arrays: jpeg bytes concatenated, offsets, labels, split ids.
    """
    by_class = {name: {} for name in CLASS_NAMES}
    with tarfile.open(src) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-2] not in by_class:
                continue
            by_class[parts[-2]][parts[-1]] = tar.extractfile(member).read()
    rng = np.random.default_rng(seed)
    blobs, labels, splits, names = [], [], [], []
    for label, name in enumerate(CLASS_NAMES):
        files = sorted(by_class[name])
        need = train_per_class + test_per_class
        if len(files) < need:
            raise ValueError(f"class {name!r} has {len(files)} images, need {need}")
        chosen = rng.choice(len(files), size=need, replace=False)
        for i, idx in enumerate(chosen):
            blobs.append(by_class[name][files[idx]])
            labels.append(label)
            splits.append(0 if i < train_per_class else 1)
            names.append(f"{name}/{files[idx]}")
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return {
        "jpeg": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "offsets": offsets,
        "labels": np.asarray(labels, np.int32),
        "split": np.asarray(splits, np.int8),
        "filenames": np.asarray(names),
        "class_names": np.asarray(CLASS_NAMES),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", required=True, help="a .tar.gz of CIFAR-10 training JPEGs in class folders"
    )
    parser.add_argument("--out", default="simclr_jax/data/assets/cifar10_sample.npz")
    parser.add_argument("--train_per_class", type=int, default=400)
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arrays = build_sample(args.src, args.train_per_class, args.test_per_class, args.seed)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with open(args.out, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {args.out}: {len(arrays['labels'])} images, {len(buf.getvalue()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
