"""The slide-level aggregator: gated attention pooling over tile embeddings (Ilse et al. 2018).

Each tile's embedding ``h`` (the patch model's penultimate features) gets an attention score
``a = w . (tanh(V h) * sigmoid(U h))``; the slide vector is ``z = sum softmax(a)_i h_i`` and the
slide logits are ``W z + b``. Because the score of a tile depends on that tile only, the softmax
can be accumulated tile batch by tile batch (``AttentionStream``), so a slide of any size is
pooled in constant memory, in the order the tiles are read.

The weights are shipped beside the patch model as ``inference/bundled/sm_slide_aggregator.pt``
with the card ``sm_slide_aggregator.card`` (JSON; not ``.json``, which is where the bundled
*classifiers'* cards live). The card names the patch model it was trained on: an aggregator is
only used with that exact patch model (its SHA-256).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from inference.card import ModelCard, sha256_file
from inference.paths import BUNDLED_DIR

AGGREGATOR_NAME = "sm_slide_aggregator"
AGGREGATOR_ARCHITECTURE = "GatedAttentionMIL"


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL pooling and a linear slide classifier."""

    def __init__(self, in_features: int, hidden: int = 64, num_classes: int = 2) -> None:
        super().__init__()
        self.in_features = in_features
        self.norm = nn.LayerNorm(in_features)
        self.attention_v = nn.Linear(in_features, hidden)
        self.attention_u = nn.Linear(in_features, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.head = nn.Linear(in_features, num_classes)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Attention logits (N,) of tile embeddings (N, D)."""
        h = self.norm(embeddings)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return self.attention_w(gate).squeeze(-1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Slide logits (..., C) of pooled (normalised) vectors (..., D)."""
        return self.head(pooled)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits (C,) of one bag of tile embeddings (N, D)."""
        weights = torch.softmax(self.scores(embeddings), dim=0)
        pooled = (weights[:, None] * self.norm(embeddings)).sum(dim=0)
        return self.classify(pooled)


class AttentionStream:
    """Attention pooling accumulated batch by batch (an online softmax)."""

    def __init__(self, model: GatedAttentionMIL) -> None:
        self.model = model
        self._max = -np.inf
        self._sum = 0.0
        self._vector: npt.NDArray[np.float64] = np.zeros(model.in_features, dtype=np.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Add a batch of tile embeddings (N, D); returns their attention logits (N,)."""
        if len(embeddings) == 0:
            return np.zeros(0, dtype=np.float32)
        tensor = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        scores = self.model.scores(tensor).double().numpy()
        normed = self.model.norm(tensor).double().numpy()
        new_max = max(self._max, float(scores.max()))
        rescale = float(np.exp(self._max - new_max)) if np.isfinite(self._max) else 0.0
        exp = np.exp(scores - new_max)
        self._sum = self._sum * rescale + float(exp.sum())
        self._vector = self._vector * rescale + exp @ normed
        self._max = new_max
        self.count += len(embeddings)
        return scores.astype(np.float32)

    @torch.no_grad()
    def probabilities(self, temperature: float = 1.0) -> npt.NDArray[np.float64]:
        """Slide class probabilities of everything added so far."""
        if self.count == 0:
            raise ValueError("no tiles were added to the attention pool")
        pooled = torch.as_tensor(self._vector / self._sum, dtype=torch.float32)
        logits = self.model.classify(pooled).double()
        return torch.softmax(logits / temperature, dim=0).numpy()


@dataclass(frozen=True)
class SlideAggregator:
    """A trained aggregator and its card (the JSON object in ``data``)."""

    name: str
    version: str
    sha256: str
    labels: tuple[str, ...]
    patch_model_sha256: str
    model: GatedAttentionMIL
    temperature: float = 1.0
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def stream(self) -> AttentionStream:
        return AttentionStream(self.model)


def card_path(directory: Path = BUNDLED_DIR) -> Path:
    return directory / f"{AGGREGATOR_NAME}.card"


def load_aggregator(patch_card: ModelCard, directory: Path = BUNDLED_DIR) -> SlideAggregator | None:
    """The bundled aggregator trained on ``patch_card``'s weights, or None.

    None when no aggregator is bundled or the bundled one was trained on another patch model
    (its embeddings would mean nothing to it). Raises ``ValueError`` when the card is unreadable
    or the weights do not match its SHA-256 or architecture.
    """
    path = card_path(directory)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read aggregator card {path}: {exc}") from exc
    try:
        patch = data["patch_model"]
        if str(patch["sha256"]).lower() != patch_card.sha256:
            return None
        weights = directory / str(data["weights"])
        params = dict(data["architecture_params"])
        labels = tuple(str(label) for label in data["labels"])
        expected = str(data["sha256"]).lower()
    except (KeyError, TypeError) as exc:
        raise ValueError(f"aggregator card {path} lacks {exc}") from exc
    if data.get("architecture") != AGGREGATOR_ARCHITECTURE:
        raise ValueError(f"aggregator card {path}: unknown architecture {data.get('architecture')}")
    if labels != patch_card.labels:
        raise ValueError(f"aggregator labels {labels} differ from the patch model's")
    if not weights.is_file() or sha256_file(weights) != expected:
        raise ValueError(f"aggregator weights {weights.name} missing or not the card's sha256")
    model = GatedAttentionMIL(**params)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as exc:
        raise ValueError(f"aggregator weights {weights.name} do not fit the card") from exc
    model.eval()
    return SlideAggregator(
        name=str(data.get("name", AGGREGATOR_NAME)),
        version=str(data.get("version", "0")),
        sha256=expected,
        labels=labels,
        patch_model_sha256=patch_card.sha256,
        model=model,
        temperature=float(data.get("temperature") or 1.0),
        data=data,
    )
