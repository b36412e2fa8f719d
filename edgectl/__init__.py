"""edgectl: keep IoT telemetry in sync between edge sites and a cloud."""

from __future__ import annotations

__version__ = "0.1.0"
