r"""Our ResNet-50 export loaded strictly into torchvision.models.resnet50(): do the outputs agree?

torchvision cannot be installed next to this project's CPU torch (it pins another torch), so
this runs in two environments:

  # 1. This project's environment: a random ResNet-50 (random BN statistics too), exported in
  #    both PyTorch formats, with our Flax encoder's h on a few images.
  python benchmarks/torchvision_parity.py write --dir=/tmp/tvcheck
  # 2. A throwaway one with torchvision (and nothing of ours but simclr_jax/torch_resnet.py):
  python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
      numpy safetensors
  PYTHONPATH=$PWD /tmp/tv/bin/python benchmarks/torchvision_parity.py check --dir=/tmp/tvcheck

`check` loads each file with load_state_dict(strict=True) into resnet50() whose fc is
nn.Identity (the export has no fc), and prints max |h_torchvision - h_ours| with torchvision's
own max-pool and with simclr_jax.torch_resnet.SamePadMaxPool in its place. Results are in
docs/torch_export.md.
"""

import argparse
import os
import sys

import numpy as np

SIZES = (64, 224)


def write(out_dir: str) -> None:
    import jax
    import ml_collections as mlc

    from simclr_jax import models, torch_export

    cfg = mlc.ConfigDict(
        {"depth": 50, "width_multiplier": 1, "cifar_stem": False, "sk_ratio": 0.0,
         "bn_epsilon": 1e-5, "bn_momentum": 0.9, "dtype": "float32"}
    )  # fmt: skip
    encoder = models.build_encoder(cfg)
    rng = np.random.default_rng(0)
    variables = encoder.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False)

    def randomise(path, leaf):  # BN scale/bias/mean/var away from their initial 1/0/0/1
        ranges = {"scale": (0.2, 0.6), "bias": (-0.2, 0.2), "mean": (-0.2, 0.2), "var": (0.5, 2)}
        low_high = ranges.get(path[-1].key)
        return leaf if low_high is None else rng.uniform(*low_high, leaf.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(randomise, variables)
    state = torch_export.torchvision_state_dict(variables["params"], variables["batch_stats"])
    os.makedirs(out_dir, exist_ok=True)
    torch_export.save_state_dict(state, f"{out_dir}/r50.pt", "torchvision", {})
    torch_export.save_state_dict(state, f"{out_dir}/r50.safetensors", "safetensors", {})
    reference = {}
    for size in SIZES:
        x = rng.uniform(0, 1, (2, size, size, 3)).astype(np.float32)
        reference[f"x{size}"] = x
        reference[f"h{size}"] = np.asarray(encoder.apply(variables, x, train=False))
    np.savez(f"{out_dir}/reference.npz", **reference)
    print(f"wrote {out_dir}/r50.pt, r50.safetensors, reference.npz")


def check(out_dir: str) -> None:
    import torch
    import torchvision
    from safetensors.torch import load_file

    from simclr_jax.torch_resnet import SamePadMaxPool  # imports torch only

    reference = np.load(f"{out_dir}/reference.npz")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    for name, state in (
        ("r50.pt", torch.load(f"{out_dir}/r50.pt", weights_only=True)),
        ("r50.safetensors", load_file(f"{out_dir}/r50.safetensors")),
    ):
        model = torchvision.models.resnet50()
        model.fc = torch.nn.Identity()
        print(f"{name}: load_state_dict(strict=True): {model.load_state_dict(state, strict=True)}")
        model.eval()
        for size in SIZES:
            x = torch.from_numpy(np.transpose(reference[f"x{size}"], (0, 3, 1, 2)).copy())
            h = reference[f"h{size}"]
            errors = []
            for pool in (torch.nn.MaxPool2d(3, 2, padding=1), SamePadMaxPool()):
                model.maxpool = pool
                with torch.no_grad():
                    errors.append(np.abs(model(x).numpy() - h).max())
            print(
                f"  {size} px, max |h| {np.abs(h).max():.3f}: max abs error with torchvision's "
                f"max-pool {errors[0]:.2e}, with SamePadMaxPool {errors[1]:.2e}"
            )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("write", "check"))
    parser.add_argument("--dir", default="/tmp/tvcheck")
    args = parser.parse_args(argv)
    (write if args.mode == "write" else check)(args.dir)


if __name__ == "__main__":
    main(sys.argv[1:])
