"""EfficientNetV2-style features with a GRU and additive attention over the feature sequence.

As in the EfficientNetV2 + GRU-attention model evaluated on BreakHis: fused-MBConv blocks (one
3x3 expansion convolution) in the early, high-resolution stages, MBConv blocks (1x1 expansion,
3x3 depthwise, squeeze-excitation, 1x1 projection) in the late ones; the final map's cells form a
raster-order sequence for a bidirectional GRU, pooled by additive (Bahdanau) attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from inference.networks.base import (
    FeatureClassifier,
    SqueezeExcitation,
    conv_bn_act,
    feature_sequence,
    stem_stride,
)


class FusedMBConv(nn.Module):
    """3x3 expansion conv -> 1x1 projection, residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.block = nn.Sequential(
            conv_bn_act(in_channels, hidden, 3, stride),
            conv_bn_act(hidden, out_channels, 1, act=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MBConv(nn.Module):
    """1x1 expansion -> 3x3 depthwise -> squeeze-excitation -> 1x1 projection (+ residual)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.block = nn.Sequential(
            conv_bn_act(in_channels, hidden, 1),
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            SqueezeExcitation(hidden, in_channels // 4),
            conv_bn_act(hidden, out_channels, 1, act=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class AdditiveAttention(nn.Module):
    """Bahdanau attention pooling: weights = softmax(v . tanh(W h_t)), output = sum w_t h_t."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.project = nn.Linear(size, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(torch.tanh(self.project(sequence))), dim=1)
        return (weights * sequence).sum(dim=1)


class EffNetV2GRUAttention(FeatureClassifier):
    """Fused-MBConv x2 stages, MBConv x2 stages -> BiGRU -> additive attention -> linear."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: int = 192,
        widths: Sequence[int] = (24, 48, 64, 128),
        head_width: int = 192,
        gru_hidden: int = 96,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError("widths needs four stages: fused, fused, MBConv, MBConv")
        self.in_channels, self.num_classes = in_channels, num_classes
        first_stride = 2 if stem_stride(input_size) > 2 else 1
        self.stem = conv_bn_act(in_channels, widths[0], 3, 2)
        stages: list[nn.Module] = []
        previous = widths[0]
        kinds: list[type[nn.Module]] = [FusedMBConv, FusedMBConv, MBConv, MBConv]
        for index, (width, kind) in enumerate(zip(widths, kinds, strict=True)):
            stride = first_stride if index == 0 else 2
            stages.append(nn.Sequential(kind(previous, width, stride), kind(width, width, 1)))
            previous = width
        stages.append(conv_bn_act(previous, head_width, 1))
        self.features = nn.Sequential(*stages)
        self.gru = nn.GRU(head_width, gru_hidden, batch_first=True, bidirectional=True)
        self.attention = AdditiveAttention(2 * gru_hidden, gru_hidden)
        self.embedding_size = 2 * gru_hidden
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.embedding_size, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.gru(feature_sequence(features))
        return self.attention(outputs)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(embedding))
