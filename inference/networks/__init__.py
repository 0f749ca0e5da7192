"""Network architectures, one per module, and the factory that builds one from a model card."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from inference.networks.busi_cnn import BusiCNN

__all__ = ["BusiCNN", "build_network"]


def build_network(architecture: str, params: Mapping[str, Any]) -> nn.Module:
    """Instantiate the named architecture with the keyword arguments stored in its card."""
    if architecture == "BusiCNN":
        return BusiCNN(**dict(params))
    raise ValueError(f"unknown network architecture {architecture!r}")
