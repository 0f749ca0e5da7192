"""Cross-validated image-level pooling for the mammography patch model (mini-MIAS).

    python bench/mg_cv.py train --out runs/mg_cv          # 4 patch models, ~5 min each
    python bench/mg_cv.py pool  --out runs/mg_cv          # the pooling table from their outputs
    python bench/mg_cv.py pool  --out runs/a --ensemble runs/b runs/c   # runs' mean patch scores

Why: the mg_mias patch model's test split has been looked at once (docs/MODELS.md), and its 42
validation images gave a validation AUC (0.83) the test split did not confirm (0.58). Choices made
from here on are made by cross-validation on the development patients (the split's train + val,
116 women, 232 images); the test split is never loaded.

``train``: the development patients are cut into ``--folds`` folds by patient (stratified by the
patient's majority label). For each fold a patch model is trained with the committed recipe
(``inference.train_mammo.train_patch_model``) on the other folds, its epoch chosen on an inner
validation part of them (20 % of their patients), and the held-out fold's grid patch
probabilities are saved. Every development image thus gets patch scores from a model that never
saw its patient.

``pool``: image scores from those out-of-fold patch scores, and their AUC normal vs abnormal over
all development images, with a 95 % interval from a bootstrap over patients:
- ``top-k``: the mean of the k highest patch lesion probabilities (the bundled rule);
- ``bilateral``: top-k of this breast minus ``lambda`` times top-k of the other breast of the same
  woman (mini-MIAS has both MLO views of every woman; in a four-view study the node has both
  breasts in one job): dense tissue tends to be dense on both sides, a lesion on one;
- ``no-pectoral``: patches whose centre lies in the upper chest-wall corner (the pectoral muscle
  of an MLO view, chest wall turned left) left out of the top-k.
The primary comparison was fixed before the numbers were seen: top-3 against bilateral top-3
with lambda 1. The other rows are exploratory, and with this many of them on 232 images the best
one is optimistic.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.datasets import MIAS_LABELS, Sample, read_mias, split_by_group  # noqa: E402
from inference.mammo_cv import load_ensemble, load_images, write_fold  # noqa: E402
from inference.paths import shared_data_dir  # noqa: E402
from inference.train_mammo import EPOCH_SCORES, EpochScore  # noqa: E402

FOLDS = 4
SEED = 0


def development_samples(data_dir: Path) -> list[Sample]:
    """The split's train + val images; the test split is left out and never read."""
    split = split_by_group(read_mias(data_dir), seed=SEED, labels=MIAS_LABELS)
    return split["train"] + split["val"]


def folds_of(samples: list[Sample], folds: int, seed: int) -> list[list[Sample]]:
    """Patients cut into ``folds`` folds, stratified by the patient's majority label."""
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_patient[sample.group].append(sample)
    rank = {label: i for i, label in enumerate(MIAS_LABELS)}
    strata: dict[str, list[str]] = defaultdict(list)
    for patient, members in sorted(by_patient.items()):
        counts = Counter(m.label for m in members)
        strata[min(counts, key=lambda lab: (-counts[lab], rank[lab]))].append(patient)
    rng = np.random.default_rng(seed)
    out: list[list[Sample]] = [[] for _ in range(folds)]
    position = 0
    for stratum in sorted(strata):
        patients = strata[stratum]
        for index in rng.permutation(len(patients)):
            out[position % folds].extend(by_patient[patients[index]])
            position += 1
    return out


def image_sides(data_dir: Path) -> dict[str, str]:
    with (data_dir / "labels.csv").open(newline="") as handle:
        return {row["path"]: row["side"] for row in csv.DictReader(handle)}


