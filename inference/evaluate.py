"""Evaluate a classifier on a folder of labelled images: ``breastcad evaluate``.

The folder holds one sub-folder per label, named exactly as the model card's labels (US and MG:
``normal``, ``benign``, ``malignant``; histopathology patches: ``non_idc``, ``idc``), with PNG,
JPEG, TIFF or DICOM files inside. Without a model path the bundled model of the modality is used.

Mammography: a model with a bilateral rule scores each breast against the woman's other breast,
as the node does for a two-breast study. Which images are one woman's two breasts comes from the
``pairs`` CSV when given, else from the folder's own ``labels.csv`` when it has the columns
``path``, ``patient_id`` and ``side`` (mini-MIAS's has), else from the DICOM files' PatientID and
ImageLaterality (or Laterality); ``pair_breasts=False`` scores every image alone. The result says
where the pairs came from (``pairs_from``) and how many images were compared.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from inference.bundled import load_bundled
from inference.card import ModelCard
from inference.classifier import Classifier
from inference.dicom_pixels import image_from_file, image_laterality
from inference.mammo_patches import MammoPatchClassifier, classifier_from_card
from inference.metrics import evaluation_metrics
from inference.prediction import Prediction

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"})


class EvaluationError(ValueError):
    """The folder or the model cannot be evaluated (the message says why)."""


def load_model(modality: str, model: Path | None) -> Classifier:
    """The bundled model of ``modality``, or the card at ``model`` (a card JSON, or a folder
    holding exactly one card); EvaluationError when it is not of that modality."""
    if model is None:
        return load_bundled(modality)
    card_path = model
    if model.is_dir():
        cards = sorted(p for p in model.glob("*.json") if not p.name.endswith("_history.json"))
        if len(cards) != 1:
            raise EvaluationError(f"{model} must hold exactly one model card, found {len(cards)}")
        card_path = cards[0]
    if not card_path.is_file():
        raise EvaluationError(f"no model card at {card_path}")
    card = ModelCard.from_file(card_path)
    if card.modality != modality.strip().upper():
        raise EvaluationError(f"model {card.name} is for {card.modality}, not {modality}")
    return classifier_from_card(card)


def labelled_files(data_dir: Path, labels: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(file, label) for every image file under ``data_dir/<label>/``, sorted.

    EvaluationError for a sub-folder whose name is not one of ``labels``, or an empty folder.
    """
    if not data_dir.is_dir():
        raise EvaluationError(f"{data_dir} is not a folder")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in labels]
    if unknown:
        raise EvaluationError(
            f"unknown label folder(s) {', '.join(repr(u) for u in unknown)} in {data_dir}; "
            f"the model's labels are {', '.join(labels)}"
        )
    files: list[tuple[Path, str]] = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or not path.suffix):
                files.append((path, folder.name))
    if not files:
        raise EvaluationError(
            f"no images in {data_dir}: expected sub-folders named {', '.join(labels)}"
        )
    return files


def read_pairs(pairs: Path) -> dict[str, tuple[str, str]]:
    """``path -> (woman, side)`` from a CSV with the columns ``path`` (relative to the evaluated
    folder), ``patient_id`` and ``side`` (``L`` or ``R``), as mini-MIAS's ``labels.csv`` has."""
    try:
        with pairs.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"cannot read pairs file {pairs}: {exc}") from exc
    missing = {"path", "patient_id", "side"} - set(rows[0] if rows else {})
    if missing:
        raise EvaluationError(f"pairs file {pairs} lacks the column(s) {', '.join(sorted(missing))}"
                              " (needs path, patient_id, side)")
    return {row["path"]: (row["patient_id"], row["side"].strip().upper()) for row in rows}


def has_bilateral_rule(classifier: Classifier) -> TypeGuard[MammoPatchClassifier]:
    """Whether the model scores a breast against the other one (``patch_model.bilateral_*``)."""
    return (isinstance(classifier, MammoPatchClassifier)
            and classifier.settings.bilateral_lambda > 0)


def found_pairs(data_dir: Path, files: list[tuple[Path, str]]
                ) -> tuple[dict[str, tuple[str, str]], str] | None:
    """``(path -> (woman, side), source)`` found without a pairs file: the folder's own
    ``labels.csv`` when it has the columns ``path``, ``patient_id`` and ``side``, else the
    PatientID and laterality of its DICOM files; None when neither names anyone's breast."""
    own = data_dir / "labels.csv"
    if own.is_file():
        try:
            return read_pairs(own), "labels.csv"
        except EvaluationError:
            pass  # a labels.csv of another layout says nothing about pairs
    found: dict[str, tuple[str, str]] = {}
    for path, _ in files:
        try:  # a PNG or JPEG has no DICM preamble: refused after its first 132 bytes
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue  # image_from_file reports an unreadable file when it reads the pixels
        woman, side = str(ds.get("PatientID", "") or "").strip(), image_laterality(ds)
        if woman and side is not None:
            found[path.relative_to(data_dir).as_posix()] = (woman, side)
    return (found, "dicom") if found else None


