"""SE-ResNet features followed by a bidirectional LSTM over the spatial feature sequence.

After Nagalakshmi & Ahammad (Sci Rep 2026): squeeze-and-excitation residual blocks extract a
feature map; its h*w cells, read in raster order, are a sequence for a BiLSTM whose outputs are
mean- and max-pooled into the embedding. Scaled to train from scratch on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from inference.networks.base import (
    FeatureClassifier,
    SqueezeExcitation,
    feature_sequence,
    stem_stride,
)


class SEBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers, an SE gate on the residual branch, identity/projection shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, reduction: int = 8
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcitation(out_channels, out_channels // reduction)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class SEResNetBiLSTM(FeatureClassifier):
    """SE-ResNet stages -> (B, h*w, C) sequence -> BiLSTM -> mean+max pool -> linear."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: int = 192,
        widths: Sequence[int] = (32, 64, 128, 192),
        lstm_hidden: int = 96,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        stem: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        if stem_stride(input_size) > 2:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        previous = widths[0]
        for index, width in enumerate(widths):
            blocks.append(SEBasicBlock(previous, width, stride=1 if index == 0 else 2))
            previous = width
        self.features = nn.Sequential(*blocks)
        self.lstm = nn.LSTM(previous, lstm_hidden, batch_first=True, bidirectional=True)
        self.embedding_size = 4 * lstm_hidden
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.embedding_size, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(feature_sequence(features))
        return torch.cat([outputs.mean(dim=1), outputs.amax(dim=1)], dim=1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(embedding))
