"""The node's configuration: ``config.toml`` loaded once into frozen, typed sections.

Every section checks itself in ``__post_init__`` and raises :class:`ConfigError`
naming the key and the broken rule.  A few deployment fields may be overridden from
the environment, and only here, in :func:`load_config`; nothing else in the node
reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from node.errors import ConfigError

#: Environment variables that may override a deployment field (and nothing else).
ENV_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "FRACTURE_NODE_AE_TITLE": ("node", "ae_title"),
    "FRACTURE_NODE_PORT": ("node", "port"),
    "FRACTURE_NODE_BIND_ADDRESS": ("node", "bind_address"),
    "FRACTURE_NODE_SPOOL_DIR": ("storage", "spool_dir"),
    "FRACTURE_NODE_DATABASE": ("storage", "database"),
    "FRACTURE_NODE_DATABASE_URL": ("database", "url"),
}

_AE_ALLOWED = set(
    " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~"
)


def check_ae_title(key: str, value: object) -> str:
    """Check an AE title (PS3.5 6.2, VR AE): 1-16 characters, no backslash or
    control characters, not only spaces.  Returns it stripped."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
    stripped = value.strip()
    if not stripped:
        raise ConfigError(f"{key} must not be empty")
    if len(value) > 16:
        raise ConfigError(f"{key} must not exceed 16 characters (got {len(value)}: {value!r})")
    bad = sorted(set(value) - _AE_ALLOWED)
    if bad:
        raise ConfigError(f"{key} contains characters not allowed in an AE title: {bad!r}")
    return stripped


def _check_port(key: str, value: object, allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"{key} must be between {low} and 65535 (got {value})")
    return value


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(key: str, value: object) -> str:
    """Check a host: an IPv4 or IPv6 address, or a DNS name (RFC 1123: dot-separated
    labels of 1-63 letters, digits and hyphens, at most 253 characters).  A name made
    only of digits and dots must be a valid IPv4 address (``127.0.0.300`` is not)."""
    fix = "give a host name such as pacs.example.org or an IP address such as 10.0.0.5"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a host name or IP address: {fix}")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", value):
        raise ConfigError(f"{key} = {value!r} is not a valid IPv4 address (four numbers "
                          "0-255 separated by dots, e.g. 10.0.0.5)")
    if ":" in value:
        raise ConfigError(f"{key} = {value!r} is not a valid IPv6 address; {fix}")
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if len(value) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ConfigError(f"{key} = {value!r} is not a valid host name (letters, digits, "
                          f"hyphens and dots only); {fix}")
    return value


_check_host = check_host


def _check_path(key: str, value: object) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ConfigError(f"{key} must be a file or folder path in quotes (got {value!r})")
    return Path(value)


def _check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    return value


def _check_positive(key: str, value: object, *, integer: bool = False) -> float:
    ok_types: tuple[type, ...] = (int,) if integer else (int, float)
    if not isinstance(value, ok_types) or isinstance(value, bool):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{key} must be greater than 0 (got {value})")
    return float(value)


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: who the node is on the network."""

    ae_title: str = "FRACTURE_NODE"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    max_pdu: int = 262144
    """Maximum PDU size the node receives (bytes; 0 = unlimited).  PS3.8 9.3.1."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title("node.ae_title", self.ae_title))
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise ConfigError(
                f"node.bind_address must be an IP address (got {self.bind_address!r})"
            ) from None
        _check_port("node.port", self.port, allow_zero=True)
        if not isinstance(self.max_pdu, int) or not (
            self.max_pdu == 0 or 4096 <= self.max_pdu <= 2**32 - 1
        ):
            raise ConfigError(f"node.max_pdu must be 0 or between 4096 and 2^32-1 (got {self.max_pdu})")


@dataclass(frozen=True)
class PeerConfig:
    """``[[peers]]``: a calling AE allowed to send; optionally pinned to a host."""

    ae_title: str
    host: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title("peers.ae_title", self.ae_title))
        if self.host is not None:
            _check_host(f"peers[{self.ae_title}].host", self.host)


