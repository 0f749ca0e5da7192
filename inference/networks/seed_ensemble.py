"""Several networks of one architecture, trained separately (different seeds), logits averaged.

``breastcad ensemble`` (``inference.ensemble``) puts the weights of finished runs side by side
in one ``SeedEnsemble`` so that it is served, calibrated, checked for out-of-distribution input
and Grad-CAM'd like any other network: its feature map is the members' maps stacked along the
channels (so one Grad-CAM covers the ensemble), its embedding the members' embeddings
concatenated, and its logits the members' mean (soft voting before the temperature).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from inference.networks.base import FeatureClassifier


class SeedEnsemble(FeatureClassifier):
    """``members`` copies of ``member_architecture`` built with ``member_params``."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: int = 192,
        member_architecture: str = "BusiCNN",
        members: int = 2,
        member_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # the registry imports this module: look the member class up at construction time
        from inference.networks import ARCHITECTURES

        member_class = ARCHITECTURES.get(member_architecture)
        if member_class is None or member_class is SeedEnsemble:
            raise ValueError(f"cannot ensemble architecture {member_architecture!r}")
        if members < 2:
            raise ValueError(f"an ensemble needs two or more members, not {members}")
        params = dict(member_params or {})
        params.update(in_channels=in_channels, num_classes=num_classes)
        if "input_size" in inspect.signature(member_class).parameters:
            params["input_size"] = input_size
        self.in_channels, self.num_classes = in_channels, num_classes
        built = [member_class(**params) for _ in range(members)]
        self.members = nn.ModuleList(built)
        self._member_list = built
        probe = torch.zeros(1, in_channels, input_size, input_size)
        first = built[0]
        first.eval()
        with torch.no_grad():
            features = first.forward_features(probe)  # type: ignore[operator]
            embedding = first.embed(features)  # type: ignore[operator]
        first.train()
        self._channels = [int(features.shape[1])] * members
        self._embeddings = [int(embedding.shape[1])] * members
        self.embedding_size = sum(self._embeddings)

    def load_members(self, states: list[Mapping[str, torch.Tensor]]) -> None:
        """Load one finished run's ``state_dict`` into each member (in order)."""
        if len(states) != len(self._member_list):
            raise ValueError(f"{len(states)} weight sets for {len(self._member_list)} members")
        for member, state in zip(self._member_list, states, strict=True):
            member.load_state_dict(dict(state))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self._member_list], dim=1)  # type: ignore[operator]

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        parts = torch.split(features, self._channels, dim=1)
        return torch.cat(
            [m.embed(p) for m, p in zip(self._member_list, parts, strict=True)],  # type: ignore[operator]
            dim=1,
        )

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        parts = torch.split(embedding, self._embeddings, dim=1)
        logits = [
            m.classify(p) for m, p in zip(self._member_list, parts, strict=True)  # type: ignore[operator]
        ]
        return torch.stack(logits).mean(dim=0)
