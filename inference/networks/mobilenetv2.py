"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks with linear bottlenecks.

The lightweight path (the MobileNetV2 transfer-learning paper this project follows), trained from
scratch here at a reduced width. Embedding = global-average-pooled output of the last 1x1 conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from inference.networks.base import FeatureClassifier, stem_stride


def _conv_bn_relu6(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection, residual if kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, 1, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


# (expansion t, channels c, repeats n, stride s) as in the paper's Table 2, for width 1.0.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(FeatureClassifier):
    """MobileNetV2 with a width multiplier; small inputs skip the stem's stride."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: int = 192,
        width: float = 0.5,
        last_channels: int = 256,
        dropout: float = 0.2,
        settings: Sequence[Sequence[int]] = _SETTINGS,
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes

        def scaled(channels: int) -> int:
            return max(8, int(round(channels * width / 8)) * 8)

        small = stem_stride(input_size) == 2
        previous = scaled(32)
        layers: list[nn.Module] = [_conv_bn_relu6(in_channels, previous, 3, 2)]
        strides_seen = 0
        for expand, channels, repeats, stride in settings:
            out = scaled(channels)
            for index in range(repeats):
                block_stride = stride if index == 0 else 1
                if small and block_stride == 2 and strides_seen == 0:
                    block_stride = 1  # 50 px patches: one stride fewer
                    strides_seen += 1
                layers.append(InvertedResidual(previous, out, block_stride, expand))
                previous = out
        layers.append(_conv_bn_relu6(previous, last_channels, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding_size = last_channels
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(last_channels, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(features), 1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(embedding))