def compare_breasts(
    classifier: Classifier, predictions: list[Prediction], relative_paths: list[str],
    pairs: dict[str, tuple[str, str]],
) -> tuple[list[Prediction], int]:
    """Each image with a partner (same ``patient_id``, the other ``side``) compared with it by
    the model's bilateral rule, as the node compares a study's two breasts; the count compared."""
    if not has_bilateral_rule(classifier):
        raise EvaluationError(f"model {classifier.card.name} has no bilateral rule "
                              "(patch_model.bilateral_lambda): --pairs does not apply")
    by_breast: dict[tuple[str, str], list[int]] = {}
    for index, path in enumerate(relative_paths):
        key = pairs.get(path)
        if key is not None and key[1] in ("L", "R"):
            by_breast.setdefault(key, []).append(index)
    out, compared = list(predictions), 0
    for (woman, side), members in by_breast.items():
        other = [predictions[j] for j in by_breast.get((woman, "L" if side == "R" else "R"), [])]
        if not other:
            continue
        for index in members:
            out[index] = classifier.bilateral_finding(predictions[index], [predictions[index]],
                                                      other)
            compared += int(out[index] is not predictions[index])  # not when nothing assessable
    return out, compared


def evaluate_folder(
    modality: str,
    data_dir: Path,
    model: Path | None = None,
    batch_size: int = 64,
    progress: Callable[[int], object] | None = None,
    pairs: Path | None = None,
    pair_breasts: bool = True,
) -> dict[str, Any]:
    """Classify every image of ``data_dir`` and return the metrics (``evaluation_metrics``)
    plus the model's name/version/sha256, the number flagged not assessable and images/s.

    ``pairs`` (MG): a CSV naming each image's woman and side; images with a partner are then
    scored by the model's bilateral rule (``compare_breasts``), and ``bilateral_compared`` says
    how many were. Without it, a model with a bilateral rule takes the pairs ``found_pairs``
    finds, unless ``pair_breasts`` is False; ``pairs_from`` names the source (None: each image
    was scored alone)."""
    classifier = load_model(modality, model)
    labels = classifier.labels
    files = labelled_files(data_dir, labels)
    pairing: dict[str, tuple[str, str]] | None = None
    pairs_from: str | None = None
    if pairs is not None:
        if not pair_breasts:
            raise EvaluationError("a pairs file and single-image scoring exclude each other")
        pairing, pairs_from = read_pairs(pairs), str(pairs)
    elif pair_breasts and has_bilateral_rule(classifier):
        found = found_pairs(data_dir, files)
        if found is not None:
            pairing, pairs_from = found
    predictions: list[Prediction] = []
    not_assessable = 0
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = []
        for path, _ in chunk:
            try:
                images.append(image_from_file(path))
            except ValueError as exc:
                raise EvaluationError(f"cannot read {path}: {exc}") from exc
        for prediction in classifier.predict_batch(images, batch_size=batch_size):
            predictions.append(prediction)
            not_assessable += int(prediction.not_assessable)
        if progress is not None:
            progress(len(chunk))
    compared = None
    if pairing is not None:
        relative = [path.relative_to(data_dir).as_posix() for path, _ in files]
        predictions, compared = compare_breasts(classifier, predictions, relative, pairing)
    probabilities = [[p.probabilities[label] for label in labels] for p in predictions]
    seconds = time.perf_counter() - started
    targets = np.array([labels.index(label) for _, label in files])
    # Accuracy, F1 and the confusion matrix score the labels the node serves (an MG card's
    # operating point is not the argmax); the AUCs, NLL and ECE score the probabilities.
    served = np.array([labels.index(p.label) for p in predictions], dtype=np.int64)
    result = evaluation_metrics(np.asarray(probabilities), targets, labels, served)
    result["model"] = {
        "name": classifier.card.name,
        "version": classifier.card.version,
        "sha256": classifier.card.sha256,
    }
    result["not_assessable"] = not_assessable
    result["pairs_from"] = pairs_from
    if compared is not None:
        result["bilateral_compared"] = compared
    result["images_per_second"] = len(files) / seconds if seconds > 0 else None
    return result
