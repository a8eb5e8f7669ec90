"""Durable storage of events and their deliveries, behind one small interface (`Store`)."""

from bridge.store.base import Store, open_store

__all__ = ["Store", "open_store"]
