"""Train a bundled classifier from scratch and write its weights, model card and figures.

    OMP_WAIT_POLICY=PASSIVE python -m inference.train --modality US --out runs/us_busi \
        [--epochs 120] [--seed 0] [--max-minutes 13]

(``OMP_WAIT_POLICY=PASSIVE`` keeps torch's two OpenMP threads from spinning, which on a 2-core
machine shared with other processes made training 2-4 times slower.)

Only ultrasound (BUSI) is trainable for now. Writes into the out dir: ``us_busi.pt`` (a
``state_dict``), ``us_busi.json`` (the model card), ``us_busi_curves.png`` and
``us_busi_confusion.png``. Copy the ``.pt`` and ``.json`` into ``inference/bundled/`` to ship them.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import set_track_meta
from monai.utils import set_determinism
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from inference.datasets import BUSI_LABELS, BusiDataset, Sample, read_labels, split_by_group
from inference.metrics import classification_metrics, fit_temperature, softmax
from inference.networks import BusiCNN
from inference.paths import shared_data_dir
from inference.transforms import augment_transform

TRAINABLE_MODALITIES: tuple[str, ...] = ("US",)


def sha256_of(path: Path) -> str:  # noqa: D103
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader[Any], hflip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of a whole loader, model in eval mode; with ``hflip`` the mean of the
    logits of each image and its left-right mirror (what ``Classifier`` does for such a card)."""
    model.eval()
    logits: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for images, labels in loader:
        output = model(images)
        if hflip:
            output = (output + model(torch.flip(images, dims=[3]))) / 2.0
        logits.append(output.float().numpy())
        targets.append(np.asarray(labels))
    return np.concatenate(logits), np.concatenate(targets)


def _split_summary(split: dict[str, list[Sample]]) -> dict[str, Any]:
    return {
        name: {
            "groups": len({s.group for s in samples}),
            "images": len(samples),
            "images_per_label": dict(sorted(Counter(s.label for s in samples).items())),
        }
        for name, samples in split.items()
    }


def _progress(step: int, total_steps: int, elapsed: float, deadline: float) -> float:
    """Fraction of the training budget used: by steps or by wall time, whichever is further."""
    return max(step / max(total_steps, 1), elapsed / max(deadline, 1e-9))


