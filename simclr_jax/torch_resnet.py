"""A plain-PyTorch copy of our ResNet encoder, for weights exported in torchvision's layout.

Imports torch at import time: only simclr_jax.torch_export imports it, and only when asked to
build a model (torch is the optional extra `pip install -e '.[torch]'`). It needs no
torchvision. Module and parameter names are torchvision's (conv1, bn1, layer1.0.conv1, ...,
layerN.0.downsample.{0,1}), so `load_state_dict(..., strict=True)` takes an export unchanged.

Where it differs from torchvision.models.ResNet, and why (each reproduces simclr_jax's
encoder, inference mode):
- Stem max-pool: ours, like the reference's, is TensorFlow 'SAME' pooling, which on an even
  map pads 0 before and 1 after; torchvision's MaxPool2d(3, 2, padding=1) pads 1 on both sides
  and so picks other windows. Here a zero pad of (0, 1) + MaxPool2d(3, 2), the equivalent of
  ZeroPad2d((0, 1, 0, 1)): zero padding is exact because the input is post-ReLU (>= 0). On an
  odd map 'SAME' pads (1, 1), as torchvision does; the pad is worked out from the map's size.
- CIFAR stem (cifar_stem=True): a 3x3 stride-1 conv1 and no max-pool.
- ResNet-18/34: the first block of every stage has a projection shortcut, also layer1.0
  (torchvision's resnet18/34 has none there).
- No fc: forward returns the pooled representation h [n, C] float32.
Convs use symmetric padding k // 2, which equals our fixed padding for odd kernels.
"""

import torch
from torch import nn


class SamePadMaxPool(nn.Module):
    """TensorFlow 'SAME' 3x3 stride-2 max-pool of non-negative inputs, [n, C, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zeros stand in for 'SAME''s -inf: the input is post-ReLU, so a padded zero never
        # exceeds the window's real values (every window holds at least one).
        (top, bottom), (left, right) = (same_padding(n) for n in x.shape[2:])
        return self.pool(nn.functional.pad(x, (left, right, top, bottom)))


def same_padding(size: int, kernel_size: int = 3, stride: int = 2) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dim of `size` pixels.

    The total is max((ceil(size / stride) - 1) * stride + kernel_size - size, 0), the smaller
    half before: (0, 1) for a 3x3 stride-2 window on an even size, (1, 1) on an odd one.
    """
    total = max((-(-size // stride) - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def _conv(in_ch: int, out_ch: int, kernel_size: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs, stride on the first; torchvision's names."""

    def __init__(self, in_ch, features, stride, projection, bn) -> None:
        super().__init__()
        self.conv1 = _conv(in_ch, features, 3, stride)
        self.bn1 = bn(features)
        self.conv2 = _conv(features, features, 3, 1)
        self.bn2 = bn(features)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(_conv(in_ch, features, 1, stride), bn(features)) if projection else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (4x wide); torchvision's names."""

    expansion = 4

    def __init__(self, in_ch, features, stride, projection, bn) -> None:
        super().__init__()
        out_ch = self.expansion * features
        self.conv1 = _conv(in_ch, features, 1, 1)
        self.bn1 = bn(features)
        self.conv2 = _conv(features, features, 3, stride)
        self.bn2 = bn(features)
        self.conv3 = _conv(features, out_ch, 1, 1)
        self.bn3 = bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(_conv(in_ch, out_ch, 1, stride), bn(out_ch)) if projection else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNetEncoder(nn.Module):
    """Our ResNet encoder in PyTorch: images [n, 3, H, W] float32 -> h [n, C] float32.

    Args:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
      bottleneck: bottleneck blocks (depth >= 50) or basic blocks (18/34).
      width: channels of the stem and the first stage (64 * width_multiplier).
      cifar_stem: 3x3 stride-1 stem without max-pool.
      bn_epsilon: BatchNorm epsilon (ours: 1e-5, torch's default).
      bn_momentum: our (Flax/Keras) momentum, the running statistics' decay; torch's momentum
        is 1 - it. Matters only if the model is trained further.
    """

    def __init__(
        self,
        stage_sizes,
        bottleneck: bool,
        width: int = 64,
        cifar_stem: bool = False,
        bn_epsilon: float = 1e-5,
        bn_momentum: float = 0.9,
    ) -> None:
        super().__init__()

        def bn(channels):
            return nn.BatchNorm2d(channels, eps=bn_epsilon, momentum=1.0 - bn_momentum)

        block = Bottleneck if bottleneck else BasicBlock
        expansion = Bottleneck.expansion if bottleneck else 1
        self.conv1 = _conv(3, width, 3, 1) if cifar_stem else _conv(3, width, 7, 2)
        self.bn1 = bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else SamePadMaxPool()
        in_ch = width
        for stage, num_blocks in enumerate(stage_sizes):
            features = width * 2**stage
            blocks = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(in_ch, features, stride, index == 0, bn))
                in_ch = features * expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.output_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return torch.mean(x, dim=(2, 3))
