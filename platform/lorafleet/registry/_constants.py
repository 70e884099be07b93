"""The registry's reserved file names, shared by every layer of the package (storage backends,
layout, integrity checks), so none of them imports another for a name."""

from __future__ import annotations

__all__ = ["ALIASES_FILE", "METADATA_FILE", "TMP_PREFIX"]

METADATA_FILE = "lorafleet.json"  # a version's metadata, written last: a version exists once it does
ALIASES_FILE = "aliases.json"  # <name>/aliases.json: {"live": "2"}
TMP_PREFIX = ".tmp-"  # staging folders and temp files: hidden, so readers never list them
