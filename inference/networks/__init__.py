"""Network architectures, one per module, and the factory that builds one from a model card.

Every network takes ``in_channels``, ``num_classes`` and (except the original ``BusiCNN``)
``input_size``, and has ``forward_features`` (last convolutional map, the Grad-CAM target),
``embed`` (penultimate features) and ``classify`` (logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from inference.networks.busi_cnn import BusiCNN
from inference.networks.cnn_rnn import CnnRnn, CnnRnnEnsemble
from inference.networks.effnetv2_gru import EffNetV2GRUAttention
from inference.networks.mobilenetv2 import MobileNetV2
from inference.networks.monai_resnet import MonaiResNet
from inference.networks.se_resnet_bilstm import SEResNetBiLSTM
from inference.networks.seed_ensemble import SeedEnsemble

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "BusiCNN": BusiCNN,
    "SEResNetBiLSTM": SEResNetBiLSTM,
    "EffNetV2GRUAttention": EffNetV2GRUAttention,
    "MobileNetV2": MobileNetV2,
    "CnnRnn": CnnRnn,
    "CnnRnnEnsemble": CnnRnnEnsemble,
    "MonaiResNet": MonaiResNet,
    "SeedEnsemble": SeedEnsemble,
}

# Short names for the command line.
ARCH_ALIASES: dict[str, str] = {
    "plain-cnn": "BusiCNN",
    "se-resnet-bilstm": "SEResNetBiLSTM",
    "effnetv2-gru": "EffNetV2GRUAttention",
    "mobilenetv2": "MobileNetV2",
    "cnn-rnn": "CnnRnn",
    "cnn-rnn-ensemble": "CnnRnnEnsemble",
    "monai-resnet": "MonaiResNet",
}

__all__ = [
    "ARCHITECTURES",
    "ARCH_ALIASES",
    "BusiCNN",
    "CnnRnn",
    "CnnRnnEnsemble",
    "EffNetV2GRUAttention",
    "MobileNetV2",
    "MonaiResNet",
    "SEResNetBiLSTM",
    "SeedEnsemble",
    "build_network",
]


def resolve_architecture(name: str) -> str:
    """A class name from a class name or a command-line alias; ValueError if unknown."""
    if name in ARCHITECTURES:
        return name
    if name.lower() in ARCH_ALIASES:
        return ARCH_ALIASES[name.lower()]
    known = ", ".join(sorted(ARCH_ALIASES))
    raise ValueError(f"unknown architecture {name!r} (known: {known})")


def build_network(architecture: str, params: Mapping[str, Any]) -> nn.Module:
    """Instantiate the named architecture with the keyword arguments stored in its card."""
    cls = ARCHITECTURES.get(architecture)
    if cls is None:
        raise ValueError(f"unknown network architecture {architecture!r}")
    return cls(**dict(params))
