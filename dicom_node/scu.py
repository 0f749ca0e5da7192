"""The sender: C-STORE of result objects (and forwarded sources) to a destination PACS."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.security import client_ssl_context
from dicom_node.settings import Destination

log = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """The destination could not be reached or did not accept every object."""


def send_files(
    destination: Destination,
    files: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float = 30.0,
) -> None:
    """Send every file in one association; raise DeliveryError unless all were stored.

    Only the headers are read up front (for the presentation contexts); each file is read whole
    just before it is sent, so a delivery of large instances holds one of them in memory.
    """
    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in headers}
    for sop_class, transfer_syntax in sorted(pairs):
        syntaxes = [transfer_syntax]
        if transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            syntaxes.append(ExplicitVRLittleEndian)
        ae.add_requested_context(sop_class, syntaxes)
    tls_args = None
    if destination.tls:
        try:
            context = client_ssl_context(
                destination.tls_ca_certificates,
                destination.tls_certificate,
                destination.tls_private_key,
            )
        except OSError as exc:
            raise DeliveryError(
                f"cannot load the TLS files for {destination.ae_title}: {exc}"
            ) from exc
        tls_args = (context, destination.host)
    assoc = ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
    if not assoc.is_established:
        raise DeliveryError(
            f"association with {destination.ae_title}@{destination.host}:{destination.port} "
            "was rejected, aborted or never connected"
        )
    failures: list[str] = []
    try:
        for index, (path, header) in enumerate(zip(files, headers, strict=True)):
            try:
                status = assoc.send_c_store(dcmread(path)) if assoc.is_established else Dataset()
            except RuntimeError:
                # pynetdicom raises when the peer aborted between our check and the send
                status = Dataset()
            code = int(status.Status) if "Status" in status else None
            if code is None:
                # no answer: the association is gone (aborted, timed out); nothing more is sent
                # on it, so the remaining objects fail now instead of each awaiting a timeout
                failures.append(
                    f"{header.SOPInstanceUID}: no response (connection lost or timeout)"
                )
                failures.extend(
                    f"{rest.SOPInstanceUID}: not sent, association lost"
                    for rest in headers[index + 1 :]
                )
                break
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                failures.append(f"{header.SOPInstanceUID}: status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    if failures:
        raise DeliveryError("; ".join(failures))
    log.info(
        "delivered %d object(s) to %s@%s:%d",
        len(headers),
        destination.ae_title,
        destination.host,
        destination.port,
    )
