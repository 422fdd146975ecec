r"""lightly's SimCLR on the harness's data subset: the lightly side of quality_vs_lightly.py.

Run by benchmarks/quality_vs_lightly.py (--role=lightly) under an interpreter with torch,
torchvision and lightly (an optional extra, never a dependency of the library). The recipe's
constants are the driver's, so both sides read one definition; docs/quality_vs_lightly.md
lists what each lightly component corresponds to on ours.
"""

import argparse
import math
import os
import time

from quality_vs_lightly import (
    BASE_LR,
    EVAL_BATCH,
    HEAD_DIM,
    HEAD_LAYERS,
    INSTALL_HINT,
    JITTER_STRENGTH,
    KNN_K,
    KNN_TEMPERATURE,
    LOSS_SCALE,
    MOMENTUM,
    TEMPERATURE,
    TRUST_COEFFICIENT,
    WEIGHT_DECAY,
    HarnessError,
    schedule,
)


def _import_lightly_stack():
    try:
        import lightly
        import torch
        import torchvision
    except ImportError as e:
        raise HarnessError(
            f"the lightly side needs torch, torchvision and lightly ({e}); {INSTALL_HINT}"
        ) from None
    return torch, torchvision, lightly


def build_torchvision_resnet18(width: int):
    """torchvision's ResNet-18 layout at base width `width`, CIFAR stem, torchvision's init.

    At width 64 it is torchvision.models.resnet18() with conv1 = 3x3 stride 1 and maxpool =
    Identity (what lightly's CIFAR-10 benchmarks use), fc removed: the output is h.
    """
    torch, torchvision, _ = _import_lightly_stack()
    from torch import nn
    from torchvision.models.resnet import BasicBlock, conv1x1

    layers, cin = (
        [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()],
        width,
    )
    for stage in range(4):
        cout = width * 2**stage
        for index in range(2):
            stride = 2 if stage > 0 and index == 0 else 1
            downsample = None
            if stride != 1 or cin != cout:  # torchvision: no projection on the first stage
                downsample = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
            layers.append(BasicBlock(cin, cout, stride, downsample))
            cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for m in model.modules():  # torchvision.models.ResNet's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model, cin


def run_lightly_simclr(args: argparse.Namespace, data_root: str, seed: int) -> dict:
    """lightly's SimCLR on the subset: pretrain, then kNN and the online probe on test."""
    torch, torchvision, lightly = _import_lightly_stack()
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.transforms import SimCLRTransform
    from lightly.utils.benchmarking import OnlineLinearClassifier, knn_predict
    from lightly.utils.lars import LARS
    from torch.nn import functional

    torch.manual_seed(seed)
    device = args.lightly_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    transform = SimCLRTransform(
        input_size=32,
        cj_prob=0.8,
        cj_strength=JITTER_STRENGTH,
        min_scale=0.08,
        random_gray_scale=0.2,
        gaussian_blur=0.0,
        hf_prob=0.5,
        normalize=None,
    )
    train_set = torchvision.datasets.ImageFolder(os.path.join(data_root, "train"), transform)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.lightly_workers,
        persistent_workers=args.lightly_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    steps_per_epoch, total_steps, warmup_steps = schedule(len(train_set), args)

    encoder, feature_dim = build_torchvision_resnet18(args.width)
    head = SimCLRProjectionHead(feature_dim, feature_dim, HEAD_DIM, num_layers=HEAD_LAYERS)
    probe = OnlineLinearClassifier(feature_dim=feature_dim, num_classes=len(train_set.classes))
    encoder, head, probe = encoder.to(device), head.to(device), probe.to(device)
    criterion = NTXentLoss(temperature=TEMPERATURE)
    decayed, not_decayed = get_weight_decay_parameters([encoder, head])
    peak_lr = BASE_LR * args.batch / 256
    optimizer = LARS(
        [
            {"params": decayed},
            {"params": not_decayed, "weight_decay": 0.0},
            {"params": probe.parameters(), "weight_decay": 0.0},
        ],
        lr=peak_lr,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        trust_coefficient=TRUST_COEFFICIENT,
    )

    def lr_factor(step: int) -> float:  # our schedule (simclr_jax.optim.warmup_cosine_schedule)
        if step < warmup_steps:
            return step / warmup_steps
        if step >= total_steps:
            return 0.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    step, timed_steps, timed_s, losses = 0, 0, 0.0, []
    for module in (encoder, head, probe):
        module.train()
    while step < total_steps:
        tick = time.perf_counter()
        for (view1, view2), labels in loader:
            view1, view2, labels = view1.to(device), view2.to(device), labels.to(device)
            if args.lightly_views == "joint":
                h = encoder(torch.cat([view1, view2]))
                z0, z1 = head(h).chunk(2)
            else:
                h = torch.cat([encoder(view1), encoder(view2)])
                z0, z1 = head(h[: len(view1)]), head(h[len(view1) :])
            loss = criterion(z0, z1)
            probe_loss = functional.cross_entropy(probe(h), torch.cat([labels, labels]))
            optimizer.zero_grad(set_to_none=True)
            (LOSS_SCALE * loss + probe_loss).backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())  # waits for the step
            now = time.perf_counter()
            if step > 0:  # the first step pays for start-up, as our compile step
                timed_steps, timed_s = timed_steps + 1, timed_s + now - tick
            tick, step = now, step + 1
            if step % 50 == 0 or step == total_steps:
                print(f"[lightly step {step}/{total_steps}] loss {loss.item():.4f}", flush=True)
            if step == total_steps:
                break

    encoder.eval()
    probe.eval()
    plain = torchvision.transforms.ToTensor()

    @torch.no_grad()
    def features(split: str):
        dataset = torchvision.datasets.ImageFolder(os.path.join(data_root, split), plain)
        rows, labels = [], []
        for images, y in torch.utils.data.DataLoader(dataset, batch_size=EVAL_BATCH):
            rows.append(encoder(images.to(device)))
            labels.append(y.to(device))
        return torch.cat(rows), torch.cat(labels)

    memory, memory_labels = features("train")
    queries, query_labels = features("test")
    with torch.no_grad():
        predicted = knn_predict(
            functional.normalize(queries, dim=1),
            functional.normalize(memory, dim=1).T.contiguous(),
            memory_labels,
            num_classes=len(train_set.classes),
            knn_k=KNN_K,
            knn_t=KNN_TEMPERATURE,
        )
        probe_top1 = (probe(queries).argmax(1) == query_labels).float().mean().item()
    return {
        "knn_top1": (predicted[:, 0] == query_labels).float().mean().item(),
        "probe_top1": probe_top1,
        "images_per_sec": timed_steps * args.batch / timed_s if timed_s else math.nan,
        "steps": step,
        "last_loss": losses[-1],
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "lightly": lightly.__version__,
        },
        "device": device,
        "threads": torch.get_num_threads(),
    }
