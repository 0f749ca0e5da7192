"""``breastcad train``, ``evaluate``, ``ensemble`` and ``recalibrate``: the model side of the
command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

ModalityOption = Annotated[str, typer.Option(help="US, MG or SM.")]


def train_command(
    modality: ModalityOption,
    arch: Annotated[
        str | None, typer.Option(help="Architecture (e.g. se-resnet-bilstm, effnetv2-gru, "
                                      "mobilenetv2, cnn-rnn-ensemble, monai-resnet, plain-cnn).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Data set folder (default: shared)")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    out: Annotated[Path, typer.Option(help="Run folder for weights, card and figures.")] = Path(
        "runs/latest"
    ),
    max_minutes: Annotated[float | None, typer.Option(help="Wall-time budget.")] = None,
    wiener: Annotated[int, typer.Option(help="Wiener filter kernel (0 = off).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of training (and of the split, unless "
                                          "--split-seed is given).")] = 0,
    split_seed: Annotated[
        int | None, typer.Option(help="Seed of the train/val/test split (default: --seed).")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Input size in pixels (default: the recipe's).")
    ] = None,
    model_version: Annotated[
        str, typer.Option(help="Version written to the model card.")
    ] = "1.0.0",
    threads: Annotated[int, typer.Option(help="Torch threads for training.")] = 2,
) -> None:
    """Train a model from scratch on the CPU (progress bar; early stopping on validation)."""
    from inference.train import summary_line, train

    try:
        card_path = train(
            modality, data, out, architecture=arch, epochs=epochs, max_minutes=max_minutes,
            wiener_kernel=wiener, seed=seed, size=size, version=model_version, threads=threads,
            split_seed=split_seed,
        )
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(summary_line(card_path))


def ensemble_command(
    runs: Annotated[
        list[Path], typer.Argument(help="Model cards (JSON) of the runs to put together.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the ensemble's weights and card.")],
    data: Annotated[Path | None, typer.Option(help="Data set folder (default: shared)")] = None,
    model_version: Annotated[
        str, typer.Option(help="Version written to the model card.")
    ] = "1.0.0",
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 2,
) -> None:
    """Average runs of one recipe that differ only in their training seed into one model
    (calibrated and evaluated like a single run)."""
    from inference.ensemble import assemble
    from inference.train import summary_line

    try:
        card_path = assemble(runs, out, data_dir=data, version=model_version, threads=threads)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(summary_line(card_path))


def recalibrate_command(
    card: Annotated[Path, typer.Argument(help="Model card (JSON) of a finished MG patch model.")],
    cv: Annotated[
        list[Path], typer.Option(help="Folder(s) of out-of-fold maps from `python bench/mg_cv.py "
                                      "train` (several: their maps are averaged).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the recalibrated model's card.")],
    data: Annotated[Path | None, typer.Option(help="Data set folder (default: shared)")] = None,
    model_version: Annotated[
        str | None, typer.Option(help="Version written to the card (default: the card's).")
    ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 2,
) -> None:
    """Fit an MG patch model's calibration and operating point on out-of-fold scores of the
    development women instead of its validation split (weights unchanged)."""
    from inference.mammo_cv import recalibrate
    from inference.train import summary_line

    try:
        card_path = recalibrate(card, cv, out, data_dir=data, version=model_version,
                                threads=threads)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(summary_line(card_path))


def evaluate_command(
    modality: ModalityOption,
    data: Annotated[Path, typer.Option(help="Folder with one sub-folder per label.")],
    model: Annotated[
        Path | None, typer.Option(help="Model card JSON or run folder (default: bundled).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    pairs: Annotated[
        Path | None,
        typer.Option(help="MG: CSV with path, patient_id, side (mini-MIAS labels.csv has them); "
                     "each breast is then scored against the woman's other breast. Without "
                     "it: DATA/labels.csv when it has those columns, else the DICOM files' "
                     "PatientID and laterality."),
    ] = None,
    single_images: Annotated[
        bool,
        typer.Option("--single-images",
                     help="MG: score every image alone, even where its other breast is known."),
    ] = False,
) -> None:
    """Evaluate a model on a folder of labelled images (PNG, JPEG, TIFF or DICOM)."""
    from tqdm import tqdm

    from inference import ModelNotAvailableError
    from inference.evaluate import EvaluationError, evaluate_folder

    bar = tqdm(desc="evaluate", unit="img", disable=json_out)
    try:
        result = evaluate_folder(modality, data, model, progress=bar.update, pairs=pairs,
                                 pair_breasts=not single_images)
    except (EvaluationError, ModelNotAvailableError, ValueError) as exc:
        bar.close()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    bar.close()
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"model {result['model']['name']} {result['model']['version']}, n = {result['n']}")
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "specificity",
                "jaccard", "auc", "auc_abnormal", "ece"):
        value = result.get(key)
        if value is not None:
            typer.echo(f"  {key:18s} {value:.4f}")
    reference = result.get("ece_calibrated_reference")
    if reference is not None:
        typer.echo(f"  (ECE of a perfectly calibrated model on this many images: mean "
                   f"{reference['mean']:.4f}, 95th percentile {reference['p95']:.4f})")
    typer.echo(f"  not assessable     {result['not_assessable']}")
    if result.get("pairs_from") is not None:
        typer.echo(f"  breasts compared   {result['bilateral_compared']} "
                   f"(pairs from {result['pairs_from']})")
    typer.echo("  confusion matrix (rows = truth): " + json.dumps(result["confusion_matrix"]))
