"""Calling a running role's admin API, for the CLI's ``--url`` mode."""

from __future__ import annotations

import os
from typing import Any

import httpx

from edgectl.errors import PeerRejectedError, TransportError


def call(url: str, method: str, path: str, body: Any = None, params: Any = None) -> Any:
    """Send one request and return the JSON answer.

    Sends ``EDGECTL_ADMIN_TOKEN`` as a bearer token when it is set, for a
    role reached from another machine. Raises TransportError when the server
    cannot be reached and PeerRejectedError with the server's message when it
    refuses.
    """
    token = os.environ.get("EDGECTL_ADMIN_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else None
    try:
        response = httpx.request(
            method,
            url.rstrip("/") + path,
            json=body,
            params=params,
            headers=headers,
            timeout=30.0,
        )
    except httpx.HTTPError as error:
        raise TransportError(
            f"cannot reach {url}: {error}; is edgectl running there?"
        ) from error
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise PeerRejectedError(
            f"{url}{path} answered {response.status_code}: {message}"
        )
    if not response.content:
        return None
    return response.json()
