"""The registry's one error type, in its own module so refs, storage and the registry share it."""

from __future__ import annotations

__all__ = ["RegistryError"]


class RegistryError(ValueError):
    """A problem the user can fix; the message says what to do."""
