"""The node's configuration: one typed object, read from a YAML file and BREASTCAD_* variables.

Precedence (highest first): ``BREASTCAD_<KEY>`` environment variables for top-level keys, the YAML
file named by ``--config`` or ``BREASTCAD_CONFIG``, then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

CONFIG_ENV = "BREASTCAD_CONFIG"


ResultObject = Literal["sr", "sc", "seg"]


def _default_objects() -> list[ResultObject]:
    return ["sr", "sc"]


class Destination(BaseModel):
    """A DICOM peer that receives results by C-STORE."""

    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(min_length=1, max_length=16)
    # DICOM TLS to this peer: its certificate is checked against tls_ca_certificates (else the
    # system CAs) and its host name; tls_certificate/tls_private_key are ours to present
    tls: bool = False
    tls_ca_certificates: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    # which result objects it receives: the SR, the heatmap SCs, the heatmap Segmentations
    objects: list[ResultObject] = Field(default_factory=_default_objects, min_length=1)


class DicomwebDestination(BaseModel):
    """A DICOMweb origin server that receives results by STOW-RS (``{dicomweb}/studies``)."""

    model_config = ConfigDict(extra="forbid")

    # the service root, e.g. http://pacs:8042/dicom-web
    dicomweb: str = Field(pattern=r"^https?://\S+$")
    timeout_seconds: float = Field(default=60.0, gt=0)
    # which result objects it receives: the SR, the heatmap SCs, the heatmap Segmentations
    objects: list[ResultObject] = Field(default_factory=_default_objects, min_length=1)


class FhirEndpoint(BaseModel):
    """A FHIR server that receives every result's DiagnosticReport by HTTP POST."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://\S+$", description="FHIR base URL")
    bearer_token: str | None = None
    timeout_seconds: float = Field(default=10.0, gt=0)
    # the node's API as the FHIR server can reach it (the report's links to the SR and
    # heatmaps); default http://<api_host>:<api_port>
    node_base_url: str | None = None


