"""Settings of a running role, from defaults, a YAML file, the environment and options.

Later sources win: defaults, then ``--config FILE``, then ``EDGECTL_*``
environment variables, then command-line options. Secrets may come from the
environment or from a file (``edge_secret_file``, ``admin_token_file``) so they
stay out of shell history and process listings; they never appear in a
RoleConfig's repr, so logging a config cannot leak them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgectl.errors import ConfigError
from edgectl.loader import Document, read_yaml

ROLES = ("edge", "cloud")
QUEUE_FULL_POLICIES = ("reject", "drop_oldest")
DEFAULT_LISTEN = {"edge": "127.0.0.1:8081", "cloud": "127.0.0.1:8080"}
DEFAULT_DATA = Path("edgectl-data")
MIB = 1024 * 1024


@dataclass(frozen=True)
class RoleConfig:
    """Everything ``edgectl run`` needs; see the README's configuration reference."""

    role: str = "edge"
    db: Path | None = None
    chain: Path | None = None
    listen: str | None = None
    cloud: str | None = None
    edge_key: str | None = None
    edge_secret: str | None = field(default=None, repr=False)
    edge_secret_file: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    admin_token_file: Path | None = None
    cloud_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    port_file: Path | None = None
    max_body_bytes: int = MIB
    max_sync_body_bytes: int = 64 * MIB
    max_value_bytes: int = 64 * 1024
    max_polls_per_device: int = 4
    client_timeout_seconds: float = 30.0
    max_queue_bytes: int = 1024 * MIB
    max_queue_age_seconds: float = 7 * 24 * 3600.0
    queue_full: str = "reject"
    keep_delivered_seconds: float = 0.0
    batch_size: int = 5000
    max_attempts: int = 3
    poll_seconds: float = 20.0
    ttl_cleanup_seconds: float = 60.0
    # DuckDB's memory for its page cache and queries; 0 picks the role's
    # default (see ``storage_memory``).
    storage_memory_mb: int = 0

    @property
    def storage_memory(self) -> str:
        """DuckDB's memory limit: ``storage_memory_mb``, else 96 MiB on an edge
        and 1 GiB on a cloud. DuckDB keeps the pages it reads up to its limit,
        so with 1 GiB a long enough queue grows an edge to over 1 GB; with
        96 MiB an edge holding 10,000,000 queued events peaked near 265 MB."""
        megabytes = self.storage_memory_mb or (96 if self.role == "edge" else 1024)
        return f"{megabytes}MiB"

    @property
    def db_path(self) -> Path:
        """The DuckDB file: ``--db``, or ``edgectl-data/ROLE.duckdb``."""
        return self.db or DEFAULT_DATA / f"{self.role}.duckdb"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to listen on; port 0 lets the OS choose."""
        text = self.listen or DEFAULT_LISTEN[self.role]
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen must be HOST:PORT, got {text!r}")
        return host.strip("[]"), int(port)

    def secret(self) -> str | None:
        """The edge secret, read from ``edge_secret_file`` when that is set.

        Raises ConfigError when the file cannot be read.
        """
        return _secret(self.edge_secret, self.edge_secret_file, "edge secret")

    def admin_secret(self) -> str | None:
        """The admin API token, read from ``admin_token_file`` when that is set.

        Raises ConfigError when the file cannot be read.
        """
        return _secret(self.admin_token, self.admin_token_file, "admin token")


def _secret(value: str | None, file: Path | None, what: str) -> str | None:
    if file is None:
        return value
    try:
        return file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(
            f"cannot read {what} file {file}: {error.strerror}"
        ) from error


_ENV = {
    "db": "EDGECTL_DB",
    "chain": "EDGECTL_CHAIN",
    "listen": "EDGECTL_LISTEN",
    "cloud": "EDGECTL_CLOUD_URL",
    "edge_key": "EDGECTL_EDGE_KEY",
    "edge_secret": "EDGECTL_EDGE_SECRET",
    "edge_secret_file": "EDGECTL_EDGE_SECRET_FILE",
    "admin_token": "EDGECTL_ADMIN_TOKEN",
    "admin_token_file": "EDGECTL_ADMIN_TOKEN_FILE",
    "cloud_ca": "EDGECTL_CLOUD_CA",
    "tls_cert": "EDGECTL_TLS_CERT",
    "tls_key": "EDGECTL_TLS_KEY",
}


def load_config(role: str, file: Path | None, options: dict[str, Any]) -> RoleConfig:
    """Merge the sources into one RoleConfig; raises ConfigError naming the key."""
    if role not in ROLES:
        raise ConfigError(f"role must be edge or cloud, got {role!r}")
    config = RoleConfig(role=role)
    if file is not None:
        config = _merge(config, _read_file(file), str(file))
    environment = {k: os.environ[v] for k, v in _ENV.items() if os.environ.get(v)}
    config = _merge(config, environment, "the environment")
    given = {k: v for k, v in options.items() if v is not None}
    config = _merge(config, given, "the options")
    _check(config)
    return config


def _check(config: RoleConfig) -> None:
    # Read secret files now, so a missing one stops the start with its name.
    has_credentials = config.edge_key and config.secret()
    config.secret()
    if config.role == "edge" and config.cloud and not has_credentials:
        raise ConfigError(
            "an edge with --cloud needs --edge-key and --edge-secret "
            "(or EDGECTL_EDGE_KEY and EDGECTL_EDGE_SECRET)"
        )
    if config.queue_full not in QUEUE_FULL_POLICIES:
        raise ConfigError(
            f"queue_full must be reject or drop_oldest, got {config.queue_full!r}"
        )
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("give --tls-cert and --tls-key together, or neither")
    for name in ("tls_cert", "tls_key", "cloud_ca"):
        path = getattr(config, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"{name} file {path} does not exist or is not a file")
    config.admin_secret()
    _check_numbers(config)


def _check_numbers(config: RoleConfig) -> None:
    positive = (
        "max_body_bytes",
        "max_sync_body_bytes",
        "max_polls_per_device",
        "client_timeout_seconds",
        "batch_size",
        "max_attempts",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be above 0, got {getattr(config, name)}")
    if config.storage_memory_mb and config.storage_memory_mb < 32:
        raise ConfigError(
            "storage_memory_mb must be 0 (the role's default) or at least 32, "
            f"got {config.storage_memory_mb}"
        )
    for name in ("max_value_bytes", "max_queue_bytes", "max_queue_age_seconds"):
        if getattr(config, name) < 0:
            raise ConfigError(
                f"{name} must be 0 (no limit) or above, got {getattr(config, name)}"
            )


def _read_file(file: Path) -> dict[str, Any]:
    document = read_yaml(file)
    if not isinstance(document, Document):
        raise ConfigError(document.render())
    if document.plain is None:
        return {}
    if not isinstance(document.plain, dict):
        raise ConfigError(f"{file}:1:1: the config file must be a mapping of settings")
    return {key.replace("-", "_"): value for key, value in document.plain.items()}


def _merge(config: RoleConfig, values: dict[str, Any], source: str) -> RoleConfig:
    types = {field.name: field.type for field in fields(RoleConfig)}
    converted = {}
    for key, value in values.items():
        if key not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown setting {key!r} in {source}; known: {known}")
        converted[key] = _convert(key, str(types[key]), value, source)
    return replace(config, **converted)


def _convert(key: str, kind: str, value: Any, source: str) -> Any:
    try:
        if "Path" in kind:
            return Path(str(value)).expanduser()
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {key!r} in {source} must be a number, got {value!r}"
        ) from None
    return str(value)
