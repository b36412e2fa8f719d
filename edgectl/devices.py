"""Registering devices on an edge and edges on a cloud."""

from __future__ import annotations

import secrets

from edgectl.changes import ChangeSet, PendingEvent
from edgectl.message import ENTITY_CREATED, EntityRef
from edgectl.storage import DEVICE, Edge, Entity, Store


def new_token() -> str:
    """A random access token or secret, URL-safe, 20 characters."""
    return secrets.token_urlsafe(15)


def register_device(
    store: Store, name: str, *, type: str = "default", token: str | None = None
) -> tuple[Entity, bool]:
    """Register a device; returns it and whether it is new.

    The ENTITY_CREATED cloud event is queued in the same commit, so the cloud
    learns of the device before any of its data. An existing device is
    returned unchanged. Raises StorageError, or ConfigError when the token is
    taken by another device.
    """
    from edgectl.errors import ConfigError

    ref = EntityRef(DEVICE, name)
    existing = store.entity(ref)
    if existing is not None:
        return existing, False
    token = token or new_token()
    holder = store.entity_by_token(token)
    if holder is not None:
        raise ConfigError(
            f"token is already used by device {holder.name!r}; pick another"
        )
    announce = ChangeSet()
    announce.add_event(PendingEvent(0, ENTITY_CREATED, ref, {"type": type}, 0))
    return store.add_entity(ref, type=type, token=token, announce=announce), True


def register_edge(
    store: Store, name: str, *, key: str | None = None, secret: str | None = None
) -> tuple[Edge, bool]:
    """Register an edge on the cloud; returns it and whether it is new."""
    from edgectl.errors import ConfigError

    for edge in store.edges():
        if edge.name == name:
            return edge, False
        if key and edge.routing_key == key:
            raise ConfigError(
                f"key is already used by edge {edge.name!r}; pick another"
            )
    return store.add_edge(name, key or new_token(), secret or new_token()), True
