"""The ``breastcad`` command: serve, worker, predict, report, models, train, evaluate, deliveries,
routes.

The CLI composes the processes, so it is the one place in ``dicom_node`` that imports ``workers``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

# Before torch is imported anywhere in this process: OpenMP threads that spin-wait make torch 2-4x
# slower on a shared 2-core machine whenever another process is busy (measured here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dicom_node.model_commands import (
    ensemble_command,
    evaluate_command,
    recalibrate_command,
    train_command,
)
from dicom_node.settings import ConfigError, Settings, load_settings

app = typer.Typer(
    help="breastcad: AI analysis of breast images as a DICOM node.",
    no_args_is_help=True,
    add_completion=False,
)
deliveries_app = typer.Typer(help="Inspect and retry deliveries of results to destinations.")
app.add_typer(deliveries_app, name="deliveries")
routes_app = typer.Typer(help="Check routing rules.")
app.add_typer(routes_app, name="routes")
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("ensemble")(ensemble_command)
app.command("recalibrate")(recalibrate_command)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML configuration file (default: $BREASTCAD_CONFIG, else built-in defaults).",
    ),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"breastcad: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from exc


def _logging(settings: Settings) -> None:
    from dicom_node.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


def _torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: DICOM listener, REST API, dispatcher and (embedded) worker, in one process."""
    import uvicorn

    from dicom_node.api import create_api
    from dicom_node.audit import DicomAudit
    from dicom_node.db import StateDB
    from dicom_node.dispatch import Dispatcher
    from dicom_node.scp import StorageSCP
    from dicom_node.store import InstanceStore, SeriesWrites
    from workers.app import BreastcadCelery, EmbeddedWorker

    settings = _settings(config)
    _logging(settings)
    log = logging.getLogger("breastcad")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    db = StateDB(settings.sqlalchemy_url)
    writes = SeriesWrites()  # shared by the listener's and STOW-RS's stores and the dispatcher
    store = InstanceStore(settings.store_dir, db, writes)
    celery = BreastcadCelery(settings, db)
    dispatcher = Dispatcher(
        settings, db, celery.send_job, celery.send_delivery, queue_depth=celery.queue_depth,
        writes=writes,
    )
    worker: EmbeddedWorker | None = None
    if settings.embedded_worker:
        _torch_threads(settings.torch_threads)
        from workers.warmup import warm_up

        warm_up(celery.context)
        worker = EmbeddedWorker(celery, concurrency=settings.worker_concurrency)
    scp = StorageSCP(settings, store, extra_handlers=DicomAudit(db).handlers())
    uvicorn_config = uvicorn.Config(
        create_api(settings, db, queue_depth=celery.queue_depth, writes=writes),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        # json: uvicorn's loggers go through the root's JSON handler (configure_logging)
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )
    server = uvicorn.Server(uvicorn_config)
    try:
        scp.start()
    except OSError as exc:
        typer.echo(f"breastcad: cannot listen on DICOM port {settings.dicom_port}: {exc}", err=True)
        raise typer.Exit(1) from exc
    if worker is not None:
        worker.start()
    dispatcher.start()
    log.info(
        "breastcad serving: DICOM %s:%d, API http://%s:%d, broker %s, worker %s",
        settings.ae_title,
        settings.dicom_port,
        settings.api_host,
        settings.api_port,
        "redis" if settings.distributed else "embedded",
        "in-process" if worker is not None else "external",
    )
    try:
        server.run()
    finally:
        log.info("shutting down")
        scp.stop()
        dispatcher.stop()
        if worker is not None:
            worker.stop()
        db.dispose()


