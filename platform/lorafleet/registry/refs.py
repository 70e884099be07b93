"""Names, versions, aliases and references (``name``, ``name@3``, ``name@live``).

Names and versions become folder names (or key segments of an object store), so they are
checked here, before any storage call, against a safe alphabet.
"""

from __future__ import annotations

import re

from lorafleet.registry.errors import RegistryError

__all__ = [
    "LIVE",
    "is_version",
    "parse_ref",
    "validate_alias",
    "validate_name",
    "validate_selector",
    "validate_version",
]

LIVE = "live"

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION_RE = re.compile(r"[0-9]{1,18}")


def validate_name(name: str) -> str:
    """Check an artifact (or alias) name and return it unchanged.

    Names become folder names, so they are restricted to a safe alphabet.

    Args:
        name: Candidate name.

    Returns:
        ``name``, for chaining.

    Raises:
        RegistryError: If ``name`` is empty, longer than 64 characters, starts with '.',
            contains '..', a path separator or any character other than letters, digits,
            '.', '_' and '-'.
    """
    if (
        not isinstance(name, str)
        or not _NAME_RE.fullmatch(name)
        or name.startswith(".")
        or ".." in name
    ):
        raise RegistryError(
            f"invalid artifact name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "not starting with '.' (no path separators or '..')"
        )
    return name


def is_version(child: str) -> bool:
    """Whether a folder name is a canonical version number ("1", "12"; not "0", "07", ".tmp-x")."""
    return bool(_VERSION_RE.fullmatch(child)) and child == str(int(child)) and child != "0"


def validate_version(version: str | int) -> str:
    """Return the canonical version string ("007" -> "7") or raise RegistryError."""
    text = str(version)
    if not _VERSION_RE.fullmatch(text) or int(text) < 1:
        raise RegistryError(
            f"invalid version {text!r}: versions are positive integers such as '1' or '2'"
        )
    return str(int(text))


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it is a usable alias name, else raise RegistryError."""
    if isinstance(alias, str) and alias.isdigit():
        # An all-digit alias would be indistinguishable from a version in "name@3".
        raise RegistryError(
            f"invalid alias {alias!r}: aliases must not be all digits (those are versions); "
            "use a word such as 'live' or 'canary'"
        )
    try:
        return validate_name(alias)
    except RegistryError:
        raise RegistryError(
            f"invalid alias {alias!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "not starting with '.'"
        ) from None


def validate_selector(selector: str | int) -> str:
    """Validate a version-or-alias selector; versions come back canonical."""
    text = str(selector)
    if text.isdigit():
        return validate_version(text)
    return validate_alias(text)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``"name"`` / ``"name@selector"`` into (name, selector or None), validated."""
    if not isinstance(ref, str):
        raise RegistryError(f"invalid reference {ref!r}: expected 'name' or 'name@version'")
    name, sep, selector = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not selector:
        raise RegistryError(
            f"invalid reference {ref!r}: put a version or alias after '@', e.g. '{name}@1' "
            f"or '{name}@live', or leave '@' out for the live version"
        )
    return name, validate_selector(selector)
