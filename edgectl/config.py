"""Settings of a running role, from defaults, a YAML file, the environment and options.

Later sources win: defaults, then ``--config FILE``, then ``EDGECTL_*``
environment variables, then command-line options. Secrets may come from the
environment or from a file (``edge_secret_file``) so they stay out of shell
history and process listings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edgectl.errors import ConfigError
from edgectl.loader import Document, read_yaml

ROLES = ("edge", "cloud")
DEFAULT_LISTEN = {"edge": "127.0.0.1:8081", "cloud": "127.0.0.1:8080"}
DEFAULT_DATA = Path("edgectl-data")


@dataclass(frozen=True)
class RoleConfig:
    """Everything ``edgectl run`` needs; see the README's configuration reference."""

    role: str = "edge"
    db: Path | None = None
    chain: Path | None = None
    listen: str | None = None
    cloud: str | None = None
    edge_key: str | None = None
    edge_secret: str | None = None
    edge_secret_file: Path | None = None
    cloud_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    port_file: Path | None = None
    max_body_bytes: int = 1024 * 1024
    batch_size: int = 5000
    max_attempts: int = 3
    poll_seconds: float = 20.0
    ttl_cleanup_seconds: float = 60.0

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
        """The edge secret, read from ``edge_secret_file`` when that is set."""
        if self.edge_secret_file is None:
            return self.edge_secret
        try:
            return self.edge_secret_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(
                f"cannot read edge secret file {self.edge_secret_file}: {error.strerror}"
            ) from error


_ENV = {
    "db": "EDGECTL_DB",
    "chain": "EDGECTL_CHAIN",
    "listen": "EDGECTL_LISTEN",
    "cloud": "EDGECTL_CLOUD_URL",
    "edge_key": "EDGECTL_EDGE_KEY",
    "edge_secret": "EDGECTL_EDGE_SECRET",
    "edge_secret_file": "EDGECTL_EDGE_SECRET_FILE",
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
    if config.role == "edge" and config.cloud and not (config.edge_key and config.secret()):
        raise ConfigError(
            "an edge with --cloud needs --edge-key and --edge-secret "
            "(or EDGECTL_EDGE_KEY and EDGECTL_EDGE_SECRET)"
        )
    return config


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
        raise ConfigError(f"setting {key!r} in {source} must be a number, got {value!r}") from None
    return str(value)
