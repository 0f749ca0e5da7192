"""Deterministic DICOM UIDs for result objects."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable

# A fixed namespace for breastcad's name-based UUIDs. Never change it: every UID ever derived
# (and every copy a PACS holds) depends on it.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:breastcad:dicom-uid")


def derive_uid(*parts: str) -> str:
    """Return a DICOM UID that depends only on ``parts``.

    The UID is ``2.25.<decimal UUID>`` (DICOM PS3.5 B.2) of a name-based (SHA-1, version 5)
    UUID of the parts. The parts are serialised unambiguously, so ``("ab", "c")`` and
    ``("a", "bc")`` give different UIDs. Same parts, same UID, on any machine.

    Note: ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores ``entropy_srcs``
    and returns a random UID, and with a prefix it joins the parts without a separator; neither
    is usable here.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"derive_uid parts must be str, got {type(part).__name__}")
    name = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def source_set(sop_instance_uids: Iterable[str]) -> str:
    """One UID-derivation part naming a set of source instances, independent of their order.

    ``sources-sha256=<hex>`` of the sorted, de-duplicated SOP Instance UIDs joined by newlines:
    the same instances give the same part; one instance more or less gives another.
    """
    uids = sorted({str(uid) for uid in sop_instance_uids})
    if not uids:
        raise ValueError("source_set needs at least one SOP Instance UID")
    digest = hashlib.sha256("\n".join(uids).encode("ascii", "replace")).hexdigest()
    return f"sources-sha256={digest}"
