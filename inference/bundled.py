"""The models shipped inside the package (``inference/bundled/*.json`` + weights)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from inference.card import ModelCard
from inference.classifier import Classifier
from inference.mammo_patches import classifier_from_card
from inference.paths import BUNDLED_DIR


class ModelNotAvailableError(LookupError):
    """No bundled model for a modality (yet)."""

    def __init__(self, modality: str, bundled: Sequence[str] = ()) -> None:
        self.modality = modality
        self.bundled = tuple(bundled)
        have = ", ".join(self.bundled) if self.bundled else "none"
        super().__init__(f"no bundled model for modality {modality!r} yet (bundled: {have})")

    def __str__(self) -> str:
        return str(self.args[0])


def bundled_cards(directory: Path = BUNDLED_DIR) -> list[ModelCard]:
    """The cards of all bundled models, sorted by modality then name."""
    cards = [ModelCard.from_file(path) for path in sorted(directory.glob("*.json"))]
    return sorted(cards, key=lambda card: (card.modality, card.name))


def load_bundled(modality: str, directory: Path = BUNDLED_DIR) -> Classifier:
    """Load the bundled model for ``modality`` ("US", ...), verifying its weights' SHA-256.

    Raises ``ModelNotAvailableError`` when no model of that modality is bundled, and
    ``ValueError`` when the weights do not match the card's checksum or architecture.
    """
    wanted = str(modality).strip().upper()
    cards = bundled_cards(directory)
    matching = [card for card in cards if card.modality == wanted]
    if not matching:
        raise ModelNotAvailableError(modality, sorted({card.modality for card in cards}))
    # Several models of one modality: the highest version wins.
    card = max(matching, key=lambda c: tuple(int(p) for p in c.version.split(".") if p.isdigit()))
    return classifier_from_card(card)