def image_abnormalities(data_dir: Path) -> dict[str, str]:
    """mini-MIAS abnormality class of each image (its first row): NORM, CALC, CIRC, SPIC, MISC,
    ARCH or ASYM."""
    found: dict[str, str] = {}
    with (data_dir / "labels.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            found.setdefault(row["path"], row["abnormality"])
    return found


def train_folds(data_dir: Path, out: Path, folds: int, max_minutes: float, threads: int,
                epochs: int, last_epoch: bool, bilateral_selection: bool, seed: int,
                working_height: int | None, architecture: str = "BusiCNN",
                patch: int | None = None, select_by: EpochScore = "image+patch") -> None:
    import torch
    from monai.utils import set_determinism

    from inference.mammo_patches import PatchSettings
    from inference.networks import resolve_architecture
    from inference.train_mammo import (
        build_records,
        image_outputs,
        patch_network_params,
        recipe_settings,
        train_patch_model,
    )

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    samples = development_samples(data_dir)
    sides = image_sides(data_dir)
    parts = folds_of(samples, folds, SEED)
    settings = recipe_settings(
        **({} if patch is None else {"patch": patch}),
        **({} if working_height is None else {"working_height": working_height}))
    if not bilateral_selection:
        settings = PatchSettings(**{**settings.as_dict(), "bilateral_lambda": 0.0})
    architecture = resolve_architecture(architecture)
    params = patch_network_params(architecture, settings.patch)
    for fold, held in enumerate(parts):
        target = out / f"fold{fold}.npz"
        if target.exists():
            print(f"fold {fold}: {target} exists, kept", flush=True)
            continue
        rest = [s for i, part in enumerate(parts) if i != fold for s in part]
        inner = split_by_group(rest, seed=SEED + 1 + fold, fractions=(0.8, 0.2, 0.0),
                               labels=MIAS_LABELS)
        split = {"train": inner["train"], "val": inner["val"], "test": held}
        print(f"fold {fold} ({architecture}): train {len(inner['train'])} val "
              f"{len(inner['val'])} held out {len(held)} images", flush=True)
        set_determinism(seed=seed + fold)
        started = time.monotonic()
        run = train_patch_model(
            data_dir, split, MIAS_LABELS, architecture=architecture, params=params,
            settings=settings, epochs=epochs, lr=2e-3, weight_decay=0.05, batch_size=64,
            patience=15, max_minutes=max_minutes, seed=seed + fold, started=started,
            select_epoch=not last_epoch, select_by=select_by,
        )
        records = build_records(data_dir, held, MIAS_LABELS, settings)
        outputs = image_outputs(run.network, records, settings, desc=f"score fold {fold}")
        images = [
            {"path": r.sample.path, "patient": r.sample.group, "side": sides[r.sample.path],
             "target": r.target, "p": probabilities, "centres": r.grid,
             "shape": r.view.tissue.shape}
            for r, (probabilities, _) in zip(records, outputs, strict=True)
        ]
        write_fold(target, images, best_epoch=run.best_epoch,
                   seconds=time.monotonic() - started)
        print(f"fold {fold}: best epoch {run.best_epoch}, {time.monotonic() - started:.0f} s, "
              f"inner val score {max(h['val_score'] for h in run.history):.3f}", flush=True)


def lesion(image: dict[str, Any], no_pectoral: float) -> np.ndarray:
    """Patch lesion probabilities, with the upper chest-wall corner left out if asked: a patch
    is dropped when row / height + column / width < ``no_pectoral``."""
    values = image["p"][:, 1] + image["p"][:, 2]
    if no_pectoral <= 0:
        return values
    height, width = image["shape"]
    centres = image["centres"]
    keep = centres[:, 0] / height + centres[:, 1] / width >= no_pectoral
    return values[keep] if keep.any() else values


def topk(values: np.ndarray, k: int) -> float:
    return float(np.sort(values)[::-1][:k].mean())


def scores(images: list[dict[str, Any]], k: int, lam: float, no_pectoral: float) -> np.ndarray:
    from inference.train_mammo import ranking_scores

    own = np.array([topk(lesion(im, no_pectoral), k) for im in images])
    return ranking_scores(own, [im["patient"] for im in images], lam)


def bootstrap_by_woman(images: list[dict[str, Any]],
                       statistic: Callable[[np.ndarray, np.ndarray], float], seed: int,
                       rounds: int = 2000) -> tuple[float, float, float]:
    """``statistic(truth, index)`` on all images, and its 95 % interval from ``rounds``
    resamplings of the women (both of a woman's images go together)."""
    truth = np.array([im["target"] > 0 for im in images], dtype=int)
    members: dict[str, list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        members[image["patient"]].append(index)
    patients = sorted(members)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(rounds):
        chosen = rng.choice(len(patients), size=len(patients), replace=True)
        drawn = np.array([i for c in chosen for i in members[patients[c]]])
        if truth[drawn].all() or not truth[drawn].any():
            continue
        draws.append(statistic(truth, drawn))
    low, high = np.percentile(draws, [2.5, 97.5])
    return statistic(truth, np.arange(len(images))), float(low), float(high)


def auc_with_interval(images: list[dict[str, Any]], values: np.ndarray, rounds: int = 2000
                      ) -> tuple[float, float, float]:
    from sklearn.metrics import roc_auc_score

    return bootstrap_by_woman(
        images, lambda truth, index: float(roc_auc_score(truth[index], values[index])), seed=1,
        rounds=rounds)


def paired_difference(images: list[dict[str, Any]], a: np.ndarray, b: np.ndarray,
                      rounds: int = 2000) -> tuple[float, float, float]:
    """AUC(b) - AUC(a), with a bootstrap 95 % interval over women."""
    from sklearn.metrics import roc_auc_score

    return bootstrap_by_woman(
        images, lambda truth, index: float(roc_auc_score(truth[index], b[index])
                                           - roc_auc_score(truth[index], a[index])), seed=2,
        rounds=rounds)


def pool(data_dir: Path, out: Path, ensemble: list[Path] | None = None, rounds: int = 2000
         ) -> dict[str, Any]:
    try:
        images = load_ensemble([out, *ensemble]) if ensemble else load_images(out)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    if not images:
        raise SystemExit(f"no fold*.npz in {out}: run `python bench/mg_cv.py train` first")
    normal = sum(1 for im in images if im["target"] == 0)
    print(f"{len(images)} development images ({normal} normal, {len(images) - normal} "
          f"abnormal) of {len({im['patient'] for im in images})} women, out-of-fold scores\n")
    rows = []
    print("| pooling | k | lambda | pectoral cut | AUC normal vs abnormal | 95 % interval |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, lam, cut in (("top-k", 0.0, 0.0), ("bilateral", 1.0, 0.0),
                           ("bilateral", 0.5, 0.0), ("no-pectoral", 0.0, 0.5),
                           ("bilateral + no-pectoral", 1.0, 0.5)):
        for k in (1, 3, 5, 8):
            auc, low, high = auc_with_interval(images, scores(images, k, lam, cut), rounds)
            rows.append({"pooling": name, "k": k, "lambda": lam, "pectoral_cut": cut,
                         "auc": auc, "low": low, "high": high})
            print(f"| {name} | {k} | {lam:g} | {cut:g} | {auc:.3f} | {low:.3f}-{high:.3f} |")
    kinds = image_abnormalities(data_dir)
    normal_index = [i for i, im in enumerate(images) if im["target"] == 0]
    print("\nby abnormality class (its images against every normal image; top-3 | bilateral "
          "top-3):")
    single, bilateral = scores(images, 3, 0.0, 0.0), scores(images, 3, 1.0, 0.0)
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({kinds[im["path"]] for im in images} - {"NORM"}):
        members = [i for i, im in enumerate(images) if kinds[im["path"]] == kind
                   and im["target"] > 0]
        index = np.array(normal_index + members)
        truth = np.array([0] * len(normal_index) + [1] * len(members))
        from sklearn.metrics import roc_auc_score

        by_kind[kind] = {"images": len(members),
                         "top3": float(roc_auc_score(truth, single[index])),
                         "bilateral_top3": float(roc_auc_score(truth, bilateral[index]))}
        print(f"  {kind}: {len(members)} images, AUC {by_kind[kind]['top3']:.3f} | "
              f"{by_kind[kind]['bilateral_top3']:.3f}")
    primary = paired_difference(images, scores(images, 3, 0.0, 0.0),
                                scores(images, 3, 1.0, 0.0), rounds)
    print(f"\nprimary: bilateral top-3 (lambda 1) minus top-3: AUC difference {primary[0]:+.3f} "
          f"(95 % interval {primary[1]:+.3f} to {primary[2]:+.3f})")
    result = {"images": len(images), "normal": normal, "rows": rows,
              "by_abnormality": by_kind, "primary_difference": primary}
    name = "pooling_ensemble.json" if ensemble else "pooling.json"
    (out / name).write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("step", choices=("train", "pool"))
    parser.add_argument("--out", type=Path, default=Path("runs/mg_cv"))
    parser.add_argument("--data", type=Path, default=None,
                        help="mini-mias folder (default: shared data)")
    parser.add_argument("--folds", type=int, default=FOLDS)
    parser.add_argument("--ensemble", type=Path, nargs="*", default=None,
                        help="pool: average the patch probabilities of these runs' folders "
                             "with --out's")
    parser.add_argument("--max-minutes", type=float, default=6.0,
                        help="training budget per fold")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="BusiCNN",
                        help="patch network (an --arch of breastcad train; default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--working-height", type=int, default=None,
                        help="rows of the working image (default: the recipe's; 256 gives "
                             "800 micron pixels on mini-MIAS, 512 400 micron)")
    parser.add_argument("--patch", type=int, default=None,
                        help="patch side in working pixels (default: the recipe's 64; the "
                             "grid stride is a quarter of it)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="training seed of fold 0 (fold k: seed + k); the folds stay fixed")
    parser.add_argument("--single-image-selection", action="store_true",
                        help="choose the epoch and top_k by the single-image AUC (the first run)")
    parser.add_argument("--select-by", choices=EPOCH_SCORES, default=EPOCH_SCORES[0],
                        help="inner-validation score that chooses the epoch (default: the "
                             "recipe's mean of image and patch AUC)")
    parser.add_argument("--last-epoch", action="store_true",
                        help="keep the last epoch's weights instead of the inner-validation best")
    args = parser.parse_args()
    data_dir = args.data or shared_data_dir() / "mini-mias"
    if args.step == "train":
        train_folds(data_dir, args.out, args.folds, args.max_minutes, args.threads, args.epochs,
                    args.last_epoch, not args.single_image_selection, args.seed,
                    args.working_height, args.arch, args.patch, args.select_by)
    pool(data_dir, args.out, args.ensemble)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
