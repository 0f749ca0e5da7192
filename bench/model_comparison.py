"""Print the architecture comparison tables of docs/MODELS.md from a folder of training runs.

    python bench/model_comparison.py runs/cmp     # runs/cmp/<MODALITY>/<run>/<name>.json

Each run folder holds one model card written by ``breastcad train``; the table lists, per
modality, the test-split metrics of every run with its parameters, CPU images/s at batch 64,
epochs and seconds of training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "specificity",
           "jaccard", "auc", "auc_abnormal", "ece")


def _cards(root: Path) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(root.glob("*/*/*.json")):
        if path.name.endswith("_history.json"):
            continue
        card = json.loads(path.read_text())
        if "metrics" in card:
            found.append((path.parent.name, card))
    return found


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def table(cards: list[tuple[str, dict[str, Any]]], modality: str) -> str:
    head = ["architecture", "Wiener", "input", *COLUMNS, "params", "img/s", "epochs", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, card in cards:
        if card["modality"] != modality:
            continue
        test = card["metrics"]["test"]
        wiener = card.get("preprocessing_params", {}).get("wiener_kernel", 0)
        row = [
            card["architecture"], f"{wiener}x{wiener}" if wiener else "no",
            f"{card['input_size']} px",
            *(_fmt(test.get(key)) for key in COLUMNS),
            f"{card['parameters'] / 1e6:.2f} M",
            f"{card.get('throughput', {}).get('images_per_second_batch64', 0):.0f}",
            f"{card['training']['epochs_run']} (best {card['training']['selected_epoch']})",
            f"{card['training']['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    cards = _cards(args.root)
    for modality in sorted({card["modality"] for _, card in cards}):
        print(f"\n### {modality}\n")
        print(table(cards, modality))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
