"""The Celery application: one factory for the node (which sends) and workers (which run).

Embedded layout: kombu's in-memory transport and a worker thread inside ``breastcad serve``;
nothing persists in the broker, the job rows do (the dispatcher re-sends after a restart).
Distributed layout: Redis, and any number of ``breastcad worker`` processes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.worker import WorkController
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as KombuOperationalError

from dicom_node.db import StateDB
from dicom_node.settings import Settings
from workers.tasks import WorkerContext, analyse, deliver

log = logging.getLogger(__name__)

ANALYSE_TASK = "breastcad.analyse"
DELIVER_TASK = "breastcad.deliver"
QUEUE = "breastcad"


@dataclass
class BreastcadCelery:
    """The Celery app plus what its tasks need."""

    settings: Settings
    db: StateDB
    app: Celery = field(init=False)
    context: WorkerContext = field(init=False)

    def __post_init__(self) -> None:
        self.app = _make_celery(self.settings)
        self.context = WorkerContext(self.settings, self.db)
        context = self.context

        @self.app.task(name=ANALYSE_TASK, acks_late=True, reject_on_worker_lost=True)
        def analyse_task(job_id: int) -> str:
            return analyse(context, job_id)

        @self.app.task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True)
        def deliver_task(delivery_id: int) -> str:
            return deliver(context, delivery_id)

    def send_job(self, job_id: int) -> None:
        self.app.send_task(ANALYSE_TASK, args=[job_id], queue=QUEUE)

    def send_delivery(self, delivery_id: int) -> None:
        self.app.send_task(DELIVER_TASK, args=[delivery_id], queue=QUEUE)

    def queue_depth(self) -> int | None:
        """Messages waiting in the broker queue, or None if the broker cannot say."""
        try:
            with self.app.connection_for_read() as connection:
                channel = connection.default_channel
                declared = channel.queue_declare(queue=QUEUE, passive=True)
                return int(declared.message_count)
        except ChannelError:
            # "NOT_FOUND": Redis drops an empty list, so no queue means no waiting message
            return 0
        except (KombuOperationalError, OSError) as exc:
            log.warning("cannot read the broker queue depth: %s", exc)
            return None


def _make_celery(settings: Settings) -> Celery:
    app = Celery("breastcad", broker=settings.celery_broker_url, set_as_current=False)
    transport_options: dict[str, Any] = {}
    if settings.broker_url is None:
        transport_options["polling_interval"] = 0.05
    else:
        # a task whose worker died unacknowledged is redelivered after this long
        transport_options["visibility_timeout"] = int(settings.job_timeout_seconds) + 60
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app


class EmbeddedWorker:
    """A Celery worker running in a thread of the node process (the embedded layout)."""

    def __init__(self, celery: BreastcadCelery, concurrency: int = 1) -> None:
        self._controller = WorkController(
            app=celery.app,
            hostname="embedded@breastcad",
            pool_cls="solo" if concurrency == 1 else "threads",
            concurrency=concurrency,
            queues=[QUEUE],
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel=logging.INFO,
        )
        self._thread = threading.Thread(
            target=self._controller.start, name="embedded-worker", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._controller.stop(in_sighandler=False)
        self._thread.join(timeout=15)


def run_worker(celery: BreastcadCelery, concurrency: int, loglevel: str) -> None:
    """Run a stand-alone worker in the foreground (``breastcad worker``)."""
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency}",
        f"--queues={QUEUE}",
        "--pool=solo" if concurrency == 1 else "--pool=threads",
        "--without-gossip",
        "--without-mingle",
    ]
    celery.app.worker_main(argv)
