"""BusiCNN: a compact residual CNN for single-channel breast ultrasound images.

A stride-2 stem (optionally followed by a 3x3 max-pool, as in ResNet), then stages of basic
residual blocks (conv-BN-ReLU), each stage after the first halving the resolution, then global
average pooling, dropout and a linear classifier. About 1.2 M parameters with the default widths
and one block per stage; it trains from scratch on a 2-core CPU in minutes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class BusiCNN(nn.Module):
    """Compact residual classifier.

    ``forward_features`` returns the last convolutional block's feature map (the Grad-CAM
    target); ``embed`` pools it into the penultimate-layer embedding; ``classify`` maps an
    embedding to logits; ``forward`` chains the three.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks_per_stage: int = 1,
        dropout: float = 0.3,
        stem_pool: bool = False,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must not be empty")
        self.in_channels = in_channels
        self.num_classes = num_classes
        stem_width = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        if stem_pool:
            self.stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        stages: list[nn.Module] = []
        previous = stem_width
        for index, width in enumerate(widths):
            blocks: list[nn.Module] = [_BasicBlock(previous, width, stride=1 if index == 0 else 2)]
            blocks.extend(_BasicBlock(width, width, stride=1) for _ in range(blocks_per_stage - 1))
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(previous, num_classes)
        self.embedding_size = previous
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional block's output, shape (B, C, h, w)."""
        return self.features(self.stem(x))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features, shape (B, C): the penultimate layer."""
        return torch.flatten(self.pool(features), 1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits from an embedding, shape (B, num_classes)."""
        return self.head(self.dropout(embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(self.forward_features(x)))