@dataclass(frozen=True)
class DestinationConfig:
    """``[[destinations]]``: where results are C-STOREd (the archive)."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    """Connect with DICOM TLS (PS3.15 B.1), using the ``[tls]`` section."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError('destinations.name must be a non-empty string (e.g. name = "pacs")')
        object.__setattr__(
            self, "ae_title", check_ae_title(f"destinations[{self.name}].ae_title", self.ae_title)
        )
        _check_host(f"destinations[{self.name}].host", self.host)
        _check_port(f"destinations[{self.name}].port", self.port)
        _check_bool(f"destinations[{self.name}].tls", self.tls)


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: DICOM TLS (PS3.15 Annex B.1, the Basic TLS Secure Transport
    Connection Profile) for the SCP, and for destinations with ``tls = true``."""

    enabled: bool = False
    """The SCP accepts TLS connections only."""
    certificate: Path | None = None
    """The node's certificate (PEM)."""
    private_key: Path | None = None
    """Its private key (PEM), readable only by the node's user."""
    ca_certificates: Path | None = None
    """CA certificates (PEM) that peer certificates must chain to."""
    require_peer_certificate: bool = True
    """The SCP refuses a TLS client that presents no certificate signed by the CA."""

    def __post_init__(self) -> None:
        _check_bool("tls.enabled", self.enabled)
        _check_bool("tls.require_peer_certificate", self.require_peer_certificate)
        for key in ("certificate", "private_key", "ca_certificates"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _check_path(f"tls.{key}", value))
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ConfigError("tls.certificate and tls.private_key are required when "
                              "tls.enabled = true")
        if self.enabled and self.require_peer_certificate and self.ca_certificates is None:
            raise ConfigError("tls.ca_certificates is required to check peer certificates "
                              "(or set tls.require_peer_certificate = false)")


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: the durable spool and the job database."""

    spool_dir: Path = Path("var/spool")
    database: Path = Path("var/fracture-node.sqlite")
    min_free_mb: int = 256
    """Refuse new instances (0xA700) when less than this is free on the spool's disk."""
    retain_sources_hours: float = 24.0
    """Keep received instances this long after their study was last processed (and
    once every result is delivered), so late instances can reopen the study with all
    its images; then delete them."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "spool_dir", _check_path("storage.spool_dir", self.spool_dir))
        object.__setattr__(self, "database", _check_path("storage.database", self.database))
        if not isinstance(self.min_free_mb, int) or self.min_free_mb < 0:
            raise ConfigError(f"storage.min_free_mb must be an integer >= 0 (got {self.min_free_mb!r})")
        if not isinstance(self.retain_sources_hours, (int, float)) or self.retain_sources_hours < 0:
            raise ConfigError("storage.retain_sources_hours must be a number >= 0")


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``: a job database shared by several nodes (PostgreSQL).

    Absent (no ``url``), the node keeps its jobs in the SQLite file
    ``[storage] database``.  With a ``url``, every node of the group names the same
    database and mounts the same spool directory (docs/deploy.md).
    """

    url: str = ""
    """``postgresql://user@host:port/dbname`` (libpq URI; keep the password in
    ``~/.pgpass`` or ``PGPASSWORD``, not here)."""
    lease_seconds: float = 30.0
    """A claimed study or outbox item is this node's for this long after its last
    heartbeat; then another node may take it over."""
    heartbeat_seconds: float = 0.0
    """How often the node renews its leases (0: a third of ``lease_seconds``)."""
    node_name: str = ""
    """This node's name in ``status`` and the spool's ``tmp/<name>`` (default
    ``<host name>-<port>``); unique within the group."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise ConfigError("database.url must be a string")
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("database.url must be a postgresql:// URL (or absent for SQLite)")
        _check_positive("database.lease_seconds", self.lease_seconds)
        if not isinstance(self.heartbeat_seconds, (int, float)) or self.heartbeat_seconds < 0:
            raise ConfigError("database.heartbeat_seconds must be a number >= 0")
        if self.heartbeat_seconds and self.heartbeat_seconds >= self.lease_seconds:
            raise ConfigError("database.heartbeat_seconds must be shorter than "
                              "database.lease_seconds")
        if not isinstance(self.node_name, str):
            raise ConfigError("database.node_name must be a string")


@dataclass(frozen=True)
class StudyConfig:
    """``[study]``: when a study counts as complete."""

    quiet_seconds: float = 10.0
    """A study is ready once no instance of it arrived for this long and no
    association is still sending it (cf. DCMTK storescp --eostudy-timeout)."""

    def __post_init__(self) -> None:
        _check_positive("study.quiet_seconds", self.quiet_seconds)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


MAX_WORKER_THREADS = 64
MAX_BUILD_PROCESSES = 16
MAX_MODEL_STREAMS = 16
DEFAULT_MODEL_STREAMS = 2
DEFAULT_EARLY_START = 0.25
"""Seconds of quiet before the worker starts on a study early when ``[worker]
early_start_seconds`` is left out (see :attr:`WorkerConfig.early_start_seconds`)."""
"""Model streams when ``[worker] model_streams`` is left out (capped by the cores): on the
2-core reference machine two streams shortened the medians of ``bench/e2e.py`` (a burst
of 20 studies and one study every 1.5 s, each run twice) and left the 16 x 50 load of
``bench/reliability.py`` as it was, for ~13 MB more at rest (docs/benchmarks.md, session 29)."""


@dataclass(frozen=True)
class WorkerConfig:
    """``[worker]``: how the worker spreads studies over the cores.

    With ``threads = 1`` one study at a time goes through decode, the models and the
    result objects in turn.  With more, the stages run side by side: ``threads - 1``
    study threads decode and normalise the next studies and build the SC, SR, PDF and
    KO of finished ones, while one model thread analyses the studies waiting for it,
    as many together as one model run of ``batch_images`` images takes (at least one
    whole study).
    Queues between the stages are bounded by ``max_images_in_flight``; a study with
    more images than that starts once the studies in hand are all decoded (at most
    one study more than the study threads are in hand).
    """

    threads: int | None = None
    """Worker threads; ``None`` (the key left out): the cores this process may use."""
    max_images_in_flight: int = 16
    """Images taken up and not yet finished, over all stages: what bounds the queues
    between them and the memory they hold (a study larger than this is taken alone)."""

    batch_images: int = 1
    """Images per model run (the graphs also see their mirrors).  The runtime keeps
    the buffers of its largest run: memory grows with it, speed on a CPU hardly."""

    model_streams: int | None = None
    """Inference streams of each graph (OpenVINO ``NUM_STREAMS``) in the model stage: the
    images of a model run go that many at a time, each stream on
    :attr:`model_threads` threads, sharing the weights (each stream keeps its own
    buffers).  ``None`` (the key left out): two on a machine with two cores or more
    (:attr:`resolved_model_streams`), which lets the model thread use the core a study
    thread leaves idle; the streams share the cores with the study threads when both
    are busy."""

    build_processes: int = 0
    """Processes that build the SC, SR, PDF and KO beside the node's (used when
    ``threads`` > 1); ``0``: the worker's study threads build them.  Off by default: on
    the 2-core reference machine one build process shortened a burst's median by ~0.6 s
    (3.09-3.80 s against 3.55-4.48 s, ``bench/e2e.py``, session 29) but costs ~190 MB,
    which the 600 MB peak of the 16 x 50 load does not have (``bench/reliability.py``,
    docs/benchmarks.md)."""

    early_start_seconds: float | None = None
    """Start on a study this long after its last instance arrived (and once no
    association is still sending it), before its quiet period (``[study]
    quiet_seconds``) ends, when the worker has nothing ready to do: its result objects
    are then made while the quiet period runs out, and written and sent as soon as it
    is ready, if no instance of it arrived meanwhile (else the early work is dropped
    and the study is processed again).  Only studies of at most
    ``max_images_in_flight`` images start early; ``0`` turns it off; ``None`` (the key
    left out): 0.25 s, or half the quiet period when that is shorter
    (:meth:`Config.early_start`).  Nothing is written or sent before the study is ready.
    Used when ``threads`` > 1."""

    def __post_init__(self) -> None:
        value = self.early_start_seconds
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or value < 0):
            raise ConfigError(f"worker.early_start_seconds must be a number of seconds, 0 or "
                              f"more (got {value!r}); 0 turns early starts off")
        if self.threads is not None:
            if (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                    or not 1 <= self.threads <= MAX_WORKER_THREADS):
                raise ConfigError(
                    f"worker.threads must be an integer from 1 to {MAX_WORKER_THREADS} (got "
                    f"{self.threads!r}); leave the key out to use the cores this machine allows "
                    f"({available_cores()})")
        value = self.max_images_in_flight
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"worker.max_images_in_flight must be an integer of at least 1 "
                              f"(got {value!r}); the default is 16")
        value = self.batch_images
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
            raise ConfigError(f"worker.batch_images must be an integer from 1 to 64 (got "
                              f"{value!r}); the default is 1")
        value = self.model_streams
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not (
                1 <= value <= MAX_MODEL_STREAMS)):
            raise ConfigError(f"worker.model_streams must be an integer from 1 to "
                              f"{MAX_MODEL_STREAMS} (got {value!r}); leave the key out for "
                              f"{DEFAULT_MODEL_STREAMS} on a machine with {DEFAULT_MODEL_STREAMS} "
                              "cores or more")
        value = self.build_processes
        if not isinstance(value, int) or isinstance(value, bool) or not (
                0 <= value <= MAX_BUILD_PROCESSES):
            raise ConfigError(
                f"worker.build_processes must be an integer from 0 to {MAX_BUILD_PROCESSES} "
                f"(got {value!r}); the default 0 builds the result objects in the worker's "
                "threads")

    @property
    def resolved_threads(self) -> int:
        """``threads``, or the available cores when it is left out."""
        return self.threads if self.threads is not None else available_cores()

    @property
    def resolved_model_streams(self) -> int:
        """``model_streams``, or when it is left out :data:`DEFAULT_MODEL_STREAMS` (at most
        the available cores)."""
        if self.model_streams is not None:
            return self.model_streams
        return max(1, min(DEFAULT_MODEL_STREAMS, available_cores()))

    @property
    def images_per_run(self) -> int:
        """Images of one model run: ``batch_images`` for each of the model streams (what
        the model thread gathers and the analyser passes to the graphs at once)."""
        return self.batch_images * self.resolved_model_streams

    @property
    def resolved_build_processes(self) -> int:
        """Build processes the worker uses: none with one worker thread (every stage in
        turn), else ``build_processes``."""
        return 0 if self.resolved_threads == 1 else self.build_processes

    @property
    def model_threads(self) -> int:
        """Inference threads of each graph (OpenVINO): the cores left beside the study
        threads (stage threads x intra-op threads <= cores), at least 1; all the cores
        when one thread does every stage in turn."""
        threads, cores = self.resolved_threads, available_cores()
        if threads == 1:
            return cores
        return max(1, cores - (threads - 1))


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: associations and timeouts (seconds)."""

    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    connection_timeout: float = 10.0

    def __post_init__(self) -> None:
        _check_positive("limits.max_associations", self.max_associations, integer=True)
        for key in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            _check_positive(f"limits.{key}", getattr(self, key))


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: retries of the C-STORE SCU."""

    max_attempts: int = 10
    """A result the destination *refuses* (association rejected permanently, a
    failure status) becomes a dead letter after this many attempts (see ``retry``).
    Temporary failures (connection refused, timeout, abort, 0xA7xx) are retried
    with back-off for as long as it takes: the archive being down loses nothing."""
    backoff_initial_seconds: float = 2.0
    backoff_max_seconds: float = 300.0
    keep_open_seconds: float = 5.0
    """How long the association with a destination stays open after its last C-STORE,
    for the next results to travel on it (as Orthanc's ``DicomAssociationCloseDelay``,
    5 s); 0 releases it after every round of sends."""

    def __post_init__(self) -> None:
        _check_positive("delivery.max_attempts", self.max_attempts, integer=True)
        value = self.keep_open_seconds
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not 0 <= value <= 3600):
            raise ConfigError(f"delivery.keep_open_seconds must be a number of seconds from 0 "
                              f"to 3600 (got {value!r}); 0 releases the association after "
                              "every round of sends")
        _check_positive("delivery.backoff_initial_seconds", self.backoff_initial_seconds)
        _check_positive("delivery.backoff_max_seconds", self.backoff_max_seconds)
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ConfigError(
                "delivery.backoff_max_seconds must be >= delivery.backoff_initial_seconds"
            )


@dataclass(frozen=True)
class ModelConfig:
    """``[models]``: which registered models are active."""

    registry: Path = Path("models/registry.toml")
    router: str = ""
    classifier: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "registry", _check_path("models.registry", self.registry))
        for key in ("router", "classifier"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"models.{key} must be a model name in quotes, as in the "
                                  "registry's [models.<name>] tables")


@dataclass(frozen=True)
class OutputConfig:
    """``[outputs]``: series of the result objects."""

    sc_series_number: int = 9001
    sc_series_description: str = "AI {finding} heat map"
    sr_series_number: int = 9002
    sr_series_description: str = "AI {finding} findings SR"
    pdf_series_number: int = 9003
    pdf_series_description: str = "AI {finding} PDF report"
    institution_name: str = ""

    def __post_init__(self) -> None:
        for kind in ("sc", "sr", "pdf"):
            number = getattr(self, f"{kind}_series_number")
            if not isinstance(number, int) or not 0 < number < 2**31:
                raise ConfigError(f"outputs.{kind}_series_number must be a positive integer")
            from dicom_out.common import series_description_problem

            problem = series_description_problem(getattr(self, f"{kind}_series_description"))
            if problem:
                raise ConfigError(f"outputs.{kind}_series_description {problem}; "
                                  "{finding} names what the series measures")


@dataclass(frozen=True)
class ConsoleConfig:
    """``[console]``: the read-only status console and the Prometheus ``/metrics``
    endpoint, one HTTP server in the ``serve`` process.  Off by default; on loopback
    it needs no token, on any other address a bearer token is required."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = 8480
    token_file: Path | None = None
    """A file holding the bearer token (one line); required beyond loopback."""
    certificate: Path | None = None
    """HTTPS: the server certificate (PEM); with ``private_key``."""
    private_key: Path | None = None

    def __post_init__(self) -> None:
        _check_bool("console.enabled", self.enabled)
        try:
            address = ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise ConfigError(f"console.bind_address must be an IP address, e.g. 127.0.0.1 "
                              f"(got {self.bind_address!r})") from None
        _check_port("console.port", self.port, allow_zero=True)
        for key in ("token_file", "certificate", "private_key"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _check_path(f"console.{key}", value))
        if self.enabled and not address.is_loopback and self.token_file is None:
            raise ConfigError(
                f"console.token_file is required when console.bind_address ({self.bind_address}) "
                "is not a loopback address: put a long random token in a file readable only "
                "by the node and name it here, or bind to 127.0.0.1")
        if (self.certificate is None) != (self.private_key is None):
            raise ConfigError("console.certificate and console.private_key go together: set "
                              "both for HTTPS, or neither")

    @property
    def loopback_only(self) -> bool:
        return ipaddress.ip_address(self.bind_address).is_loopback


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the DICOM audit trail (PS3.15 A.5), as JSON lines in ``file`` and,
    with ``syslog_host``, as RFC 5424 syslog to an audit repository (spooled and
    retried while it is unreachable)."""

    enabled: bool = False
    file: Path = Path("var/audit/audit.jsonl")
    """JSON lines, one audit message a line; the syslog spool lives beside it."""
    syslog_host: str | None = None
    syslog_port: int = 6514
    syslog_protocol: str = "tls"
    """``udp`` (RFC 5426), ``tcp`` (RFC 6587 octet counting) or ``tls`` (RFC 5425,
    checked against ``[tls] ca_certificates``)."""

    def __post_init__(self) -> None:
        _check_bool("audit.enabled", self.enabled)
        object.__setattr__(self, "file", _check_path("audit.file", self.file))
        if self.syslog_host is not None:
            check_host("audit.syslog_host", self.syslog_host)
        _check_port("audit.syslog_port", self.syslog_port)
        if self.syslog_protocol not in ("udp", "tcp", "tls"):
            raise ConfigError(f"audit.syslog_protocol must be \"udp\", \"tcp\" or \"tls\" "
                              f"(got {self.syslog_protocol!r})")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    peers: tuple[PeerConfig, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    storage: StorageConfig = field(default_factory=StorageConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    allow_any_peer: bool = False
    """Accept any calling AE.  Off by default: set it explicitly to open the node."""
    keep_results_local: bool = False
    """Without ``[[destinations]]``, keep the results in the spool's ``outbox/`` only.
    Must be said explicitly: a node with no destination otherwise drops its results."""

    def __post_init__(self) -> None:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"destinations.name must be unique (repeated: {', '.join(dupes)})")
        if any(d.tls for d in self.destinations) and (
            self.tls.certificate is None or self.tls.private_key is None
        ):
            raise ConfigError("a destination uses tls but [tls] has no certificate/private_key")
        if not self.peers and not self.allow_any_peer:
            raise ConfigError(
                "peers must list at least one calling AE (or set allow_any_peer = true)"
            )
        _check_bool("keep_results_local", self.keep_results_local)
        early = self.worker.early_start_seconds
        if early is not None and early and early >= self.study.quiet_seconds:
            raise ConfigError(
                f"worker.early_start_seconds ({self.worker.early_start_seconds:g}) must be shorter "
                f"than study.quiet_seconds ({self.study.quiet_seconds:g}) to start anything "
                "early; lower it, or set it to 0 to turn early starts off")
        if not self.destinations and not self.keep_results_local:
            raise ConfigError(
                "destinations: none configured, so every result would stay unsent; add a "
                "[[destinations]] table (name, ae_title, host, port) for the archive, or set "
                "keep_results_local = true to keep results in the spool only")

    @property
    def early_start(self) -> float:
        """Seconds of quiet after which the worker may start on a study early (``0``:
        never): ``[worker] early_start_seconds``, or when it is left out
        :data:`DEFAULT_EARLY_START` or half of ``[study] quiet_seconds``, whichever is
        shorter."""
        early = self.worker.early_start_seconds
        if early is None:
            return min(DEFAULT_EARLY_START, self.study.quiet_seconds / 2)
        return float(early)

    def peer(self, calling_ae_title: str) -> PeerConfig | None:
        """The allow-list entry for a calling AE title, if any."""
        for peer in self.peers:
            if peer.ae_title == calling_ae_title.strip():
                return peer
        return None

    def destination(self, name: str) -> DestinationConfig:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError(f"no destination named {name!r} in the configuration")

    def as_dict(self) -> dict[str, Any]:
        """Plain, printable form (paths as strings)."""

        def convert(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: convert(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [convert(v) for v in value]
            return value

        result: dict[str, Any] = convert(asdict(self))
        return result


_SECTIONS: Mapping[str, type] = {
    "node": NodeConfig,
    "storage": StorageConfig,
    "study": StudyConfig,
    "limits": LimitsConfig,
    "worker": WorkerConfig,
    "delivery": DeliveryConfig,
    "models": ModelConfig,
    "outputs": OutputConfig,
    "tls": TlsConfig,
    "database": DatabaseConfig,
    "console": ConsoleConfig,
    "audit": AuditConfig,
}

_TOP_LEVEL_FLAGS = ("allow_any_peer", "keep_results_local")


def _build(cls: type, key: str, raw: object) -> Any:
    """One section from its TOML table; every failure is one :class:`ConfigError`
    line naming the key and what to write instead."""
    if not isinstance(raw, dict):
        section = key.split("[")[0]
        raise ConfigError(f"{key} must be a table ([{section}] with key = value lines)")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)} (known keys: "
                          f"{', '.join(known)}; check the spelling)")
    label = key
    if "name" in raw and isinstance(raw["name"], str):
        label = f"{key} ({raw['name']})"
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in raw]
    if missing:
        raise ConfigError(f"{label}: missing key(s) {', '.join(missing)}; add "
                          + ", ".join(f"{m} = {_EXAMPLES.get(m, '...')}" for m in missing))
    try:
        return cls(**raw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a value of the wrong kind that no check caught
        raise ConfigError(f"{label}: a value has the wrong type ({type(exc).__name__}); "
                          "write numbers without quotes, text and paths in quotes, and "
                          "booleans as true/false") from None


#: Example values quoted in "missing key" errors.
_EXAMPLES: Mapping[str, str] = {
    "name": '"pacs"', "ae_title": '"PACS"', "host": '"10.0.0.5"', "port": "104",
}


def _resolve(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path)


def config_from_dict(
    raw: Mapping[str, Any], base_dir: Path, environ: Mapping[str, str] | None = None
) -> Config:
    """Build a :class:`Config` from parsed TOML; relative paths are resolved against
    ``base_dir`` (the directory of the configuration file)."""
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for var, (section, key) in ENV_OVERRIDES.items():
        if environ and var in environ:
            value: Any = environ[var]
            if key == "port":
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigError(f"{var} must be an integer (got {value!r})") from None
            data.setdefault(section, {})[key] = value

    unknown = sorted(set(data) - set(_SECTIONS) - {"peers", "destinations", *_TOP_LEVEL_FLAGS})
    if unknown:
        known = ", ".join([*_SECTIONS, "peers", "destinations", *_TOP_LEVEL_FLAGS])
        raise ConfigError(f"unknown section(s) or key(s): {', '.join(unknown)} (known: "
                          f"{known}; check the spelling)")

    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _build(cls, name, data[name])
    for name, cls in (("peers", PeerConfig), ("destinations", DestinationConfig)):
        entries = data.get(name, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{name} must be an array of tables ([[{name}]])")
        kwargs[name] = tuple(_build(cls, f"{name}[{i}]", e) for i, e in enumerate(entries))
    for flag in _TOP_LEVEL_FLAGS:
        if flag in data:
            kwargs[flag] = _check_bool(flag, data[flag])

    config = Config(**kwargs)
    storage = config.storage
    models = config.models
    resolved_storage = StorageConfig(
        spool_dir=_resolve(base_dir, storage.spool_dir),
        database=_resolve(base_dir, storage.database),
        min_free_mb=storage.min_free_mb,
        retain_sources_hours=storage.retain_sources_hours,
    )
    resolved_models = ModelConfig(
        registry=_resolve(base_dir, models.registry),
        router=models.router,
        classifier=models.classifier,
    )
    console = config.console
    resolved_console = dataclasses.replace(
        console,
        token_file=_resolve(base_dir, console.token_file) if console.token_file else None,
        certificate=_resolve(base_dir, console.certificate) if console.certificate else None,
        private_key=_resolve(base_dir, console.private_key) if console.private_key else None,
    )
    resolved_audit = dataclasses.replace(config.audit,
                                         file=_resolve(base_dir, config.audit.file))
    tls = config.tls
    resolved_tls = TlsConfig(
        enabled=tls.enabled,
        certificate=_resolve(base_dir, tls.certificate) if tls.certificate else None,
        private_key=_resolve(base_dir, tls.private_key) if tls.private_key else None,
        ca_certificates=_resolve(base_dir, tls.ca_certificates) if tls.ca_certificates else None,
        require_peer_certificate=tls.require_peer_certificate,
    )
    return Config(
        node=config.node,
        peers=config.peers,
        destinations=config.destinations,
        storage=resolved_storage,
        study=config.study,
        limits=config.limits,
        worker=config.worker,
        delivery=config.delivery,
        models=resolved_models,
        outputs=config.outputs,
        tls=resolved_tls,
        database=config.database,
        console=resolved_console,
        audit=resolved_audit,
        allow_any_peer=config.allow_any_peer,
        keep_results_local=config.keep_results_local,
    )


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and check ``config.toml``.

    Parameters
    ----------
    path
        The configuration file.
    environ
        Environment used for the overrides in :data:`ENV_OVERRIDES`; ``None`` means
        ``os.environ`` (the only place the node reads it).
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path} (give the node's file with "
                          "--config PATH)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); quote text values and check "
                          "the line named") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__}); check that it is "
                          "a UTF-8 text file readable by this user") from None
    env = os.environ if environ is None else environ
    return config_from_dict(raw, path.resolve().parent, env)


def _toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    raise ConfigError(f"{key}: cannot write a {type(value).__name__} to config.toml")


def _table_body(name: str, section: Any) -> str:
    """The ``key = value`` lines of one section, leaving out keys at their default."""
    lines = []
    for f in fields(section):
        value = getattr(section, f.name)
        if value is None or (f.default is not MISSING and value == f.default):
            continue
        lines.append(f"{f.name} = {_toml_value(f'{name}.{f.name}', value)}\n")
    return "".join(lines)


def render_config(config: Config) -> str:
    """``config.toml`` text that :func:`load_config` reads back as ``config``.

    Only keys that differ from their default are written, and a section left at its
    defaults is left out, so that text appended later may add it.  Paths are written
    as they are: a relative one stays relative to the file's directory.

    Parameters
    ----------
    config
        The configuration; being a :class:`Config`, it has already passed every check.
    """
    parts = [f"{flag} = true\n" for flag in _TOP_LEVEL_FLAGS if getattr(config, flag)]
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):  # [[peers]], [[destinations]]
            parts.extend(f"[[{f.name}]]\n" + _table_body(f.name, entry) for entry in value)
        elif is_dataclass(value):
            body = _table_body(f.name, value)
            if body:
                parts.append(f"[{f.name}]\n" + body)
    return "\n".join(parts)
