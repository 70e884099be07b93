"""A predict run's output folder: one part file per input block, named by the block's index, and a
manifest saying which run the parts belong to.

A part appears whole or not at all (`lorafleet.uri.write_bytes`: a local rename, an object put), so
after an interruption the parts present are exactly the blocks finished, and a run started again
with the same manifest writes only the others.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from lorafleet.uri import exists, join, list_names, read_text, write_bytes, write_text

__all__ = ["MANIFEST", "part_name", "written_blocks", "write_part", "open_output"]

MANIFEST = "_predict.json"
_PART = re.compile(r"part-(\d{5,})\.(jsonl|parquet)")


def part_name(block: int, fmt: str) -> str:
    """``part-00007.jsonl``: block 7's output."""
    return f"part-{block:05d}.{fmt}"


def written_blocks(out: str, fmt: str) -> set[int]:
    """The indexes of the blocks whose part file is in ``out``."""
    found = (_PART.fullmatch(name) for name in list_names(out))
    return {int(m.group(1)) for m in found if m and m.group(2) == fmt}


def write_part(out: str, block: int, fmt: str, rows: list[dict[str, Any]]) -> None:
    """Write block ``block``'s rows as one part file (JSON lines, or a Parquet table)."""
    if fmt == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        data = buf.getvalue()
    write_bytes(join(out, part_name(block, fmt)), data)


def open_output(out: str, manifest: dict[str, Any]) -> bool:
    """Claim ``out`` for the run ``manifest`` describes; True when it already holds parts of that same
    run (to be resumed).

    Raises:
        FileExistsError: ``out`` holds another run's output (other data, columns, adapter versions,
            block size or format): the message names what differs.
    """
    where = join(out, MANIFEST)
    if exists(where):
        before = json.loads(read_text(where))
        differs = sorted(k for k in set(before) | set(manifest) if before.get(k) != manifest.get(k))
        if differs:
            detail = "; ".join(f"{k}: {before.get(k)!r} there, {manifest.get(k)!r} now" for k in differs)
            raise FileExistsError(f"{out} holds the output of another predict run ({detail}); "
                                  "use another --out, or delete it to start over")
        return True
    if any(_PART.fullmatch(name) for name in list_names(out)):
        raise FileExistsError(f"{out} holds part files but no {MANIFEST}; use another --out")
    write_text(where, json.dumps(manifest, indent=2) + "\n")
    return False
