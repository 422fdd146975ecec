"""PyTorch peer of benchmarks/train_step.py: the same SimCLR step on CPU, for comparison.

  pip install torch==2.13.0   # optional dependency, CPU build
  python benchmarks/peer_torch.py --batch=64 --steps=10 --warmup=2 --threads=2 --json=t.json

ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool; a projection shortcut on the
first block of every stage, as the reference and simclr_jax; last BN of each block
zero-initialised), the 3-layer BN projection head
(no bias; 512-512-128, last BN without beta), NT-Xent with tau 0.5 over both views (both
views in one forward pass), momentum SGD, channels_last memory format, random data,
torch.set_num_threads(--threads). One image = two views. Written from scratch for this
benchmark (no lightly dependency), so only torch is needed.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
        nn.init.zeros_(self.bn2.weight)
        self.shortcut = nn.Identity()
        if projection:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = functional.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return functional.relu(y + self.shortcut(x))


class SimCLRNet(nn.Module):
    """ResNet-18 CIFAR encoder + 3-layer BN projection head."""

    def __init__(self, width: int = 64, head_dim: int = 128):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for stage in range(4):
            cout = width * 2**stage
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(cin, cout, stride, projection=index == 0))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        last_bn = nn.BatchNorm1d(head_dim, affine=True)
        last_bn.bias.requires_grad_(False)  # BN without beta, as the reference head
        self.head = nn.Sequential(
            nn.Linear(cin, cin, bias=False),
            nn.BatchNorm1d(cin),
            nn.ReLU(),
            nn.Linear(cin, cin, bias=False),
            nn.BatchNorm1d(cin),
            nn.ReLU(),
            nn.Linear(cin, head_dim, bias=False),
            last_bn,
        )

    def forward(self, x):
        h = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.head(h)


def nt_xent(z: torch.Tensor, n: int, temperature: float) -> torch.Tensor:
    """Paper NT-Xent over 2n anchors; z holds view 1 rows then view 2 rows."""
    z = functional.normalize(z, dim=1)
    logits = z @ z.t() / temperature
    logits = logits - 1e9 * torch.eye(2 * n, dtype=logits.dtype)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return functional.cross_entropy(logits, targets)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = SimCLRNet(args.width).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    n = args.batch
    shape = (n, 3, args.image_size, args.image_size)
    view1, view2 = torch.rand(shape), torch.rand(shape)

    times = []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        images = torch.cat([view1, view2]).contiguous(memory_format=torch.channels_last)
        loss = nt_xent(model(images), n, 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.detach().item()  # waits for the step to finish
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    result = {
        "system": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "batch": n,
        "width": args.width,
        "step_s_median": step_s,
        "images_per_s": n / step_s,
        "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for key, value in result.items():
        print(f"{key:20s} {value:.4g}" if isinstance(value, float) else f"{key:20s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
