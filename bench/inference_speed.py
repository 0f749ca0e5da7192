"""Inference benchmark: images/s of every bundled whole-image model (US, SM; not the MG patch
model, which runs eager on patch batches) at batch 1 and 64 on
``--threads`` threads, with each inference backend (eager PyTorch, TorchScript, ONNX Runtime),
and each backend's largest probability difference from eager on real images.

    python bench/inference_speed.py [--threads 2] [--seconds 3]

Per model and backend, three figures:
- ``trunk``: the convolutional trunk alone (``forward_features``: what the backend runs);
- ``serving``: what a worker runs per batch of preprocessed inputs (trunk through the backend,
  then the eager head, softmax, embedding and the Grad-CAM backward pass; ``Classifier._forward``);
- ``predict``: ``Classifier.predict_batch`` from uint8 pictures (MONAI preprocessing, the above,
  heatmap upsampling), batch 64 only.
Batch 1 is also given as latency (ms). Inputs are real pictures (BUSI, IDC patches, mini-MIAS)
of the model's modality, preprocessed as the serving path does.
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, shared_data, table, write_json  # noqa: E402

from inference import Classifier, ModelCard, bundled_cards  # noqa: E402
from inference.backends import BACKENDS  # noqa: E402
from inference.mammo_patches import is_patch_card  # noqa: E402

_FOLDERS = {"US": "busi", "SM": "idc-breast-histopathology", "MG": "mini-mias"}


def real_images(card: ModelCard, count: int) -> list[np.ndarray]:
    labels = shared_data() / _FOLDERS[card.modality] / "labels.csv"
    with labels.open() as handle:
        rows = list(csv.DictReader(handle))
    picked = rows[:: max(1, len(rows) // count)][:count]
    images = []
    for row in picked:
        with Image.open(labels.parent / row["path"]) as im:
            images.append(np.asarray(im.convert("RGB" if card.modality == "SM" else "L")))
    return images


def rate(function: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of ``function`` (one warm-up call, then repeated for ``seconds``)."""
    function()
    calls = 0
    started = time.perf_counter()
    while True:
        function()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= 2:
            return calls * items / elapsed


def _speeds(classifier: Classifier, inputs: torch.Tensor, images: list[np.ndarray],
            batches: tuple[int, ...], seconds: float) -> dict[str, float | None]:
    speeds: dict[str, float | None] = {}
    for batch in batches:
        chunk = inputs[:batch]
        trunk = functools.partial(classifier._features, chunk)
        serving = functools.partial(classifier._forward, chunk)
        with torch.no_grad():
            speeds[f"trunk_b{batch}"] = round(rate(trunk, batch, seconds), 1)
        speeds[f"serving_b{batch}"] = round(rate(serving, batch, seconds), 1)
    first = speeds.get("serving_b1")
    speeds["serving_b1_ms"] = round(1000 / first, 2) if first else None
    big = max(batches)
    speeds[f"predict_b{big}"] = round(rate(
        lambda: classifier.predict_batch(images[:big], batch_size=big), big, seconds), 1)
    return speeds


def run(threads: int, seconds: float, batches: tuple[int, ...] = (1, 64),
        backends: tuple[str, ...] = BACKENDS, quiet: bool = False) -> dict[str, Any]:
    torch.set_num_threads(threads)
    load_before = load_average()
    # whole-image models only: the MG patch model runs eager on patch batches (its card's
    # `throughput` has whole mammograms per second)
    cards = [c for c in bundled_cards() if c.modality in _FOLDERS and not is_patch_card(c)]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(cards) * len(backends), desc="inference", unit="backend",
               disable=quiet)
    for card in cards:
        images = real_images(card, max(batches))
        eager = Classifier.from_card(card)
        inputs = torch.stack([eager.preprocess(image) for image in images])
        reference = eager._forward(inputs)[0]
        for backend in backends:
            started = time.perf_counter()
            classifier = Classifier.from_card(card).with_backend(backend)
            prepare_seconds = time.perf_counter() - started
            probabilities = classifier._forward(inputs)[0]
            row: dict[str, Any] = {
                "model": f"{card.name} {card.version}", "modality": card.modality,
                "input": f"{inputs.shape[1]}x{card.input_size}x{card.input_size}",
                "backend": backend, "prepare_seconds": round(prepare_seconds, 2),
                "max_abs_probability_difference": float(np.abs(probabilities - reference).max()),
            }
            row.update(_speeds(classifier, inputs, images, batches, seconds))
            rows.append(row)
            bar.update(1)
    bar.close()
    return {
        "benchmark": "inference", "threads": threads, "machine": machine(),
        "load_average_before": load_before, "load_average_after": load_average(),
        "rows": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    big = max(int(key.rsplit("_b", 1)[1]) for key in report["rows"][0] if
              key.startswith("serving_b") and key[9:].isdigit())
    body = [
        [r["model"], r["backend"], r.get("trunk_b1"), r.get(f"trunk_b{big}"),
         r.get("serving_b1_ms"), r.get(f"serving_b{big}"), r.get(f"predict_b{big}"),
         f"{r['max_abs_probability_difference']:.1e}"]
        for r in report["rows"]
    ]
    print(table(body, ["model", "backend", "trunk b1 img/s", f"trunk b{big} img/s",
                       "serving b1 ms", f"serving b{big} img/s", f"predict b{big} img/s",
                       "max |dp| vs eager"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    report = run(args.threads, args.seconds)
    print_table(report)
    print(f"written {write_json('inference', report)}")


if __name__ == "__main__":
    main()