def _learning_rate(
    peak: float, step: int, warmup_steps: int, total_steps: int, elapsed: float, deadline: float
) -> float:
    """Linear warm-up, then cosine decay to 1% of ``peak`` over the budget (steps or time).

    Driving the cosine by wall time as well as steps lets a run on a busy shared CPU still
    finish its annealing inside the time budget (at the cost of bit-exact reproducibility).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(_progress(step, total_steps, elapsed, deadline), 1.0)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _selection_score(metrics: dict[str, Any]) -> float:
    auc = metrics["macro_auc_ovr"] or 0.0
    return 0.5 * float(auc) + 0.5 * float(metrics["accuracy"])


def _plot_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss (weighted CE)")
    ax_loss.plot(epochs, [h["val_nll"] for h in history], label="val NLL")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_score.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax_score.plot(epochs, [h["val_macro_auc"] for h in history], label="val macro AUC")
    ax_score.plot(epochs, [h["val_balanced_accuracy"] for h in history], label="val bal. acc.")
    for axis in (ax_loss, ax_score):
        axis.axvline(best_epoch, color="grey", linestyle=":", label="selected")
        axis.grid(alpha=0.3)
    ax_score.set_ylim(0.0, 1.0)
    ax_score.set_xlabel("epoch")
    ax_score.legend(loc="lower right")
    fig.suptitle("BusiCNN on BUSI: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(matrix)
    fig, axis = plt.subplots(figsize=(4.8, 4.2))
    axis.imshow(values, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for (row, col), count in np.ndenumerate(values):
        colour = "white" if count > values.max() / 2 else "black"
        axis.text(col, row, str(count), ha="center", va="center", color=colour)
    axis.set_title("test split confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(
    modality: str,
    data_dir: Path,
    out_dir: Path,
    epochs: int = 120,
    seed: int = 0,
    *,
    size: int = 192,
    stem_pool: bool = True,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    cutout: bool = False,
    patience: int = 30,
    max_minutes: float = 13.0,
    threads: int = 2,
    widths: Sequence[int] = (32, 64, 128, 256),
    name: str = "us_busi",
    version: str = "1.2.0",
) -> Path:
    """Train the ``modality`` classifier on ``data_dir`` and write it into ``out_dir``.

    Returns the path of the model card JSON (which names the weights file beside it). Training
    stops after ``epochs``, after ``patience`` epochs without a better validation score
    (mean of macro AUC and accuracy), or after ``max_minutes`` of wall time, whichever is first;
    the best validation epoch's (exponential moving average) weights are kept.
    """
    if modality.upper() not in TRAINABLE_MODALITIES:
        raise ValueError(f"no training recipe for modality {modality!r} (have: US)")
    started = time.monotonic()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    set_determinism(seed=seed)
    previous_track_meta = _track_meta()
    set_track_meta(False)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        labels = BUSI_LABELS
        samples = read_labels(data_dir)
        split = split_by_group(samples, seed=seed)
        augment = augment_transform(size, cutout=cutout)
        augment.set_random_state(seed=seed)
        train_set = BusiDataset(data_dir, split["train"], size, augment=augment, labels=labels)
        val_set = BusiDataset(data_dir, split["val"], size, labels=labels)
        test_set = BusiDataset(data_dir, split["test"], size, labels=labels)
        generator = torch.Generator().manual_seed(seed)
        train_loader = DataLoader(
            train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator
        )
        val_loader = DataLoader(val_set, batch_size=64)
        test_loader = DataLoader(test_set, batch_size=64)

        counts = np.bincount(train_set.targets, minlength=len(labels)).astype(np.float64)
        class_weights = counts.sum() / (len(labels) * counts)
        architecture_params: dict[str, Any] = {
            "in_channels": 1,
            "num_classes": len(labels),
            "widths": list(widths),
            "blocks_per_stage": 1,
            "dropout": 0.3,
            "stem_pool": stem_pool,
        }
        model = BusiCNN(**architecture_params)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.98), use_buffers=True)
        criterion = nn.CrossEntropyLoss(
            weight=torch.tensor(class_weights, dtype=torch.float32), label_smoothing=0.05
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = len(train_loader)
        warmup_steps = 3 * steps_per_epoch
        total_steps = epochs * steps_per_epoch
        deadline = max_minutes * 60.0
        step = 0

        history: list[dict[str, float]] = []
        best_score = -math.inf
        best_epoch = 0
        best_state: dict[str, torch.Tensor] = {}
        stop_reason = "epochs"
        progress = tqdm(range(1, epochs + 1), desc=f"train {name}", unit="epoch")
        for epoch in progress:
            model.train()
            running = 0.0
            seen = 0
            for images, targets in train_loader:
                elapsed = time.monotonic() - started
                current_lr = _learning_rate(lr, step, warmup_steps, total_steps, elapsed, deadline)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                optimizer.zero_grad(set_to_none=True)
                images = images.contiguous(memory_format=torch.channels_last)
                loss = criterion(model(images), targets)
                loss.backward()
                optimizer.step()
                ema.update_parameters(model)
                step += 1
                running += float(loss.detach()) * len(targets)
                seen += len(targets)
            val_logits, val_targets = predict_logits(ema.module, val_loader)
            val_metrics = classification_metrics(softmax(val_logits), val_targets, labels)
            score = _selection_score(val_metrics)
            raw_logits, _ = predict_logits(model, val_loader)
            raw_accuracy = float(np.mean(raw_logits.argmax(axis=1) == val_targets))
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": running / max(seen, 1),
                    "val_nll": val_metrics["nll"],
                    "val_accuracy": val_metrics["accuracy"],
                    "val_balanced_accuracy": val_metrics["balanced_accuracy"],
                    "val_macro_auc": val_metrics["macro_auc_ovr"] or 0.0,
                    "val_accuracy_raw_weights": raw_accuracy,
                    "lr": current_lr,
                    "minutes": (time.monotonic() - started) / 60,
                }
            )
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(ema.module.state_dict())
            progress.set_postfix(
                loss=f"{history[-1]['train_loss']:.3f}",
                val_acc=f"{val_metrics['accuracy']:.3f}",
                val_auc=f"{history[-1]['val_macro_auc']:.3f}",
                raw_acc=f"{raw_accuracy:.3f}",
                best=best_epoch,
            )
            if epoch - best_epoch >= patience:
                stop_reason = f"early stop: no better validation score for {patience} epochs"
                break
            if _progress(step, total_steps, time.monotonic() - started, deadline) >= 1.0:
                if step < total_steps:
                    stop_reason = f"wall-time budget of {max_minutes} minutes reached"
                break
        progress.close()

        final = BusiCNN(**architecture_params)
        final.load_state_dict({k: v.contiguous() for k, v in best_state.items()})
        final.eval()
        # Test-time left-right flip averaging is kept only if it scores better on validation.
        plain_logits, val_targets = predict_logits(final, val_loader)
        flip_logits, _ = predict_logits(final, val_loader, hflip=True)
        plain_score = _selection_score(
            classification_metrics(softmax(plain_logits), val_targets, labels)
        )
        flip_score = _selection_score(
            classification_metrics(softmax(flip_logits), val_targets, labels)
        )
        hflip = flip_score > plain_score
        val_logits = flip_logits if hflip else plain_logits
        temperature = fit_temperature(val_logits, val_targets)
        val_metrics = classification_metrics(
            softmax(val_logits, temperature), val_targets, labels
        )
        # The test split is evaluated once, here, with the selected weights and temperature.
        test_logits, test_targets = predict_logits(final, test_loader, hflip=hflip)
        test_metrics = classification_metrics(
            softmax(test_logits, temperature), test_targets, labels
        )
        training_seconds = time.monotonic() - started

        weights_path = out_dir / f"{name}.pt"
        torch.save(final.state_dict(), weights_path)
        parameters = sum(p.numel() for p in final.parameters())
        card: dict[str, Any] = {
            "name": name,
            "version": version,
            "modality": "US",
            "task": "breast ultrasound image classification (normal / benign / malignant)",
            "intended_use": (
                "research and decision support only; not a medical device; trained on one "
                "public data set from one hospital"
            ),
            "architecture": "BusiCNN",
            "architecture_module": "inference.networks.busi_cnn",
            "architecture_params": architecture_params,
            "parameters": parameters,
            "input_size": size,
            "in_channels": 1,
            "labels": list(labels),
            "preprocessing": (
                "display pixels (uint8 grayscale or RGB) -> luma (BT.601) -> resize to "
                f"{size}x{size} (bilinear with anti-aliasing, aspect ratio not kept, as BUSI "
                "itself was resized) -> scale 0..255 to 0..1 -> per-image z-score"
            ),
            "postprocessing": "softmax(logits / temperature)",
            "temperature": temperature,
            "test_time_augmentation": "hflip" if hflip else "none",
            "test_time_augmentation_note": (
                "hflip = logits averaged over the image and its left-right mirror; chosen on "
                f"validation (score {flip_score:.4f} with, {plain_score:.4f} without)"
            ),
            "heatmap": "Grad-CAM on the last residual stage (features), ReLU, upsampled, 0..1",
            "embedding": f"global-average-pooled last-stage features ({final.embedding_size})",
            "weights": weights_path.name,
            "weights_format": "torch.save(state_dict), load with weights_only=True",
            "training_data": {
                "dataset": "BUSI (Dataset_BUSI_with_GT), 256x256 re-sized copy, shared part",
                "source": "shared/data/busi/SOURCE.md (Al-Dhabyani et al., Data in Brief 2020)",
                "images": len(samples),
                "groups": len({s.group for s in samples}),
                "images_per_label": dict(sorted(Counter(s.label for s in samples).items())),
            },
            "split": {
                "method": (
                    "by dup_group (near-duplicate groups, dHash), stratified by the group's "
                    "majority label, 70/15/15; inference.datasets.split_by_group"
                ),
                "seed": seed,
                **_split_summary(split),
            },
            "training": {
                "optimizer": f"AdamW peak lr={lr} weight_decay={weight_decay}",
                "schedule": "3-epoch linear warm-up, cosine over max(steps, wall-time budget)",
                "max_minutes": max_minutes,
                "loss": "cross-entropy, inverse-frequency class weights, label smoothing 0.05",
                "class_weights": dict(zip(labels, [round(float(w), 4) for w in class_weights],
                                          strict=True)),
                "augmentation": (
                    "left-right flip, affine (rotation +-12 deg, zoom +-15%, shift +-6%), "
                    "gamma, gain, Gaussian blur, Gaussian noise"
                    + (", coarse dropout (cutout)" if cutout else "")
                    + " (MONAI)"
                ),
                "batch_size": batch_size,
                "ema_decay": 0.98,
                "epochs_run": len(history),
                "epochs_max": epochs,
                "selected_epoch": best_epoch,
                "selection": "best validation mean(macro AUC, accuracy), EMA weights",
                "stop_reason": stop_reason,
                "seconds": round(training_seconds, 1),
                "torch_threads": threads,
            },
            "metrics": {
                "val": val_metrics,
                "test": test_metrics,
                "note": "test = this card's own held-out dup_group split, evaluated once",
            },
            "sha256": sha256_of(weights_path),
            "date": dt.date.today().isoformat(),
            "machine": "2-core CPU, no GPU",
            "software": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "monai": _monai_version(),
            },
        }
        card_path = out_dir / f"{name}.json"
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        (out_dir / f"{name}_history.json").write_text(json.dumps(history, indent=1) + "\n")
        _plot_curves(history, best_epoch, out_dir / f"{name}_curves.png")
        _plot_confusion(test_metrics["confusion_matrix"], labels, out_dir / f"{name}_confusion.png")
        return card_path
    finally:
        set_track_meta(previous_track_meta)


def _track_meta() -> bool:
    from monai.data import get_track_meta

    return bool(get_track_meta())


def _monai_version() -> str:
    import monai

    return str(monai.__version__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--modality", default="US", help="only US for now")
    parser.add_argument("--data", type=Path, default=None, help="default: <shared data>/busi")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--no-stem-pool", dest="stem_pool", action="store_false")
    parser.add_argument("--max-minutes", type=float, default=13.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--model-version", default="1.2.0", help="version written to the card")
    args = parser.parse_args(argv)
    data_dir = args.data if args.data is not None else shared_data_dir() / "busi"
    card_path = train(
        args.modality,
        data_dir,
        args.out,
        epochs=args.epochs,
        seed=args.seed,
        size=args.size,
        stem_pool=args.stem_pool,
        max_minutes=args.max_minutes,
        lr=args.lr,
        version=args.model_version,
    )
    card = json.loads(card_path.read_text())
    test = card["metrics"]["test"]
    print(
        f"wrote {card_path}: test accuracy {test['accuracy']:.3f}, "
        f"macro AUC {test['macro_auc_ovr']:.3f}, {card['training']['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
