"""Train the slide aggregator (gated attention pooling) on slides assembled from IDC patches.

    OMP_WAIT_POLICY=PASSIVE python -m inference.wsi.train_aggregator --out inference/bundled \
        [--patch-card inference/bundled/sm_*.json] [--bags 3000] [--seed 0]

Every IDC patient is one slide, but nearly every patient of the data set has IDC somewhere, so
whole patients make no negative slides. Training "slides" are therefore bags assembled from the
patches of TRAIN-split patients (``inference.wsi.split``): a negative bag holds only non-IDC
patches, a positive bag the same plus between one and all of the patient's IDC patches (so the
witness rate runs from a single tile to most of the bag). Validation bags are assembled the same
way from VAL-split patients; the test split is never touched. Embeddings come from the patch
model the aggregator is shipped with; its SHA-256 goes into the card, and the pipeline uses the
aggregator only with that patch model.

Writes ``sm_slide_aggregator.pt`` and ``sm_slide_aggregator.card`` (JSON) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from inference.bundled import load_bundled
from inference.card import ModelCard, sha256_file
from inference.classifier import Classifier
from inference.paths import shared_data_dir
from inference.wsi.aggregator import AGGREGATOR_ARCHITECTURE, AGGREGATOR_NAME, GatedAttentionMIL
from inference.wsi.analysis import TOP_K_FRACTION, TileClassifier, positive_label
from inference.wsi.split import (
    IDC_FOLDER,
    SPLIT_FRACTIONS,
    IdcPatch,
    patches_by_split,
    read_idc_patches,
    split_seed,
)

GLASS = 238
VERSION = "1.0.0"

Bag = tuple[npt.NDArray[np.int64], int]


def patch_pixels(data_dir: Path, patch: IdcPatch, size: int = 50) -> npt.NDArray[np.uint8]:
    """A patch as RGB, edge patches (50 x H) completed with glass as on a slide."""
    with Image.open(data_dir / patch.path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if pixels.shape[:2] == (size, size):
        return pixels
    out = np.full((size, size, 3), GLASS, dtype=np.uint8)
    h, w = min(size, pixels.shape[0]), min(size, pixels.shape[1])
    out[:h, :w] = pixels[:h, :w]
    return out


def embed_patches(
    classifier: Classifier, data_dir: Path, patches: list[IdcPatch], batch: int = 256
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """Embeddings (N, D) and tumour probabilities (N,) of patches, as the slide pipeline sees."""
    tiles = TileClassifier(classifier)
    embeddings: list[npt.NDArray[np.float32]] = []
    probabilities: list[npt.NDArray[np.float64]] = []
    for start in range(0, len(patches), batch):
        pixels = [patch_pixels(data_dir, p) for p in patches[start : start + batch]]
        probs, emb = tiles(pixels)
        embeddings.append(emb)
        probabilities.append(probs[:, tiles.positive_index])
    return np.concatenate(embeddings), np.concatenate(probabilities)


def assemble_bags(
    patches: list[IdcPatch], count: int, rng: np.random.Generator, min_size: int = 8
) -> list[Bag]:
    """``count`` bags (patch indices, label), half positive, each from one patient's patches
    (negative patches of other patients of the same split fill a bag whose patient has few)."""
    by_patient: dict[str, dict[int, list[int]]] = defaultdict(lambda: {0: [], 1: []})
    for index, patch in enumerate(patches):
        by_patient[patch.patient_id][patch.label].append(index)
    patients = sorted(by_patient)
    all_negative = np.array([i for i, p in enumerate(patches) if p.label == 0])
    positive_patients = [pid for pid in patients if by_patient[pid][1]]
    bags: list[Bag] = []
    for number in range(count):
        label = number % 2
        pid = str(rng.choice(positive_patients if label else patients))
        negatives = list(by_patient[pid][0])
        size = int(rng.integers(min_size, max(min_size, len(negatives) + 12) + 1))
        chosen: list[int] = []
        if label:
            positives = by_patient[pid][1]
            take = int(rng.integers(1, len(positives) + 1))
            chosen += list(rng.choice(positives, size=take, replace=False))
        need = max(size - len(chosen), 0 if label else min_size)
        own = list(rng.permutation(negatives))[:need]
        chosen += own
        if len(own) < need:
            others = all_negative[~np.isin(all_negative, negatives)]
            chosen += list(rng.choice(others, size=need - len(own), replace=False))
        bags.append((np.asarray(rng.permutation(chosen), dtype=np.int64), label))
    return bags


def _bag_scores(
    model: GatedAttentionMIL, embeddings: torch.Tensor, bags: list[Bag]
) -> npt.NDArray[np.float64]:
    model.eval()
    with torch.no_grad():
        logits = torch.stack([model(embeddings[idx]) for idx, _ in bags])
    return logits.double().numpy()


def _metrics(probability: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> dict[str, Any]:
    predicted = probability >= 0.5
    return {
        "auc": round(float(roc_auc_score(labels, probability)), 4),
        "accuracy": round(float((predicted == labels.astype(bool)).mean()), 4),
        "sensitivity": round(float(predicted[labels == 1].mean()), 4),
        "specificity": round(float((~predicted[labels == 0]).mean()), 4),
    }


def rule_scores(
    tile_probability: npt.NDArray[np.float64], bags: list[Bag]
) -> npt.NDArray[np.float64]:
    """The non-learned rule of the pipeline (mean of the top 1% tiles) on the same bags."""
    scores = []
    for idx, _ in bags:
        values = np.sort(tile_probability[idx])[::-1]
        k = max(1, int(np.ceil(TOP_K_FRACTION * len(values))))
        scores.append(values[:k].mean())
    return np.asarray(scores)


def train_aggregator(
    classifier: Classifier,
    data_dir: Path,
    out_dir: Path,
    *,
    bags: int = 3000,
    epochs: int = 8,
    seed: int = 0,
    hidden: int = 64,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """Train, validate and write the aggregator of ``classifier``; returns its card."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    split = patches_by_split(read_idc_patches(data_dir))
    train_patches, val_patches = split["train"], split["val"]
    train_emb, _ = embed_patches(classifier, data_dir, train_patches)
    val_emb, val_prob = embed_patches(classifier, data_dir, val_patches)
    train_bags = assemble_bags(train_patches, bags, rng)
    val_bags = assemble_bags(val_patches, max(bags // 4, 200), np.random.default_rng(seed + 1))
    x_train = torch.as_tensor(train_emb)
    x_val = torch.as_tensor(val_emb)
    model = GatedAttentionMIL(train_emb.shape[1], hidden=hidden, num_classes=len(classifier.labels))
    positive = classifier.labels.index(positive_label(classifier.labels))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_auc = -1.0
    val_labels = np.array([label for _, label in val_bags])
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for number in rng.permutation(len(train_bags)):
            idx, label = train_bags[int(number)]
            target = torch.tensor(positive if label else 1 - positive)
            logits = model(x_train[idx])
            loss = torch.nn.functional.cross_entropy(logits[None], target[None])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        scores = _bag_scores(model, x_val, val_bags)
        probability = torch.softmax(torch.as_tensor(scores), dim=1).numpy()[:, positive]
        auc = float(roc_auc_score(val_labels, probability))
        history.append({"epoch": epoch, "train_loss": total / len(train_bags), "val_auc": auc})
        if auc > best_auc:
            best_auc = auc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    logits = torch.as_tensor(_bag_scores(model, x_val, val_bags))
    targets = torch.as_tensor(np.where(val_labels == 1, positive, 1 - positive))
    temperatures = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
    nll = [
        float(torch.nn.functional.cross_entropy(logits / t, targets)) for t in temperatures
    ]
    temperature = temperatures[int(np.argmin(nll))]
    probability = torch.softmax(logits / temperature, dim=1).numpy()[:, positive]
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{AGGREGATOR_NAME}.pt"
    torch.save(model.state_dict(), weights)
    card: dict[str, Any] = {
        "name": AGGREGATOR_NAME,
        "version": VERSION,
        "modality": "SM",
        "task": "slide-level IDC probability from the tile embeddings of the SM patch model",
        "intended_use": "research and decision support only; not a medical device",
        "architecture": AGGREGATOR_ARCHITECTURE,
        "architecture_module": "inference.wsi.aggregator",
        "architecture_params": {
            "in_features": int(train_emb.shape[1]),
            "hidden": hidden,
            "num_classes": len(classifier.labels),
        },
        "labels": list(classifier.labels),
        "temperature": temperature,
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "patch_model": {
            "name": classifier.card.name,
            "version": classifier.card.version,
            "sha256": classifier.card.sha256,
        },
        "training_data": {
            "dataset": f"{IDC_FOLDER} (shared part), slides assembled from patches",
            "split": (
                f"the SM patch model's: by patient, stratified by majority label, "
                f"{SPLIT_FRACTIONS}, seed {split_seed()} (inference.datasets.split_by_group via "
                "inference.wsi.split); train bags from train patients, validation bags from "
                "val patients; test patients unused"
            ),
            "train_patients": len({p.patient_id for p in train_patches}),
            "val_patients": len({p.patient_id for p in val_patches}),
            "train_bags": len(train_bags),
            "val_bags": len(val_bags),
            "bag_recipe": (
                "one patient's non-IDC patches (8 to n+12 tiles, topped up with other "
                "same-split patients' non-IDC patches); positive bags add 1..all of the "
                "patient's IDC patches; half the bags positive"
            ),
            "seed": seed,
            "epochs": epochs,
        },
        "validation": {
            "aggregator": _metrics(probability, val_labels),
            "non_learned_rule_top1pct_mean": _metrics(rule_scores(val_prob, val_bags), val_labels),
            "history": history,
        },
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "training_seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    (out_dir / f"{AGGREGATOR_NAME}.card").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patch-card", type=Path, help="patch model card (default: bundled SM)")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--bags", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    classifier = (
        Classifier.from_card(ModelCard.from_file(args.patch_card))
        if args.patch_card
        else load_bundled("SM")
    )
    data_dir = args.data or shared_data_dir() / IDC_FOLDER
    card = train_aggregator(
        classifier, data_dir, args.out, bags=args.bags, epochs=args.epochs, seed=args.seed
    )
    print(json.dumps(card["validation"]["aggregator"]), json.dumps(
        card["validation"]["non_learned_rule_top1pct_mean"]
    ))


if __name__ == "__main__":
    main()
