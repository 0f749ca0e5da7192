"""The DICOM listener: C-ECHO and C-STORE of breast images (pynetdicom).

A C-STORE is answered 0x0000 only after the instance is durable in the store; see
``dicom_node.validation`` for the failure statuses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.security import GuardedAssociationServer, server_ssl_context
from dicom_node.settings import Settings
from dicom_node.store import InstanceKey, InstanceStore, StoreWriteError
from dicom_node.validation import (
    DATASET_DECODE_ERRORS,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InvalidInstance,
    check_identity,
    check_pixel_data,
)

log = logging.getLogger(__name__)

#: The storage SOP classes breastcad accepts, by UID.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.6": "VL Whole Slide Microscopy Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

#: Uncompressed and the usual compressed transfer syntaxes, all decodable by our pixel stack.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

StoredCallback = Callable[[InstanceKey], None]


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        # ErrorComment is LO: at most 64 characters
        status.ErrorComment = comment[:64]
    return status


class StorageSCP:
    """Accepts associations and stores what arrives; one instance per node process."""

    def __init__(
        self,
        settings: Settings,
        store: InstanceStore,
        on_stored: StoredCallback | None = None,
        extra_handlers: Sequence[tuple[Any, Callable[[Event], None]]] = (),
    ) -> None:
        self.settings = settings
        # more notification handlers (the audit trail, dicom_node.audit.DicomAudit)
        self.extra_handlers = list(extra_handlers)
        self.store = store
        self.on_stored = on_stored
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_associations = settings.maximum_associations
        self.ae.acse_timeout = settings.acse_timeout_seconds
        self.ae.dimse_timeout = settings.dimse_timeout_seconds
        self.ae.network_timeout = settings.network_timeout_seconds
        if settings.allowed_calling_aets:
            self.ae.require_calling_aet = list(settings.allowed_calling_aets)
        self.ae.add_supported_context(
            Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        for sop_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        # every other storage class (CT, SR, KOS ...) is stored too, and never analysed
        for context in AllStoragePresentationContexts:
            other = context.abstract_syntax
            if other is not None and other not in STORAGE_SOP_CLASSES:
                self.ae.add_supported_context(other, TRANSFER_SYNTAXES)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the listener is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.store.remove_incoming()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, _log_association("accepted")),
            (evt.EVT_REJECTED, _log_association("rejected")),
            *self.extra_handlers,
        ]
        # pynetdicom's start_server(block=False), with our server class: IP allow-list and a
        # TLS handshake per connection thread (dicom_node.security)
        server = self.ae.make_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            evt_handlers=handlers,
            server_class=GuardedAssociationServer,
            allowed_networks=self.settings.allowed_networks,
            tls_context=server_ssl_context(self.settings),
            handshake_timeout=self.settings.acse_timeout_seconds,
        )
        self.ae._servers.append(server)  # what start_server does; shutdown() removes it
        self._server = server
        threading.Thread(target=server.serve_forever, name="DICOM listener", daemon=True).start()
        log.info(
            "DICOM listener %s on %s:%d%s%s",
            self.settings.ae_title,
            self.settings.dicom_host,
            self.port,
            " (TLS)" if self.settings.tls else "",
            f", allowed networks {', '.join(map(str, self.settings.allowed_networks))}"
            if self.settings.allowed_networks
            else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def handle_store(self, event: Event) -> Dataset:
        request = cast(C_STORE, event.request)
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            identity = check_identity(
                dataset,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
            )
            transfer_syntax = str(event.context.transfer_syntax)
            if identity.sop_class_uid in STORAGE_SOP_CLASSES or "PixelData" in dataset:
                check_pixel_data(dataset, transfer_syntax, self.settings.max_frame_pixels)
        except InvalidInstance as exc:
            log.warning(
                "refused instance %s from %s: %s (0x%04X)",
                request.AffectedSOPInstanceUID,
                calling_ae,
                exc.reason,
                exc.status,
            )
            return _status(exc.status, exc.reason)
        except DATASET_DECODE_ERRORS as exc:
            log.warning(
                "refused instance %s from %s: dataset cannot be decoded (%s)",
                request.AffectedSOPInstanceUID,
                calling_ae,
                type(exc).__name__,
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "dataset cannot be decoded")

        key = InstanceKey(
            sop_class_uid=identity.sop_class_uid,
            sop_instance_uid=identity.sop_instance_uid,
            series_instance_uid=identity.series_instance_uid,
            study_instance_uid=identity.study_instance_uid,
            transfer_syntax_uid=transfer_syntax,
        )
        try:
            outcome = self.store.store(key, event.encoded_dataset(), dataset, calling_ae)
        except StoreWriteError as exc:
            log.error("cannot store instance %s: %s", key.sop_instance_uid, exc)
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: cannot write instance")
        if outcome.duplicate:
            log.info("duplicate instance %s stored once", key.sop_instance_uid)
        elif self.on_stored is not None:
            self.on_stored(key)
        return _status(STATUS_SUCCESS)


def _log_association(what: str) -> Callable[[Event], None]:
    def handler(event: Event) -> None:
        requestor = event.assoc.requestor
        log.info(
            "association %s: calling AE %s from %s",
            what,
            str(requestor.ae_title).strip(),
            requestor.address,
        )

    return handler
