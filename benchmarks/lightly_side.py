r"""The lightly side of quality_vs_lightly.py: data, encoder, optimiser, loop and evaluation.

Run by benchmarks/quality_vs_lightly.py (--role=lightly) under an interpreter with torch,
torchvision and lightly (an optional extra, never a dependency of the library). Everything a
method's counterpart shares lives here; the method's own modules, loss and momentum updates
are in benchmarks/lightly_methods.py. The recipe (optimiser, learning rate, weight decay,
warmup, each view's augmentations, the method's fields) is our config resolved with the
harness's overrides (quality_vs_lightly.py --role=recipe), so both sides read one definition.
docs/quality_vs_lightly.md lists what each lightly component corresponds to on ours.
"""

import argparse
import math
import os
import random
import time

from quality_recipe import (
    EVAL_BATCH,
    INSTALL_HINT,
    KNN_K,
    KNN_TEMPERATURE,
    HarnessError,
    check_lightly_recipe,
    schedule,
)


def import_lightly_stack():
    """(torch, torchvision, lightly); HarnessError with the install command if one is missing."""
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
    Returns (module, feature dimension = 8 x width).
    """
    torch, torchvision, _ = import_lightly_stack()
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


def view_options(view: dict, image_size: int) -> dict:
    """The keyword arguments of lightly's view transforms for one of our resolved views.

    `view` is simclr_jax.data.views.view_recipe's dict (in the recipe JSON), whose crop
    quality_recipe.check_lightly_recipe accepted (lightly's transforms take the lower area
    only). The arguments are those SimCLRTransform, BYOLView1Transform and BYOLView2Transform
    share; the jitter magnitudes are passed as they are (cj_strength 1).
    """
    brightness, contrast, saturation, hue = view["jitter_magnitudes"]
    return dict(
        input_size=image_size,
        cj_prob=view["jitter_prob"],
        cj_strength=1.0,
        cj_bright=brightness,
        cj_contrast=contrast,
        cj_sat=saturation,
        cj_hue=hue,
        min_scale=view["crop_area_range"][0],
        random_gray_scale=view["grayscale_prob"],
        gaussian_blur=view["blur_prob"],
        sigmas=tuple(view["blur_sigma_range"]),
        hf_prob=view["flip_prob"],
        normalize=None,
    )


def encode(encoder, view1, view2, joint: bool):
    """(h1, h2): both views in one pass (BN over 2n, as ours) or one pass per view."""
    if joint:
        import torch

        return encoder(torch.cat([view1, view2])).chunk(2)
    return encoder(view1), encoder(view2)


def build_optimizer(recipe: dict, trainable, probe):
    """lightly's LARS or torch's SGD from recipe['optim'] at recipe['peak_lr'] (our
    simclr_jax.optim.peak_learning_rate of the recipe's batch); returns (optimizer, peak LR).

    Weight decay on neither BN parameters nor biases (lightly's get_weight_decay_parameters,
    as our optimiser masks them). The probe trains at the same LR and is decayed as ours
    (simclr_jax.optim.create_optimizer): under LARS not at all (in its own group with weight
    decay 0, which lightly's LARS also leaves without trust ratio), under SGD its kernel
    (coupled L2, as every kernel) but not its bias. The recipe is one check_lightly_recipe
    accepted.
    """
    torch, _, _ = import_lightly_stack()
    from lightly.models.utils import get_weight_decay_parameters
    from lightly.utils.lars import LARS

    optim = recipe["optim"]
    peak_lr = recipe["peak_lr"]
    probe_decayed = optim["name"] != "lars"
    decayed, not_decayed = get_weight_decay_parameters(
        [*trainable, probe] if probe_decayed else trainable
    )
    groups = [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]
    if not probe_decayed:
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0})
    if optim["name"] == "lars":
        optimizer = LARS(
            groups,
            lr=peak_lr,
            momentum=optim["momentum"],
            weight_decay=optim["weight_decay"],
            trust_coefficient=optim["trust_coefficient"],
        )
    elif optim["name"] == "sgd":
        optimizer = torch.optim.SGD(
            groups,
            lr=peak_lr,
            momentum=optim["momentum"],
            weight_decay=optim["weight_decay"],
            nesterov=bool(optim.get("nesterov", False)),
        )
    else:
        raise AssertionError(optim["name"])  # check_lightly_recipe refused it
    return optimizer, peak_lr


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Our schedule's factor (simclr_jax.optim.warmup_cosine_schedule) for torch's LambdaLR."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if step >= total_steps:
            return 0.0
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def run(args: argparse.Namespace, data_root: str, seed: int, recipe: dict, build_method) -> dict:
    """Pretrains build_method's counterpart on the subset, then kNN and the online probe.

    build_method(recipe, encoder, feature_dim, total_steps, joint) returns a
    lightly_methods.Counterpart: `transform` (image -> [view1, view2]), `modules` (its
    trainable online modules besides the encoder, for the optimiser), `all_modules` (every
    module that switches between training and evaluation, momentum copies included),
    `before_step(step)`, `loss(view1, view2) -> (loss, h)` with h [2n, feature_dim] of both
    views, and `loss_scale` (the printed and reported loss is loss / loss_scale, the
    method's own loss, as our side reports it).
    """
    torch, torchvision, lightly = import_lightly_stack()
    import numpy as np
    from lightly.utils.benchmarking import OnlineLinearClassifier, knn_predict
    from torch.nn import functional

    check_lightly_recipe(recipe)
    # torch's RNG draws the initialisation and the crops; lightly's RandomSolarization and
    # GaussianBlur draw from numpy's, in the loading process (workers reseed their own).
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    device = args.lightly_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, feature_dim = build_torchvision_resnet18(args.width)
    num_train = len(torchvision.datasets.ImageFolder(os.path.join(data_root, "train")))
    _, total_steps, warmup_steps = schedule(
        num_train, args, warmup_epochs=recipe["optim"]["warmup_epochs"]
    )
    method = build_method(recipe, encoder, feature_dim, total_steps, args.lightly_views == "joint")
    train_set = torchvision.datasets.ImageFolder(os.path.join(data_root, "train"), method.transform)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.lightly_workers,
        persistent_workers=args.lightly_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    probe = OnlineLinearClassifier(feature_dim=feature_dim, num_classes=len(train_set.classes))
    for module in (*method.all_modules, probe):
        module.to(device)
    optimizer, _ = build_optimizer(recipe, [encoder, *method.modules], probe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps)
    )
    step, timed_steps, timed_s, losses = 0, 0, 0.0, []
    for module in (*method.all_modules, probe):
        module.train()
    while step < total_steps:
        tick = time.perf_counter()
        for (view1, view2), labels in loader:
            view1, view2, labels = view1.to(device), view2.to(device), labels.to(device)
            method.before_step(step)
            loss, h = method.loss(view1, view2)
            probe_loss = functional.cross_entropy(probe(h.detach()), torch.cat([labels, labels]))
            optimizer.zero_grad(set_to_none=True)
            (loss + probe_loss).backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item() / method.loss_scale)  # waits for the step
            now = time.perf_counter()
            if step > 0:  # the first step pays for start-up, as our compile step
                timed_steps, timed_s = timed_steps + 1, timed_s + now - tick
            tick, step = now, step + 1
            if step % 50 == 0 or step == total_steps:
                print(f"[lightly step {step}/{total_steps}] loss {losses[-1]:.4f}", flush=True)
            if not math.isfinite(losses[-1]):
                raise HarnessError(f"lightly side: the loss is {losses[-1]} at step {step}")
            if step == total_steps:
                break

    for module in (*method.all_modules, probe):
        module.eval()
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
