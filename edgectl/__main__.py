"""``python -m edgectl`` runs the command line."""

from __future__ import annotations

from edgectl.cli import main

main()
