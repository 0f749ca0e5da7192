"""The bare pynetdicom storage SCP of the ingest benchmark: writes ``event.encoded_dataset()``
to ``DIR/<SOPInstanceUID>.dcm``, fsyncs it and answers 0x0000; nothing else (no checks, no DB).

    python bench/bare_scp.py PORT DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)

    def handle_store(event: Event) -> Dataset | int:
        uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        fd = os.open(folder / f"{uid}.dcm", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, event.encoded_dataset())
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0x0000

    ae = AE(ae_title="BARESCP")
    ae.maximum_associations = 64
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(
                context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle_store)])


if __name__ == "__main__":
    main()