class RouteCondition(BaseModel):
    """When a route applies; every given field must match (an empty condition matches all)."""

    model_config = ConfigDict(extra="forbid")

    modality: list[str] | None = None
    calling_ae: list[str] | None = None
    label: list[str] | None = None
    probability_at_least: dict[str, float] | None = None
    not_assessable: bool | None = None

    @field_validator("modality", "calling_ae", "label", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        return value


class Route(BaseModel):
    """A routing rule: results matching ``when`` are sent to every destination in ``send_to``."""

    model_config = ConfigDict(extra="forbid")

    when: RouteCondition | None = None
    send_to: list[str] = Field(min_length=1)
    # also send the analysed source instances (as received) to these destinations
    forward_source: bool = False


class Settings(BaseSettings):
    """Everything a breastcad process needs to know about its deployment."""

    model_config = SettingsConfigDict(
        env_prefix="BREASTCAD_",
        extra="forbid",
        env_nested_delimiter=None,
    )

    ae_title: str = Field(default="BREASTCAD", min_length=1, max_length=16)
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path("./var")
    broker_url: str | None = None
    embedded_worker: bool = True
    database_url: str | None = None
    series_quiet_seconds: float = Field(default=5.0, ge=0)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    maximum_associations: int = Field(default=10, ge=1)
    # client IP networks (v4 and v6, e.g. 10.1.0.0/16, fd00::/8) allowed to connect to the DICOM
    # port; a connection from elsewhere is closed before any PDU is read. Empty = any address.
    allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    # DICOM TLS on the listener (PEM files); a certificate and its key turn TLS on
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    # CA certificates that sign client certificates (and the destinations' certificates)
    tls_ca_certificates: Path | None = None
    tls_require_client_certificate: bool = False
    # pynetdicom's timeouts on the listener: waiting for A-ASSOCIATE-RQ/-RP and A-RELEASE (acse),
    # for a DIMSE message (dimse), for any data on an idle association (network)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=30.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    # when set, every API route but /health needs `Authorization: Bearer <token>` (or the
    # breastcad_token cookie set by GET /login?token=...)
    api_token: SecretStr | None = None
    # decompression-bomb guard: a frame with more pixels than this is refused (0xC003)
    max_frame_pixels: int = Field(default=100_000_000, ge=1)
    # C-STORE peers ({host, port, ae_title}) or STOW-RS servers ({dicomweb: URL})
    destinations: dict[str, Destination | DicomwebDestination] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=lambda: [])
    # bounded retries for deliveries: attempt n waits delivery_backoff_seconds * 2**(n-1)
    delivery_max_attempts: int = Field(default=5, ge=1)
    delivery_backoff_seconds: float = Field(default=2.0, ge=0)
    # an analysis that fails (or whose worker dies) this many times is marked failed
    job_max_attempts: int = Field(default=3, ge=1)
    # a queued job whose message has not started after this long is sent again
    job_resend_seconds: float = Field(default=60.0, gt=0)
    # a running job not finished after this long is considered lost (its worker died)
    job_timeout_seconds: float = Field(default=900.0, gt=0)
    dispatch_interval_seconds: float = Field(default=0.5, gt=0)
    worker_concurrency: int = Field(default=1, ge=1)
    torch_threads: int = Field(default=2, ge=1)
    # how a worker runs the models' convolutional trunk: eager PyTorch, TorchScript or ONNX
    # Runtime (inference.backends; the head and Grad-CAM stay eager; docs/BENCHMARKS.md)
    inference_backend: Literal["eager", "torchscript", "onnx"] = "eager"
    log_level: str = "INFO"
    # "json": one JSON object per log line (time, level, logger, message, UIDs); "text": plain
    log_format: Literal["text", "json"] = "text"
    # a result whose suspicion (probability of malignancy) is at least this is flagged priority
    # (API, worklist, SR triage finding); null = never
    priority_threshold: float | None = Field(default=0.5, ge=0, le=1)
    # series of other modalities (CT, SR, KO, PR ...) are stored but never analysed: their
    # series gets a job row ended at once with the reason, and a log line
    analysed_modalities: list[str] = Field(default_factory=lambda: ["MG", "SM", "US"])
    # mammography: a series is complete as soon as it holds the four screening views (L/R x
    # CC/MLO) ("four_views"), else after series_quiet_seconds like any series ("quiet_period")
    mammo_view_set: Literal["four_views", "quiet_period"] = "four_views"
    # mammograms are analysed (and their heatmap SC made) at most this many pixels on the
    # longer side (scaled down with a box filter); null = full size
    mg_max_side: int | None = Field(default=2048, ge=256)
    # multi-frame ultrasound: at most this many evenly spaced frames are analysed per instance
    us_max_frames: int = Field(default=16, ge=1)
    # further directories of model cards (+ weights), searched before the bundled models
    model_dirs: list[Path] = Field(default_factory=lambda: [])
    # the upload page's POST /analyse refuses larger files (413)
    upload_max_bytes: int = Field(default=200_000_000, ge=1)
    # a STOW-RS request body (held in memory while it is stored) larger than this is refused (413)
    stow_max_bytes: int = Field(default=1_000_000_000, ge=1)
    # optional FHIR server receiving each DiagnosticReport (POST, retried like deliveries)
    fhir_endpoint: FhirEndpoint | None = None
    # how many similar past cases (nearest embeddings of other studies) the SR lists; 0 = none
    similar_cases_in_sr: int = Field(default=5, ge=0, le=50)

    @model_validator(mode="after")
    def _routes_name_known_destinations(self) -> Settings:
        reserved = [name for name in self.destinations if name.startswith("@")]
        if reserved:
            raise ValueError(f"destination names starting with '@' are reserved (the FHIR "
                             f"push is '@fhir'): {reserved}")
        for route in self.routes:
            unknown = [name for name in route.send_to if name not in self.destinations]
            if unknown:
                raise ValueError(
                    f"route sends to unknown destination(s) {unknown}; "
                    f"configured destinations: {sorted(self.destinations)}"
                )
        return self

    @field_validator("analysed_modalities")
    @classmethod
    def _upper_modalities(cls, value: list[str]) -> list[str]:
        return [item.strip().upper() for item in value if item.strip()]

    @model_validator(mode="after")
    def _tls_files_complete(self) -> Settings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key must be given together")
        if self.tls_require_client_certificate and self.tls_ca_certificates is None:
            raise ValueError(
                "tls_require_client_certificate needs tls_ca_certificates (the CA that signs "
                "the client certificates)"
            )
        if self.tls_require_client_certificate and self.tls_certificate is None:
            raise ValueError("tls_require_client_certificate needs tls_certificate (TLS is off)")
        return self

    @property
    def tls(self) -> bool:
        """Whether the DICOM listener speaks TLS."""
        return self.tls_certificate is not None

    @field_validator(
        "api_token", "tls_certificate", "tls_private_key", "tls_ca_certificates", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() == "":
            return None
        return value

    @field_validator("broker_url", "database_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in {"", "null", "none"}:
            return None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment variables beat the YAML file, which is passed as init kwargs
        return (env_settings, init_settings)

    @property
    def distributed(self) -> bool:
        return self.broker_url is not None

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "instances"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def sqlalchemy_url(self) -> str:
        """The state DB URL: SQLite under data_dir unless database_url names another."""
        if self.database_url is None:
            return f"sqlite:///{(self.data_dir / 'state.db').resolve()}"
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url if self.broker_url is not None else "memory://"


class ConfigError(ValueError):
    """The configuration file cannot be read or does not validate."""


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Read the YAML file (``config``, else $BREASTCAD_CONFIG, else none) and the environment."""
    path = config
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must hold a mapping of keys")
        data = loaded
    data.update(overrides)
    return Settings(**data)
