"""Subcommands of the later stages (eval, plot, report, estimate): each module's `register(subparsers)`."""
from __future__ import annotations

from typing import Any, Callable

REGISTRY: list[Callable[[Any], None]] = []
