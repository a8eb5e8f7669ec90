"""Connector classes by name, from the `crm_bridge.connectors` entry-point group.

The built-in connectors register the same way as third-party ones (see pyproject.toml).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from connectors.base import Connector

GROUP = "crm_bridge.connectors"


def names() -> list[str]:
    """Installed connector names, without importing them."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def get(name: str) -> type[Connector] | None:
    """The connector class registered under `name`, or None."""
    for ep in entry_points(group=GROUP, name=name):
        cls = ep.load()
        if isinstance(cls, type) and issubclass(cls, Connector):
            return cls
    return None
