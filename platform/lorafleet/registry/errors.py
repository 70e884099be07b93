"""The registry's error types, in their own module so refs, storage and the registry share them.

``RegistryError`` is the base: a problem the user can fix. Two subclasses let callers tell cases
apart without parsing messages: ``ArtifactNotFoundError`` (the name, version or alias does not
exist, or was removed meanwhile; serving answers 404) and ``LiveVersionError`` (a removal would
take away the version serving resolves the name to; the CLI turns it into a ``--force`` hint).
"""

from __future__ import annotations

__all__ = ["ArtifactNotFoundError", "LiveVersionError", "RegistryError"]


class RegistryError(ValueError):
    """A problem the user can fix; the message says what to do."""


class ArtifactNotFoundError(RegistryError):
    """The artifact name, version or alias does not exist (or was removed while being read)."""


class LiveVersionError(RegistryError):
    """A removal would take away the live version (what ``resolve(name)`` gives) without ``force``.

    Attributes:
        name: The artifact name.
        live: The live version, e.g. ``"2"``.
        others: The other versions, sorted numerically (empty if the live one is the only one).
    """

    def __init__(self, message: str, *, name: str, live: str, others: list[str]) -> None:
        super().__init__(message)
        self.name = name
        self.live = live
        self.others = others

    def __reduce__(self):  # keyword-only fields: pickle (e.g. across Ray) must pass them back
        return (_rebuild_live_error, (str(self), self.name, self.live, self.others))


def _rebuild_live_error(message: str, name: str, live: str, others: list[str]) -> LiveVersionError:
    return LiveVersionError(message, name=name, live=live, others=others)