@app.command()
def worker(config: ConfigOption = None) -> None:
    """Run a Celery worker only (the distributed layout: needs broker_url)."""
    from dicom_node.db import StateDB
    from workers.app import BreastcadCelery, run_worker

    settings = _settings(config)
    if settings.broker_url is None:
        typer.echo(
            "breastcad worker: broker_url is null (embedded broker); a separate worker needs a "
            "shared broker such as redis://host:6379/0",
            err=True,
        )
        raise typer.Exit(2)
    _logging(settings)
    if settings.log_format == "json":
        # a receiver on setup_logging makes Celery leave the logging configured above alone
        from celery.signals import setup_logging

        setup_logging.connect(lambda **_kwargs: None, weak=False)
    _torch_threads(settings.torch_threads)
    from workers.warmup import warm_up

    db = StateDB(settings.sqlalchemy_url)
    celery = BreastcadCelery(settings, db)
    warm_up(celery.context)
    run_worker(celery, settings.worker_concurrency, settings.log_level)


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="DICOM, PNG or JPEG files.")],
    json_lines: Annotated[
        bool, typer.Option("--json", help="One JSON object per file and line.")
    ] = False,
    modality: Annotated[
        str | None,
        typer.Option(help="Modality of non-DICOM images (US, MG, SM); DICOM files say theirs."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the heatmap PNGs.")] = Path("heatmaps"),
) -> None:
    """Classify images with the bundled models and write a heatmap PNG for each."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError

    from inference import (
        Classifier,
        ModelNotAvailableError,
        image_from_file,
        load_bundled,
    )
    from reports import overlay_png
    from workers.tasks import analyse_instance

    us_max_frames = Settings.model_fields["us_max_frames"].default
    mg_max_side = Settings.model_fields["mg_max_side"].default

    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, Classifier] = {}
    failures = 0
    for path in files:
        record: dict[str, object] = {"file": str(path)}
        try:
            ds: Dataset | None
            try:
                ds = dcmread(path)
                file_modality = str(ds.get("Modality", "")).strip() or (modality or "")
            except InvalidDicomError:
                ds = None
                file_modality = (modality or "US").upper()
                image = image_from_file(path)
            if file_modality not in models:
                models[file_modality] = load_bundled(file_modality)
            if ds is not None:
                # the node's per-image pipeline (US region crop and frames, MG orientation)
                analysed = analyse_instance(
                    ds, models[file_modality], us_max_frames, mg_max_side
                )
                image, prediction = analysed.image, analysed.prediction
            else:
                prediction = models[file_modality].predict(image)
        except (ValueError, OSError, ModelNotAvailableError) as exc:
            failures += 1
            record["error"] = str(exc)
            if json_lines:
                typer.echo(json.dumps(record))
            else:
                typer.echo(f"{path}: error: {exc}", err=True)
            continue
        heatmap = out / f"{path.stem}.heatmap.png"
        heatmap.write_bytes(overlay_png(image, prediction))
        record.update(
            {
                "modality": file_modality,
                "label": prediction.label,
                "probabilities": {k: round(v, 6) for k, v in prediction.probabilities.items()},
                "model": prediction.model_name,
                "model_version": prediction.model_version,
                "heatmap": str(heatmap),
            }
        )
        if json_lines:
            typer.echo(json.dumps(record))
        else:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in prediction.probabilities.items())
            typer.echo(f"{path}: {prediction.label} ({probs}) heatmap {heatmap}")
    if failures:
        raise typer.Exit(1)


@app.command()
def report(
    file: Annotated[Path, typer.Argument(help="A breastcad SR (DICOM file).")],
) -> None:
    """Print a Structured Report as readable text: document, patient, study, algorithm, each
    finding with its codes, probabilities, laterality, images, predecessor and similar cases."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from reports.sr_text import NotAStructuredReport, sr_text

    try:
        ds = dcmread(file)
    except (OSError, InvalidDicomError) as exc:
        typer.echo(f"breastcad report: cannot read {file}: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        typer.echo(sr_text(ds), nl=False)
    except NotAStructuredReport as exc:
        typer.echo(f"breastcad report: {file}: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print the cards as JSON.")] = False,
) -> None:
    """List the bundled models and their cards."""
    from inference import bundled_cards

    cards = bundled_cards()
    if json_out:
        typer.echo(json.dumps([card.data for card in cards], indent=2))
        return
    for card in cards:
        metrics = card.data.get("metrics", {})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, int | float))
        typer.echo(
            f"{card.modality}: {card.name} {card.version} ({card.architecture}, "
            f"{card.input_size}px, labels {', '.join(card.labels)})"
        )
        typer.echo(f"    sha256 {card.sha256}")
        if shown:
            typer.echo(f"    test split: {shown}")


@deliveries_app.command("list")
def deliveries_list(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="pending, sending, done or failed")] = None,
) -> None:
    """List deliveries, newest first."""
    from sqlalchemy import select

    from dicom_node.db import Delivery, StateDB

    settings = _settings(config)
    db = StateDB(settings.sqlalchemy_url)
    with db.session() as session:
        query = select(Delivery).order_by(Delivery.id.desc())
        if state:
            query = query.where(Delivery.state == state)
        for d in session.scalars(query).all():
            typer.echo(
                f"{d.id}\tresult {d.result_id}\t{d.destination}\t{d.state}\t"
                f"attempts {d.attempts}\t{d.last_error or ''}"
            )


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[int, typer.Argument(help="The delivery to send again.")],
    config: ConfigOption = None,
) -> None:
    """Make a failed delivery due again; the running node sends it."""
    from dicom_node.db import StateDB
    from dicom_node.dispatch import retry_delivery

    settings = _settings(config)
    if not retry_delivery(StateDB(settings.sqlalchemy_url), delivery_id):
        typer.echo(f"delivery {delivery_id} not found or not failed/pending", err=True)
        raise typer.Exit(1)
    typer.echo(f"delivery {delivery_id} will be sent again")


@routes_app.command("test")
def routes_test(
    config_file: Annotated[Path, typer.Argument(help="The YAML configuration with the routes.")],
    result: Annotated[
        str,
        typer.Option(
            "--result",
            help='The result as JSON (or a file holding it): {"modality": "US", "probabilities": '
            '{"malignant": 0.8, ...}, "label", "calling_ae", "not_assessable" optional}.',
        ),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
) -> None:
    """Show which routes a result would match and where it would be sent."""
    from workers.routing import ResultFacts, route

    settings = _settings(config_file)
    text = result
    if not text.lstrip().startswith("{") and Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8")
    try:
        facts = ResultFacts.from_json(json.loads(text))
    except json.JSONDecodeError as exc:
        typer.echo(f"breastcad routes test: --result is not valid JSON: {exc}", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        typer.echo(f"breastcad routes test: invalid result: {exc}", err=True)
        raise typer.Exit(2) from exc
    decision = route(settings.routes, facts)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "matched_routes": [
                        {"index": index, **settings.routes[index].model_dump(exclude_none=True)}
                        for index in decision.matched_routes
                    ],
                    "destinations": [
                        {"name": name, "forward_source": name in decision.forward_source}
                        for name in decision.destinations
                    ],
                }
            )
        )
        return
    for index, rule in enumerate(settings.routes):
        mark = "match" if index in decision.matched_routes else "no   "
        when = rule.when.model_dump(exclude_none=True) if rule.when is not None else "always"
        extra = " (with sources)" if rule.forward_source else ""
        typer.echo(f"{mark} route {index + 1}: when {when} -> {', '.join(rule.send_to)}{extra}")
    if not decision.destinations:
        typer.echo("destinations: none (the result would not be sent)")
        return
    shown = [
        f"{name} (with sources)" if name in decision.forward_source else name
        for name in decision.destinations
    ]
    typer.echo(f"destinations: {', '.join(shown)}")


if __name__ == "__main__":
    app()
