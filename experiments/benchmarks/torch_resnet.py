"""A compact PyTorch ResNet with torchvision's module and parameter names (He et al., CVPR 2016).

Used by the training benchmark when torchvision is not installed, and by the weight-conversion
tests as the torch reference. The layout is torchvision's v1.5 ResNet (stride on the 3×3 conv of a bottleneck; ``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1`` … ``layer4``, each block with ``conv1``/``bn1``/…, a ``downsample`` Sequential of a
1×1 conv ``0`` and a BatchNorm ``1``), so its ``state_dict`` converts with
``jret.models.convert.torchvision_to_flax``. The classifier (``avgpool``, ``fc``) is left out:
``forward`` returns the conv5_x activations ``(N, C, H/32, W/32)`` (``H/16`` with
``dilate_last``: the last stage dilated instead of strided, torchvision's
``replace_stride_with_dilation``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CONFIGS = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}


class Block(nn.Module):
    """torchvision ``BasicBlock`` (two 3×3 convs) or ``Bottleneck`` (1×1, 3×3, 1×1 ×4); the
    3×3 convs of the first block of a dilated stage use the previous stage's dilation."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        bottleneck: bool,
        dilation: int = 1,
        first_dilation: int | None = None,
    ):
        super().__init__()
        out = planes * (4 if bottleneck else 1)
        d1 = dilation if first_dilation is None else first_dilation
        conv3 = dict(kernel_size=3, bias=False)
        if bottleneck:
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.conv2 = nn.Conv2d(planes, planes, stride=stride, padding=d1, dilation=d1, **conv3)
            self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
        else:
            self.conv1 = nn.Conv2d(
                inplanes, planes, stride=stride, padding=d1, dilation=d1, **conv3
            )
            self.conv2 = nn.Conv2d(planes, planes, padding=dilation, dilation=dilation, **conv3)
        self.bn1 = nn.BatchNorm2d(planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.bottleneck = bottleneck
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(self.relu(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk ``conv1`` … ``layer4``; ``width`` channels in the first stage (64)."""

    def __init__(
        self,
        stage_sizes: Sequence[int],
        bottleneck: bool,
        width: int = 64,
        dilate_last: bool = False,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        inplanes, dilation = width, 1
        for k, n in enumerate(stage_sizes):
            planes, stride, previous = width * 2**k, 1 if k == 0 else 2, dilation
            if dilate_last and k == len(stage_sizes) - 1:
                dilation, stride = dilation * stride, 1
            blocks = [Block(inplanes, planes, stride, bottleneck, dilation, previous)]
            inplanes = planes * (4 if bottleneck else 1)
            blocks += [Block(inplanes, planes, 1, bottleneck, dilation) for _ in range(n - 1)]
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor, num_stages: int = 4) -> torch.Tensor:
        """Activations of the first ``num_stages`` stages ``(N, C, H', W')``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for k in range(num_stages):
            x = getattr(self, f"layer{k + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv5_x activations ``(N, C, H', W')`` of normalised images ``(N, 3, H, W)``."""
        return self.features(x)


def resnet(name: str, width: int = 64) -> ResNet:
    """``'resnet18'`` … ``'resnet152'`` in the torchvision layout, randomly initialised."""
    if name not in CONFIGS:
        raise ValueError(f"name: expected one of {sorted(CONFIGS)}, got {name!r}")
    stage_sizes, bottleneck = CONFIGS[name]
    return ResNet(stage_sizes, bottleneck, width)
