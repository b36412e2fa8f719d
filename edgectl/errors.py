"""The exceptions edgectl raises for problems a user can fix.

Everything a user can act on is an ``EdgectlError``; the CLI prints its message
without a traceback and exits with status 1. Any other exception is a bug.
"""

from __future__ import annotations


class EdgectlError(Exception):
    """Base class of every error whose message is written for the user."""


class ChainError(EdgectlError):
    """A rule chain file cannot be loaded: bad YAML, schema or semantics."""


class ScriptError(EdgectlError):
    """A rule-chain script failed to compile, threw, or ran past its limits."""


class RunawayChainError(EdgectlError):
    """One incoming message caused more node executions than the limit allows."""


class StorageError(EdgectlError):
    """The DuckDB file could not be opened, read or written."""


class SchemaVersionError(StorageError):
    """The DuckDB file was written by a newer edgectl than this one."""


class TransportError(EdgectlError):
    """The peer could not be reached or answered with an error."""


class PeerRejectedError(TransportError):
    """The peer refused a request for good (bad credentials, bad request)."""


class ConfigError(EdgectlError):
    """A command-line option or config file value is wrong."""


class IngestError(EdgectlError):
    """A file given to ``edgectl ingest`` cannot be read as telemetry."""
