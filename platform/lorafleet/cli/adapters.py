"""`lorafleet adapters list|show|promote|rm|export`: the artifact registry.

`rm NAME` (every version) and `rm NAME VERSION` of the live version need `--force`: the live version
is what serving answers NAME with. `promote` does not refuse a DoRA adapter (the registry holds
artifacts for eval and comparison too, and `NAME@VERSION` reaches serving whatever `live` says); it
warns that serving refuses it, and serving itself refuses it with a 422 (serving/compat.py).
`export` writes a version out of lorafleet (a peft folder, or merged into its base): `lorafleet.export`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_parser", "cmd_adapters", "cmd_export"]


def cmd_adapters(args: argparse.Namespace) -> int:
    from lorafleet.config import registry_root
    from lorafleet.registry import Registry

    reg = Registry(registry_root())
    if args.action == "list":
        entries = reg.list(args.name)
        if args.json:
            print(json.dumps([{"ref": e.ref, "name": e.name, "version": e.version, "aliases": list(e.aliases),
                               "path": str(e.path), "metadata": e.metadata} for e in entries]))
            return 0
        from lorafleet.report.runs import print_registry

        print_registry(reg.root, entries)
    elif args.action == "show":
        e = reg.resolve(args.ref)
        print(json.dumps({"ref": e.ref, "aliases": list(e.aliases), "path": str(e.path), **e.metadata}, indent=2))
    elif args.action == "promote":
        e = reg.promote(args.name, args.version)
        print(f"{e.name}: live -> {e.version}")
        from lorafleet.serving.compat import dora_refusal

        if (refusal := dora_refusal(e)) is not None:
            print(f"warning: {refusal}", file=sys.stderr)
    elif args.action == "rm":
        for e in _remove(reg, args):
            print(f"removed {e.ref}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`adapters export REF --out DIR`: print what was written (or, with --json, the result as one line)."""
    from lorafleet.config import registry_root
    from lorafleet.export import export_artifact
    from lorafleet.registry import Registry

    result = export_artifact(Registry(registry_root()), args.ref, args.out, merge=args.merge, dtype=args.dtype,
                             base=args.base, force=args.force, push_to_hub=args.push_to_hub)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    what = {"adapter": "peft adapter", "merged": "merged into its base", "model": "whole model"}[result.kind]
    print(f"exported {result.ref} ({what}, {result.dtype or 'dtype as trained'}) to {result.out}")
    for rel, size in result.files.items():
        print(f"  {rel:<32} {size:>12,} bytes")
    local = "/" in result.base and Path(result.base).expanduser().exists()
    print(f"base: {result.base}" + (" (a local folder; --base HUB_ID names a hub id instead)" if local else ""))
    if result.hub_url:
        print(f"pushed: {result.hub_url}")
    return 0


def _remove(reg, args: argparse.Namespace) -> list:
    """`Registry.remove`, its live-version refusal reworded for the command line (`--force`)."""
    from lorafleet.registry import LiveVersionError, RegistryError

    try:
        return reg.remove(args.name, args.version, force=args.force)
    except LiveVersionError as err:
        what = (f"`adapters rm {err.name}` removes every version, including" if args.version is None
                else f"`adapters rm {err.name} {args.version}` would remove")
        promote = (f" (or first move live with `lorafleet adapters promote {err.name} {err.others[-1]}`)"
                   if args.version is not None and err.others else "")
        raise RegistryError(
            f"{what} {err.name}@{err.live}, the live version (what serving answers {err.name!r} with); "
            f"pass --force to remove it anyway{promote}"
        ) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `adapters` and its actions."""
    ad = sub.add_parser("adapters", help="the artifact registry").add_subparsers(dest="action", required=True)
    p = ad.add_parser("list", help="list registered artifacts")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="every entry with its metadata, as JSON")
    p = ad.add_parser("show", help="metadata of NAME or NAME@VERSION")
    p.add_argument("ref")
    p = ad.add_parser("promote", help="point the 'live' alias (what serving follows) at a version")
    p.add_argument("name")
    p.add_argument("version")
    p = ad.add_parser("rm", help="remove a version, or every version of a name")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p.add_argument("--force", action="store_true",
                   help="also remove the live version (what serving answers NAME with); required for NAME alone")
    for action in ("list", "show", "promote", "rm"):
        ad.choices[action].set_defaults(fn=cmd_adapters)
    p = ad.add_parser("export", help="write a version out: a peft folder + model card, or --merge: a plain HF model")
    p.add_argument("ref", help="NAME, NAME@VERSION or NAME@ALIAS")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (refused if not empty, "
                   "unless --force)")
    p.add_argument("--merge", action="store_true", help="LoRA: merge the adapter into its base (merge_and_unload) "
                   "and save the whole model, which transformers loads and vLLM serves without peft")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="the weights' dtype; default: the base's "
                   "(--merge), as stored (a full/partial model), as trained (a peft folder)")
    p.add_argument("--base", metavar="NAME_OR_DIR", help="the base to name in adapter_config.json and the card "
                   "(e.g. a hub id) and, with --merge, to load (a local folder); its fingerprint must match the "
                   "recorded one. Default: the base it was trained on")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hugging Face model repo "
                   "(huggingface_hub; needs HF_TOKEN or `hf auth login`, and HF_HUB_OFFLINE unset)")
    p.add_argument("--json", action="store_true", help="the result (files, dtype, base, hub URL) as one JSON line")
    p.set_defaults(fn=cmd_export)
