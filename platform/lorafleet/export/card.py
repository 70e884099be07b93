"""The model card (README.md) of an export, written from the registry version's typed metadata.

Hugging Face reads the YAML front matter (``library_name``, ``base_model``, ``tags``); people read the
rest: what the artifact is, its base and the base's fingerprint, task, data, method, metrics, how to
load it, and the resolved training config it was made with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from lorafleet.base_model import FINGERPRINT_COVERS
from lorafleet.registry import Entry

__all__ = ["CardFacts", "model_card"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class CardFacts:
    """What the card says about this export beyond the registry metadata.

    Attributes:
        kind: ``adapter`` (a peft folder), ``merged`` (adapter merged into the base) or ``model`` (a full or
            partial fine-tune, already a whole model).
        base: The base as the export names it (``base_model_name_or_path``; a hub id or a folder).
        fingerprint_check: One sentence on whether the base at ``base`` was checked against the recorded
            fingerprint.
        dtype: The weights' dtype in the export (None: the adapter's tensors as trained).
    """

    kind: str
    base: str
    fingerprint_check: str
    dtype: str | None


def model_card(entry: Entry, facts: CardFacts) -> str:
    """README.md text for an export of ``entry``."""
    meta = entry.meta
    config = meta.config or {}
    lines = [_front_matter(entry, facts), f"# {entry.name} (lorafleet {entry.ref})", "", _summary(entry, facts), ""]
    lines += ["## Base model", "", f"- base: `{facts.base}`"]
    if meta.base_model and meta.base_model != facts.base:
        lines.append(f"- trained on: `{meta.base_model}`")
    lines += [f"- lorafleet fingerprint of the base: `{meta.base_fingerprint or 'not recorded'}` ({FINGERPRINT_COVERS})",
              f"- {facts.fingerprint_check}", ""]
    lines += ["## Task", "", f"- task: {meta.task or 'not recorded'}"]
    if meta.labels:
        lines.append(f"- labels (in the prompt's order): {', '.join(meta.labels)}")
    if meta.source_lang or meta.target_lang:
        lines.append(f"- languages: {meta.source_lang} -> {meta.target_lang}")
    if meta.max_new_tokens:
        lines.append(f"- answer budget it was evaluated with: {meta.max_new_tokens} new tokens")
    lines += ["- prompts: lorafleet's prompt contract for the task (`lorafleet.tasks`), the instruction line from "
              "the config's `task` section; the tokenizer's chat template when it has one", ""]
    lines += ["## Data", ""] + _section_lines(config.get("data")) + [""]
    lines += ["## Method", "", f"- method: {meta.method or 'not recorded'}"] + _section_lines(
        (config.get("method") or {}).get(meta.method or "") if isinstance(config.get("method"), dict) else None)
    for label, value in (("trainable parameters", meta.trainable_params), ("total parameters", meta.total_params),
                         ("optimizer steps", meta.steps), ("training wall time (s)", meta.wall_time_s)):
        if value is not None:
            lines.append(f"- {label}: {value:,}" if isinstance(value, int) else f"- {label}: {value:.1f}")
    lines += ["", "## Metrics", ""] + _metrics(meta.metrics) + [""]
    lines += ["## Use", "", _usage(entry, facts), ""]
    lines += ["## Provenance", "", f"- lorafleet registry: `{entry.ref}`, registered {meta.created or '?'}"]
    if meta.run:
        lines.append(f"- run: `{meta.run}`")
    if meta.sweep and meta.sweep.name:
        lines.append(f"- winner of sweep `{meta.sweep.name}` (trial {meta.sweep.trial_id}, "
                     f"{meta.sweep.metric} = {meta.sweep.value})")
    if config:
        lines += ["", "## Training config", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False, default_flow_style=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _front_matter(entry: Entry, facts: CardFacts) -> str:
    meta = entry.meta
    head: dict[str, Any] = {"library_name": "peft" if facts.kind == "adapter" else "transformers"}
    if _HUB_ID.match(facts.base):  # the Hub rejects a base_model that is not a model id (a local path)
        head["base_model"] = facts.base
    tags = ["lorafleet", meta.method or "", meta.task or "", "merged" if facts.kind == "merged" else ""]
    head["tags"] = [t for t in tags if t]
    head["pipeline_tag"] = "text-generation"
    return "---\n" + yaml.safe_dump(head, sort_keys=False).rstrip() + "\n---\n"


def _summary(entry: Entry, facts: CardFacts) -> str:
    what = {"adapter": "A peft LoRA adapter", "merged": "A LoRA adapter merged into its base model "
            "(peft `merge_and_unload`): a plain transformers model, no peft needed",
            "model": f"A whole model ({entry.meta.method} fine-tune of its base)"}[facts.kind]
    dtype = f", weights in {facts.dtype}" if facts.dtype else ""
    return (f"{what}{dtype}, trained with lorafleet for the task **{entry.meta.task or '?'}** on `{facts.base}`. "
            f"Exported with `{_command(entry, facts)}`.")


def _command(entry: Entry, facts: CardFacts) -> str:
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    merge = " --merge" if facts.kind == "merged" else ""
    dtype = f" --dtype {short.get(facts.dtype, facts.dtype)}" if facts.dtype else ""
    return f"lorafleet adapters export {entry.ref}{merge}{dtype}"


def _section_lines(section: Any) -> list[str]:
    if not isinstance(section, dict) or not section:
        return ["- not recorded"]
    return [f"- {key}: {value}" for key, value in section.items() if value not in (None, {}, [])]


def _metrics(metrics: dict[str, Any] | None) -> list[str]:
    rows = [(split, name, value) for split, scores in (metrics or {}).items() if isinstance(scores, dict)
            for name, value in scores.items()]
    if not rows:
        return ["Not recorded."]
    out = ["| split | metric | value |", "|---|---|---|"]
    for split, name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else value
        out.append(f"| {split} | {name} | {shown} |")
    return out


def _usage(entry: Entry, facts: CardFacts) -> str:
    if facts.kind == "adapter":
        return ("```python\nfrom peft import PeftModel\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({facts.base!r})\n"
                "model = PeftModel.from_pretrained(base, \"<this folder or repo>\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained({facts.base!r})\n```\n\n"
                "vLLM: `LLM(model=<base>, enable_lora=True)` and a `LoRARequest` naming this folder; lorafleet: "
                "`lorafleet serve` with the adapter registered.")
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo>\")\n"
            "tokenizer = AutoTokenizer.from_pretrained(\"<this folder or repo>\")\n```\n\n"
            "vLLM serves it as a plain model: `LLM(model=\"<this folder>\")`; in a lorafleet serve config, "
            "`base_model: <this folder>`.")
