"""Similar-case retrieval quality on BUSI: precision@k of the retrieved cases' labels.

    python bench/similar_cases.py            # bundled US model, BUSI split seed 0, k=5
    python bench/similar_cases.py --k 10 --json-out similar.json

Index = the train split, queries = the test split (``inference.datasets.split_by_group``, seed 0:
whole duplicate groups, so no query image has a copy in the index). Embeddings are the bundled
model's penultimate layer, made by ``Classifier.predict_batch`` as in the node; ranking is
``dicom_node.similar.rank`` (cosine distance, one hit per case; a case here is a BUSI duplicate
group, as a study is in the node). precision@k = the share of the k retrieved cases whose
ground-truth label equals the query's, averaged over queries. Also printed: the same per class,
the chance level (random retrieval from this index), and the accuracy of a k-NN majority vote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from dicom_node.similar import normalised, rank
from inference import load_bundled
from inference.datasets import Sample, load_image, read_labels, split_by_group
from inference.paths import shared_data_dir


def embed(samples: list[Sample], busi: Path, modality: str, batch: int) -> np.ndarray:
    classifier = load_bundled(modality)
    rows: list[np.ndarray] = []
    for start in range(0, len(samples), batch):
        images = [load_image(busi / s.path) for s in samples[start : start + batch]]
        rows.extend(normalised(p.embedding) for p in classifier.predict_batch(images, batch))
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="BUSI folder (labels.csv)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    busi = args.data or shared_data_dir() / "busi"
    split = split_by_group(read_labels(busi), seed=args.seed)
    index_samples, queries = split["train"], split["test"]

    started = time.perf_counter()
    index = embed(index_samples, busi, "US", args.batch)
    query_vectors = embed(queries, busi, "US", args.batch)
    embed_seconds = time.perf_counter() - started

    groups = [s.group for s in index_samples]
    hits: dict[str, list[float]] = {}
    votes_right = 0
    started = time.perf_counter()
    for sample, vector in zip(queries, query_vectors, strict=True):
        found = rank(vector, index, groups, args.k)
        labels = [index_samples[i].label for i, _distance in found]
        hits.setdefault(sample.label, []).append(
            sum(label == sample.label for label in labels) / len(labels)
        )
        votes_right += Counter(labels).most_common(1)[0][0] == sample.label
    search_ms = 1000 * (time.perf_counter() - started) / len(queries)

    all_hits = [h for values in hits.values() for h in values]
    index_share = Counter(s.label for s in index_samples)
    chance = sum(
        len(values) / len(queries) * index_share[label] / len(index_samples)
        for label, values in hits.items()
    )
    summary = {
        "k": args.k,
        "seed": args.seed,
        "index_images": len(index_samples),
        "queries": len(queries),
        f"precision_at_{args.k}": round(float(np.mean(all_hits)), 4),
        f"precision_at_{args.k}_by_class": {
            label: round(float(np.mean(values)), 4) for label, values in sorted(hits.items())
        },
        "chance_level": round(chance, 4),
        f"knn{args.k}_majority_accuracy": round(votes_right / len(queries), 4),
        "model": load_bundled("US").card.data.get("version"),
        "embed_seconds": round(embed_seconds, 1),
        "search_ms_per_query": round(search_ms, 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
    }
    print(json.dumps(summary, indent=2))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
