"""Model cards: the JSON file that describes one bundled model and its weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelCard:
    """The fields of a model card that code relies on; the whole JSON object is in ``data``."""

    name: str
    version: str
    modality: str
    architecture: str
    labels: tuple[str, ...]
    input_size: int
    in_channels: int
    sha256: str
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path | None = None) -> ModelCard:
        """Build a card from its JSON object; raise ``ValueError`` if a field is missing."""
        required = (
            "name", "version", "modality", "architecture", "labels",
            "input_size", "in_channels", "sha256",
        )
        missing = [key for key in required if key not in data]
        where = f" in {path}" if path else ""
        if missing:
            raise ValueError(f"model card{where} lacks {', '.join(missing)}")
        labels = tuple(str(label) for label in data["labels"])
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"model card{where} needs at least two distinct labels: {labels}")
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            modality=str(data["modality"]).upper(),
            architecture=str(data["architecture"]),
            labels=labels,
            input_size=int(data["input_size"]),
            in_channels=int(data["in_channels"]),
            sha256=str(data["sha256"]).lower(),
            data=dict(data),
            path=path,
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        """Read a card JSON file; raise ``ValueError`` if it is not a valid card."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model card {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"model card {path} is not a JSON object")
        return cls.from_dict(data, path=path)

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on validation (1.0 when the card has none)."""
        value = self.data.get("temperature")
        return float(value) if value else 1.0

    @property
    def hflip_tta(self) -> bool:
        """Whether predictions average the image and its left-right mirror."""
        return str(self.data.get("test_time_augmentation", "none")).lower() == "hflip"

    @property
    def preprocessing_params(self) -> dict[str, Any]:
        """channels, breast_crop, wiener_kernel and normalization ("per_image_zscore" or a
        per-channel {"mean": [...], "std": [...]}); defaults are the first US model's."""
        params: dict[str, Any] = {
            "channels": self.in_channels,
            "breast_crop": False,
            "wiener_kernel": 0,
            "pad_to": 0,
            "normalization": "per_image_zscore",
        }
        params.update(dict(self.data.get("preprocessing_params", {})))
        return params

    @property
    def ood(self) -> Mapping[str, Any]:
        """The card's out-of-distribution section (empty when the model has none)."""
        value = self.data.get("ood")
        return dict(value) if isinstance(value, Mapping) else {}

    @property
    def ood_path(self) -> Path | None:
        """The OOD statistics file named by the card, beside the card file."""
        name = self.ood.get("file")
        if not name or self.path is None:
            return None
        return self.path.parent / str(name)

    @property
    def architecture_params(self) -> dict[str, Any]:
        return dict(self.data.get("architecture_params", {}))

    @property
    def weights_path(self) -> Path | None:
        """The weights file named by the card, beside the card file."""
        weights = self.data.get("weights")
        if not weights or self.path is None:
            return None
        return self.path.parent / str(weights)

    @property
    def metrics(self) -> Mapping[str, Any]:
        return dict(self.data.get("metrics", {}))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
