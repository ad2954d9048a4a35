"""Exceptions of the node.  Their messages name the broken rule.

Only the C-STORE handler turns them into DIMSE statuses (see :mod:`node.scp`).
"""

from __future__ import annotations


class NodeError(Exception):
    """Base class of the node's own errors."""


class ConfigError(NodeError):
    """The configuration breaks a rule; the message names the key and the rule."""


class SpoolError(NodeError):
    """An instance could not be kept durably (disk full, below the free-space floor,
    write or fsync failed).  Maps to 0xA700 Out of Resources."""


class DatasetError(NodeError):
    """A received dataset cannot be understood (unparseable, identifying attributes
    missing or inconsistent).  Maps to a 0xC000-range status."""


class MissingIdentifierError(DatasetError):
    """Study/Series/SOP Instance UID or SOP Class UID missing, invalid, or
    inconsistent with the C-STORE request.  Maps to 0xC212."""


class SendError(NodeError):
    """A C-STORE to a destination failed.

    ``permanent`` is True when retrying cannot help (association rejected
    permanently, a failure status from the peer); False for connection refused,
    timeouts and aborts, which are retried with back-off.
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class StartError(NodeError):
    """The node cannot start (its port is taken, its models cannot be loaded); the
    message names the port or the model and what to do.  ``serve`` exits 2."""
