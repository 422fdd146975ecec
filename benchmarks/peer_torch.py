"""PyTorch peer of benchmarks/train_step.py: the same SimCLR step on CPU or GPU, for comparison.

  pip install torch==2.13.0   # optional dependency (the CPU build is enough on CPU)
  python benchmarks/peer_torch.py --batch=64 --steps=10 --warmup=2 --threads=2 --json=t.json
  python benchmarks/peer_torch.py --device=cuda --dtype=bfloat16 --batch=512  # CUDA torch

ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool; a projection shortcut on the
first block of every stage, as the reference and simclr_jax; last BN of each block
zero-initialised), the 3-layer BN projection head
(no bias; 512-512-128, last BN without beta), NT-Xent with tau 0.5 over both views (both
views in one forward pass), momentum SGD, channels_last memory format, random data,
torch.set_num_threads(--threads). One image = two views. Written from scratch for this
benchmark (no lightly dependency), so only torch is needed.

On CUDA: cudnn.benchmark on; float32 convolutions and matmuls may use TF32 (as XLA's default
precision on GPUs does; --no_tf32 forbids it); --dtype=bfloat16 runs the network under
torch.autocast (parameters and optimizer stay float32, as flax's dtype=bfloat16 does; the
loss's logits are float32 on both sides);
--compile wraps the model in torch.compile. The step's analytic FLOPs (6 x forward MACs of the
conv and linear layers, counted with forward hooks, per view) give the utilisation against
the vendor's dense peak from train_step.py's table.
"""

import argparse
import functools
import importlib.util
import json
import os
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
    logits = logits - 1e9 * torch.eye(2 * n, dtype=logits.dtype, device=logits.device)
    arange = functools.partial(torch.arange, device=logits.device)
    targets = torch.cat([arange(n, 2 * n), arange(0, n)])
    return functional.cross_entropy(logits, targets)


def forward_macs(model: nn.Module, shape: tuple[int, ...], device) -> float:
    """Forward multiply-accumulates per example (per view) of `model`, from one forward pass
    at `shape` (N, C, H, W) divided by N; nn.Conv2d and nn.Linear layers only (BN, ReLU and
    pooling are not counted, as in train_step.analytic_encoder_macs)."""
    total = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kernel = module.weight[0].numel()  # cin / groups x kh x kw
            total.append(output.numel() * kernel)
        elif isinstance(module, nn.Linear):
            total.append(output.numel() * module.in_features)

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape, device=device).contiguous(memory_format=torch.channels_last))
    model.train()
    for hook in hooks:
        hook.remove()
    return float(sum(total)) / shape[0]


def vendor_peak(device_name: str, dtype: str) -> float | None:
    """The vendor's dense peak FLOP/s of this GPU (train_step.py's table, its one owner), or
    None for a GPU not in it."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
    spec = importlib.util.spec_from_file_location("train_step_peaks", path)
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)  # stdlib imports only at module level
    return train_step.vendor_peak(device_name, dtype)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no_tf32", action="store_true", help="CUDA: float32 without TF32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda: torch sees no CUDA device")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    model = SimCLRNet(args.width).to(device, memory_format=torch.channels_last)
    macs = forward_macs(model, (1, 3, args.image_size, args.image_size), device)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    forward = torch.compile(model) if args.compile else model
    n = args.batch
    shape = (n, 3, args.image_size, args.image_size)
    view1, view2 = torch.rand(shape, device=device), torch.rand(shape, device=device)
    autocast = torch.autocast(args.device, torch.bfloat16, enabled=args.dtype == "bfloat16")

    times = []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        images = torch.cat([view1, view2]).contiguous(memory_format=torch.channels_last)
        with autocast:
            z = forward(images)
        loss = nt_xent(z.float(), n, 0.5)  # float32 logits, as ours
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.detach().item()  # waits for the step to finish
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = 6.0 * macs * 2 * n  # fwd + 2x bwd, two views per image, as train_step.py
    peak = vendor_peak(torch.cuda.get_device_name(), args.dtype) if args.device == "cuda" else None
    if args.device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "system": f"torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "tf32": args.device == "cuda" and args.dtype == "float32" and not args.no_tf32,
        "compiled": args.compile,
        "batch": n,
        "width": args.width,
        "step_s_median": step_s,
        "images_per_s": n / step_s,
        "analytic_fwd_gmacs_per_view": macs / 1e9,
        "achieved_gflop_per_s": flops / step_s / 1e9,
        "utilisation_vs_vendor_peak": flops / step_s / peak if peak else "n/a",
        "peak_memory_mib": memory,
    }
    for key, value in result.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
