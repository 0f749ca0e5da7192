"""A CNN + RNN hybrid that reads the image's rows as a sequence, and an ensemble of them.

After Fawzy et al. (Sci Rep 2026, CNN-RNN ensemble on BUSI): a small CNN turns the image into a
feature map; each row of that map (pooled across its width) is one step of a bidirectional GRU
read top to bottom, so the recurrent part sees the depth structure of an ultrasound image (skin,
tissue, lesion, shadow). ``CnnRnnEnsemble`` averages the logits of several such members that
differ in width and recurrent size; its feature map is the members' maps side by side (so one
Grad-CAM covers the ensemble) and its embedding the members' embeddings concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from inference.networks.base import FeatureClassifier, stem_stride


class _ConvStage(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, pool: bool) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class CnnRnn(FeatureClassifier):
    """CNN (conv stages) -> rows pooled over width -> BiGRU top to bottom -> last states."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: int = 192,
        widths: Sequence[int] = (24, 48, 96, 128),
        rnn_hidden: int = 64,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        stem: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        if stem_stride(input_size) > 2:
            stem.append(nn.MaxPool2d(2))
        previous = widths[0]
        self.stem = nn.Sequential(*stem)
        stages = [
            _ConvStage(previous if i == 0 else widths[i - 1], w, pool=i < len(widths) - 1)
            for i, w in enumerate(widths)
        ]
        self.features = nn.Sequential(*stages)
        self.rnn = nn.GRU(widths[-1], rnn_hidden, batch_first=True, bidirectional=True)
        self.embedding_size = 2 * rnn_hidden + widths[-1]
        self.feature_channels = widths[-1]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.embedding_size, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        rows = features.mean(dim=3).transpose(1, 2)  # (B, h, C): one step per row, top first
        _, hidden = self.rnn(rows)
        last = torch.cat([hidden[0], hidden[1]], dim=1)  # forward's last and backward's last
        return torch.cat([last, features.mean(dim=(2, 3))], dim=1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(embedding))


class CnnRnnEnsemble(FeatureClassifier):
    """Several ``CnnRnn`` members trained jointly; logits averaged (soft voting)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: int = 192,
        members: Sequence[Sequence[int]] = ((16, 32, 64, 96), (24, 48, 96, 128)),
        rnn_hidden: Sequence[int] = (48, 64),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if len(members) != len(rnn_hidden) or len(members) < 2:
            raise ValueError("an ensemble needs two or more members, each with an rnn_hidden")
        self.in_channels, self.num_classes = in_channels, num_classes
        built = [
            CnnRnn(in_channels, num_classes, input_size, widths, hidden, dropout)
            for widths, hidden in zip(members, rnn_hidden, strict=True)
        ]
        self.members = nn.ModuleList(built)
        self._member_list = built
        self._channels = [m.feature_channels for m in built]
        self._embeddings = [m.embedding_size for m in built]
        self.embedding_size = sum(self._embeddings)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self._member_list], dim=1)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        parts = torch.split(features, self._channels, dim=1)
        return torch.cat([m.embed(p) for m, p in zip(self._member_list, parts, strict=True)], dim=1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        parts = torch.split(embedding, self._embeddings, dim=1)
        logits = [m.classify(p) for m, p in zip(self._member_list, parts, strict=True)]
        return torch.stack(logits).mean(dim=0)
