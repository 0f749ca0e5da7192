"""What every breastcad network has: features -> embedding -> logits, in three calls.

``forward_features`` returns the last convolutional layer's map (B, C, h, w), the Grad-CAM target;
``embed`` turns it into the penultimate-layer vector (B, D) used for similar cases and the
out-of-distribution score; ``classify`` maps that vector to logits (B, num_classes).
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    """Base class: subclasses implement the three stages and set ``embedding_size``."""

    embedding_size: int
    in_channels: int
    num_classes: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(self.forward_features(x)))

    def init_weights(self) -> None:
        """He initialisation for convolutions, unit/zero for norms (as in ResNet)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def conv_bn_act(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, groups: int = 1,
    act: bool = True,
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> SiLU (or nothing)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): global pool -> bottleneck MLP -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, max(1, reduced), 1)
        self.expand = nn.Conv2d(max(1, reduced), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))
        return x * scale


def feature_sequence(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, h*w, C) sequence in raster (row-major) order."""
    return features.flatten(2).transpose(1, 2)


def stem_stride(input_size: int) -> int:
    """Total stride of the stem: 4 (stride-2 conv + pool) for images of 96 px and more, 2 (a
    stride-2 conv only) for small patches such as the 50 px histopathology tiles."""
    return 4 if input_size >= 96 else 2
