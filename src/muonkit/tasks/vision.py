"""The seed notebook's CIFAR-10 network: a stem conv, seven depthwise residual blocks with BlurPool
downsampling and ECA channel attention, and a pooled linear head (77,037 parameters at width 96)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BlurPool(nn.Module):
    """Anti-aliased downsampling: a fixed binomial low-pass filter applied per channel with a stride."""

    def __init__(self, stride: int = 2, filter_size: int = 4):
        super().__init__()
        self.stride = stride
        self.padding = (filter_size - stride) // 2
        row = torch.tensor([math.comb(filter_size - 1, k) for k in range(filter_size)], dtype=torch.float32)
        filt = row[:, None] * row[None, :]
        self.register_buffer("filt", (filt / filt.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        filt = self.filt.expand(x.size(1), 1, -1, -1)
        return F.conv2d(x, filt, stride=self.stride, padding=self.padding, groups=x.size(1))

    def extra_repr(self) -> str:
        return f"filter_size={self.filt.shape[-1]}, stride={self.stride}"


class ECA(nn.Module):
    """Efficient channel attention: a 1D conv over pooled channel statistics gates each channel."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1):
        super().__init__()
        t = int(abs((math.log(channels, 2) + b) / gamma))
        k = t if t % 2 else t + 1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.size(1)
        s = self.conv(self.pool(x).view(-1, 1, c)).view(-1, c, 1, 1)
        return x * torch.sigmoid(s)


class NormAct(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm2d(channels), nn.GELU())


class ResidualBlock(nn.Module):
    """x -> shortcut(x) + gamma * (norm, depthwise 3x3, [blur-pool], norm, ECA, pointwise 1x1)(x); gamma starts at 0."""

    def __init__(self, channels: int, stride: int = 1, p_drop: float = 0.0):
        super().__init__()
        shortcut: nn.Module = nn.Dropout(p_drop)
        if stride > 1:
            shortcut = nn.Sequential(nn.AvgPool2d(stride), shortcut)
        self.shortcut = shortcut
        self.residual = nn.Sequential(
            NormAct(channels),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            NormAct(channels),
            ECA(channels),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        if stride > 1:
            self.residual.insert(1, BlurPool(stride, filter_size=6))
        self.γ = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.γ * self.residual(x)


class Head(nn.Sequential):
    def __init__(self, channels: int, classes: int, p_drop: float = 0.0):
        super().__init__(NormAct(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(p_drop),
                         nn.Linear(channels, classes))


def Stem(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class Net(nn.Sequential):
    """Parameter names match the notebook's (0.weight is the stem, 8.4.weight the classifier)."""

    def __init__(self, classes: int, width: int = 32, in_channels: int = 3, res_p_drop: float = 0.0,
                 head_p_drop: float = 0.0):
        strides = [1, 2, 1, 2, 1, 2, 1]
        super().__init__(
            Stem(in_channels, width),
            *[ResidualBlock(width, stride=stride, p_drop=res_p_drop) for stride in strides],
            Head(width, classes, p_drop=head_p_drop),
        )
        reset_parameters(self)


def reset_parameters(model: nn.Module) -> None:
    """The notebook's init: Xavier-normal conv/linear weights, zero biases, unit BatchNorm, gamma = 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ResidualBlock):
            nn.init.zeros_(m.γ)
