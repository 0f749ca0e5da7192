"""Warm a worker up before it takes its first task.

A worker's first task used to pay one-time costs: loading the models, and highdicom reading its
tables of the standard (``json.loads`` of a multi-MB file in one C call that holds the GIL: 3-4 s
on a loaded 2-core machine). While the GIL was held, the job's lease heartbeat thread could not
run, the lease lapsed, and the dispatcher took the live job for a lost one and ran it twice
(tests/reliability/test_worker_loss.py caught it; faulthandler showed the main thread inside
highdicom's ``get_module_attribute_map`` during the stall). Paying both at start-up moves them
out of the first task, and out of its turnaround.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from inference import ModelNotAvailableError
from workers.tasks import WorkerContext

log = logging.getLogger(__name__)


def warm_up(context: WorkerContext) -> dict[str, float]:
    """Load the model of each analysed modality that has one and run one prediction through it;
    returns the seconds each took (and ``highdicom``: its tables). A modality without a model is
    skipped (its jobs fail with that reason, as before)."""
    seconds: dict[str, float] = {"highdicom": _load_highdicom_tables()}
    log.info("warm-up: highdicom's tables of the standard loaded in %.2f s", seconds["highdicom"])
    rng = np.random.default_rng(0)
    for modality in context.settings.analysed_modalities:
        started = time.perf_counter()
        try:
            classifier = context.classifier(modality)
        except ModelNotAvailableError as exc:
            log.info("warm-up: %s", exc)
            continue
        probe = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        classifier.predict(probe)
        seconds[modality] = time.perf_counter() - started
        log.info("warm-up: %s model ready in %.2f s", modality, seconds[modality])
    return seconds


def _load_highdicom_tables() -> float:
    """Make highdicom read (and cache, per process: ``functools.lru_cache``) its tables of the
    standard, which building an SR or SC reads on first use; returns the seconds it took.

    These loaders are highdicom's private module (0.28.2, pinned): there is no public way to ask
    for the tables ahead of time."""
    from highdicom import _standard_utils as standard

    started = time.perf_counter()
    standard.get_sop_class_iod_map()
    standard.get_iod_module_map()
    standard.get_module_attribute_map()
    return time.perf_counter() - started
