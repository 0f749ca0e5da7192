"""Push each result's FHIR DiagnosticReport to a configured FHIR server by HTTP POST.

What is sent: the DiagnosticReport alone, as ``GET /fhir/DiagnosticReport/{id}`` serves it, with
its Observations (class, probabilities, laterality, priority) and the algorithm Device
*contained*, so one POST carries the whole report and a server stores it atomically without a
transaction Bundle. It goes to ``{url}/DiagnosticReport`` as ``application/fhir+json`` with
``If-None-Exist: identifier=<system>|<value>`` (FHIR conditional create on the SR's SOP Instance
UID), so a retried POST does not create a second copy on servers that support it. The
resource's ``id`` is left out: a create gets its id from the server.

A push is a delivery row like a DICOM one (destination :data:`FHIR_DESTINATION`): attempts,
back-off, ``failed`` after ``delivery_max_attempts``, ``POST /deliveries/{id}/retry``. Any HTTP
status other than 2xx, and any network error, is a failed attempt with the reason.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from dicom_node.settings import FhirEndpoint

# the delivery rows of the FHIR push; DICOM destination names may not start with "@"
FHIR_DESTINATION = "@fhir"
FHIR_JSON = "application/fhir+json"


class FhirPushError(RuntimeError):
    """The FHIR server did not accept the report (HTTP status or network error)."""


def push_report(endpoint: FhirEndpoint, report: dict[str, Any]) -> str:
    """POST ``report`` to the endpoint; returns the Location header (or ""), raises
    FhirPushError with the reason otherwise."""
    body = {key: value for key, value in report.items() if key != "id"}
    headers = {
        "Content-Type": f"{FHIR_JSON}; charset=utf-8",
        "Accept": FHIR_JSON,
    }
    identifiers = report.get("identifier") or []
    if identifiers:
        first = identifiers[0]
        headers["If-None-Exist"] = f"identifier={first['system']}|{first['value']}"
    if endpoint.bearer_token:
        headers["Authorization"] = f"Bearer {endpoint.bearer_token}"
    url = endpoint.url.rstrip("/") + "/DiagnosticReport"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout_seconds) as response:
            return str(response.headers.get("Location") or "")
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", errors="replace").strip()
        raise FhirPushError(f"FHIR server answered HTTP {exc.code} for POST {url}: "
                            f"{detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FhirPushError(f"cannot POST to FHIR server {url}: {reason}") from exc
