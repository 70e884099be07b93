"""Which adapter answers a request: the one owner of "client name -> exact registry version -> engine id".

A request names the base model (its id, ``base``, or nothing on the OpenAI routes), a registry
adapter (``name``, ``name@3``, ``name@canary``, or ``<base>:name@3``), or nothing on a task route,
where the serve config's adapter for the task answers (``tasks:``), and on /v1/translate the one
trained for the requested language pair. :class:`AdapterCatalog` decides, refuses what this server
must not serve (not LoRA, another base, DoRA, another task, a rank above ``max_lora_rank``: 422;
unknown: 404; an unreadable registry: 409), and gives the answer as a :class:`Pick`: the engine's
model id, the ``name@version`` responses report, and the task as the adapter was trained (its labels,
languages, instruction: the prompt contract; and its answer budget, ``max_new_tokens``).

Each request resolves its name again, so a promotion is what the next request answers with, and a
request in flight keeps the version it was given. What that costs is one storage call per request
on a warm catalog (``_versions.VersionCache``: versions and everything derived from them are kept
for good, the aliases file is read per request); the async methods do it on a worker thread, never
on the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorafleet.registry import Entry, Registry, RegistryError, validate_name
from lorafleet.serving._versions import VersionCache
from lorafleet.serving.compat import ADAPTER_CONFIG, adapter_config, base_refusal, dora_refusal
from lorafleet.serving.errors import ServingError, clip

__all__ = ["AdapterCatalog", "BASE_ALIASES", "MAX_REF_CHARS", "Pick", "is_lora"]

# Adapter values meaning "no adapter, the bare base model" on the task endpoints.
BASE_ALIASES = ("base",)
MAX_REF_CHARS = 256  # longer than any "<base>:<name>@<version>" the registry can hold
TRANSLATION = "translation"


@dataclass(frozen=True)
class Pick:
    """The answer to "which adapter answers".

    Attributes:
        model_id: What the engine is asked for: the base model's id, or ``<base>:<name>@<version>``.
        ref: ``name@version``, or ``base``: what responses and metrics report.
        entry: The registry version (None for the base model).
        spec: The task as the adapter was trained (a ``lorafleet.tasks.Task``); None when no task was asked.
    """

    model_id: str
    ref: str
    entry: Entry | None
    spec: Any = None


@dataclass(frozen=True)
class _Facts:
    """What a version's files say about serving it here (computed once per version)."""

    lora: bool
    refusal: str | None
    rank: int | None


class AdapterCatalog:
    """The registry's LoRA adapters as this server may serve them (read-only).

    Args:
        registry_root: ``<home>/registry`` (or ``s3://...``).
        base_model_id: The served base model's id (the multiplexed ids' prefix).
        max_lora_rank: The engine's ``max_lora_rank``; higher-rank adapters are refused up front.
        base_path: The served base model's folder; adapters whose recorded base fingerprint differs
            from its ``base_fingerprint`` are refused. None skips that check.
    """

    def __init__(self, registry_root: str | Path, base_model_id: str, max_lora_rank: int, *,
                 base_path: str | Path | None = None) -> None:
        from lorafleet.base_model import base_fingerprint

        self.registry = Registry(registry_root)
        self.versions = VersionCache(self.registry)
        self.base_model_id = base_model_id
        self.max_lora_rank = max_lora_rank
        self.base_path = str(base_path) if base_path is not None else base_model_id
        self.base_fingerprint = base_fingerprint(base_path) if base_path is not None else None

    # ----- the async front: storage reads on a worker thread ----------------------------------

    async def pick(self, task: str, adapter: str | None, *, default: str | None = None,
                   source_lang: str | None = None, target_lang: str | None = None) -> Pick:
        """The adapter that answers a task request: ``adapter``, else ``default`` (see :meth:`pick_now`)."""
        return await asyncio.to_thread(self.pick_now, task, adapter, default=default, source_lang=source_lang,
                                       target_lang=target_lang)

    async def pick_for_languages(self, source_lang: str | None, target_lang: str | None,
                                 default: str | None) -> Pick | None:
        """The translation adapter for a language pair (see :meth:`pick_for_languages_now`)."""
        return await asyncio.to_thread(self.pick_for_languages_now, source_lang, target_lang, default)

    async def pick_model(self, model: str | None) -> Pick:
        """What an OpenAI route's ``model`` names (see :meth:`route`)."""
        return await asyncio.to_thread(self.route, model)

    async def names(self) -> list[str]:
        """:meth:`available`, read on a worker thread."""
        return await asyncio.to_thread(self.available)

    # ----- deciding --------------------------------------------------------------------------

    def pick_now(self, task: str, adapter: str | None, *, default: str | None = None,
                 source_lang: str | None = None, target_lang: str | None = None) -> Pick:
        """The adapter that answers a ``task`` request, with the task as it was trained.

        Args:
            task: The endpoint's task (classification, summarization, translation, qa).
            adapter: The request's adapter reference; ``base`` for the bare base model.
            default: The serve config's adapter for the task (``tasks:``), used without ``adapter``.
            source_lang, target_lang: Translation: the requested pair, which the adapter must fit.

        Raises:
            ServingError: 422 (no adapter given or configured, a language pair the adapter was not
                trained for, or any refusal of :meth:`resolve`), 404, 409 (see :meth:`route`).
        """
        if not adapter and default is None:
            available = self.available()
            raise ServingError(
                422, f"no adapter is configured for task {task!r}: pass 'adapter' (one of {available}, or "
                f"'base') or map the task in the serve config", param="adapter", available=available,
            )
        choice = self.route(adapter or default, task)
        spec = self.task_spec(choice.entry, task)
        if task == TRANSLATION and not _pair_fits((spec.source_lang, spec.target_lang), source_lang, target_lang):
            pairs = _pair_names(self._translation_pairs())
            raise ServingError(
                422, f"{clip(source_lang or spec.source_lang)} -> {clip(target_lang or spec.target_lang)} is not "
                f"supported by {choice.ref}, which translates {spec.source_lang} -> {spec.target_lang}; pairs "
                f"available: {pairs or 'none'}", param="target_lang" if target_lang else "source_lang",
                available=pairs,
            )
        return replace(choice, spec=spec)

    def pick_for_languages_now(self, source_lang: str | None, target_lang: str | None,
                               default: str | None) -> Pick | None:
        """The serve config's translation adapter (``default``) if its pair fits, else the first one
        trained for the pair; None when none fits but there is a default (which then answers, or is
        refused, as usual).

        Raises:
            ServingError: 422 when no adapter fits and none is configured (it names the pairs available).
        """
        if default is not None:
            choice = self.route(default, TRANSLATION)
            spec = self.task_spec(choice.entry, TRANSLATION)
            if _pair_fits((spec.source_lang, spec.target_lang), source_lang, target_lang):
                return replace(choice, spec=spec)
        pairs = self._translation_pairs()
        for pair, names in pairs.items():
            if _pair_fits(pair, source_lang, target_lang):
                return self.pick_now(TRANSLATION, names[0], source_lang=source_lang, target_lang=target_lang)
        if default is None:
            raise ServingError(422, f"no translation adapter was trained for {clip(source_lang or '*')} -> "
                               f"{clip(target_lang or '*')}; pairs available: {_pair_names(pairs) or 'none'}",
                               param="target_lang", available=_pair_names(pairs))
        return None

    def route(self, model: str | None, task: str | None = None) -> Pick:
        """A client's model/adapter name -> the :class:`Pick` that serves it (``spec`` unset).

        Raises:
            ServingError: 422 (a name over ``MAX_REF_CHARS``, or a refusal of :meth:`resolve`), 404,
                409 when the registry itself cannot be read for the name (e.g. a corrupt aliases.json).
        """
        if model is None or model == self.base_model_id or model in BASE_ALIASES:
            return Pick(self.base_model_id, "base", None)
        if len(model) > MAX_REF_CHARS:
            raise ServingError(422, f"adapter name {clip(model)} is {len(model)} characters; names are at most "
                               f"{MAX_REF_CHARS}", param="adapter")
        try:
            entry = self.resolve(model, task=task)
        except RegistryError as exc:
            # The client's request was fine, the server's state is not; the message says the fix.
            raise ServingError(409, f"adapter {clip(model)} cannot be served: {exc}", type="registry_error",
                               param="adapter") from None
        return Pick(self.model_id(entry), entry.ref, entry)

    def resolve(self, ref: str, *, task: str | None = None, fresh_aliases: bool = False) -> Entry:
        """The exact registry version ``ref`` names, checked to be a servable LoRA adapter.

        Args:
            ref: ``name``, ``name@version``, ``name@alias``, or ``<base_model_id>:name[@version]``.
            task: If given, the adapter's registered task must match.
            fresh_aliases: Re-read the aliases of an exact version too (its ``aliases`` tags).

        Raises:
            ServingError: 404 (unknown name/version; lists what exists), 422 (malformed reference,
                not a LoRA adapter, trained on another base, DoRA, wrong task, rank above the
                engine's max_lora_rank).
        """
        prefix = f"{self.base_model_id}:"
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
        name = ref.partition("@")[0]
        try:
            validate_name(name)
        except RegistryError as exc:
            raise ServingError(422, str(exc), param="adapter", available=self.available()) from None
        try:
            entry = self.versions.lookup(ref, fresh_aliases=fresh_aliases)
        except RegistryError as exc:
            available = self.available()
            if name not in self.registry.names():
                raise ServingError(
                    404, f"adapter {name!r} not found; available: {available} (or the base model "
                    f"{self.base_model_id!r})", type="not_found_error", param="adapter", available=available,
                ) from None
            raise ServingError(404, str(exc), type="not_found_error", param="adapter",
                               available=[e.ref for e in self.registry.list(name)]) from None
        self._check(entry, task)
        return entry

    def _check(self, entry: Entry, task: str | None) -> None:
        """Refuse (422) what this server must not serve, in the order the messages were always given."""
        facts = self._facts(entry)
        if not facts.lora:
            raise ServingError(
                422, f"{entry.ref} is a '{entry.meta.method or 'unknown'}' artifact, not a LoRA "
                "adapter; only LoRA adapters are served on this base model", param="adapter",
                available=self.available(),
            )
        if facts.refusal is not None:
            raise ServingError(422, facts.refusal, param="adapter", available=self.available())
        registered_task = entry.meta.task
        if task is not None and registered_task and registered_task != task:
            same = [name for name, live in self._servable().items() if live.meta.task == task]
            raise ServingError(
                422, f"{entry.ref} was trained for task {registered_task!r}, not {task!r}; use one of {same}",
                param="adapter", available=same,
            )
        if facts.rank is not None and facts.rank > self.max_lora_rank:
            raise ServingError(
                422, f"{entry.ref} has LoRA rank {facts.rank}, above the server's max_lora_rank="
                f"{self.max_lora_rank}; raise max_lora_rank in the serve config", param="adapter",
            )

    # ----- what exists -----------------------------------------------------------------------

    def available(self) -> list[str]:
        """Names of the LoRA adapters this server can serve (their live versions are what 'name' means)."""
        return list(self._servable())

    def _servable(self) -> dict[str, Entry]:
        """name -> live entry of every servable LoRA adapter, by name (one storage call per name, warm)."""
        out = {}
        for name in self.versions.names():
            try:
                entry = self.versions.lookup(name)
            except RegistryError:  # hidden or odd folders, names without versions, unreadable aliases
                continue
            facts = self._facts(entry)
            if facts.lora and facts.refusal is None:
                out[name] = entry
        return out

    def _translation_pairs(self) -> dict[tuple[str, str], list[str]]:
        """(source, target) -> the translation adapters trained for it (live versions)."""
        pairs: dict[tuple[str, str], list[str]] = {}
        for name, entry in self._servable().items():
            if entry.meta.task == TRANSLATION:
                spec = self.task_spec(entry, TRANSLATION)
                pairs.setdefault((spec.source_lang, spec.target_lang), []).append(name)
        return pairs

    def refusal(self, entry: Entry) -> str | None:
        """Why this server must not load ``entry`` (another base, DoRA), or None."""
        return base_refusal(entry, self.base_fingerprint, self.base_path) or dora_refusal(entry)

    def model_id(self, entry: Entry) -> str:
        """The multiplexed model id of an exact version: ``<base>:<name>@<version>``."""
        return f"{self.base_model_id}:{entry.ref}"

    # ----- what a version says (kept for good with the version) ---------------------------------

    def _facts(self, entry: Entry) -> _Facts:
        memo = self.versions.memo(entry)
        facts = memo.get(_Facts)
        if facts is None:
            lora = is_lora(entry)
            rank = adapter_config(entry).get("r") if lora else None
            facts = memo[_Facts] = _Facts(lora=lora, refusal=self.refusal(entry) if lora else None,
                                          rank=int(rank) if isinstance(rank, int) else None)
        return facts

    def task_spec(self, entry: Entry | None, task: str) -> Any:
        """The task as the adapter was trained: its config's task settings and its metadata's labels,
        languages and answer budget (the base model, or an adapter without them, gets the task's defaults)."""
        if entry is None:
            return _default_task(task)
        memo = self.versions.memo(entry)
        spec = memo.get(("spec", task))
        if spec is None:
            spec = memo[("spec", task)] = _trained_task(entry, task)
        return spec


def is_lora(entry: Entry) -> bool:
    """Whether a registry entry is a peft LoRA adapter (vLLM can only multiplex those)."""
    return entry.meta.method in (None, "lora") and entry.meta.lists_file(ADAPTER_CONFIG)


def _default_task(name: str) -> Any:
    from lorafleet.tasks import get_task

    return get_task(name)


def _trained_task(entry: Entry, name: str) -> Any:
    from lorafleet.config import TaskConfig
    from lorafleet.tasks import GENERATING_TASKS, get_task

    meta = entry.meta
    raw = meta.task_config
    spec = get_task(TaskConfig.model_validate(raw)) if raw and raw.get("name") == name else get_task(name)
    if meta.labels and name == "classification":
        spec = replace(spec, labels=tuple(meta.labels))
    if name == TRANSLATION and meta.source_lang and meta.target_lang:
        spec = replace(spec, source_lang=meta.source_lang, target_lang=meta.target_lang)
    if meta.max_new_tokens and name in GENERATING_TASKS:  # the budget it was evaluated with: the default answer length
        spec = replace(spec, max_new_tokens=meta.max_new_tokens)
    return spec


def _lang_matches(name: str, requested: str | None) -> bool:
    """A requested language matches a trained one by name or 2-letter prefix, case-insensitively."""
    if requested is None:
        return True
    want, have = requested.strip().lower(), name.strip().lower()
    return want in (have, have[:2])


def _pair_fits(pair: tuple[str, str], source: str | None, target: str | None) -> bool:
    return _lang_matches(pair[0], source) and _lang_matches(pair[1], target)


def _pair_names(pairs: dict[tuple[str, str], list[str]]) -> list[str]:
    return [f"{src} -> {tgt} ({', '.join(names)})" for (src, tgt), names in pairs.items()]
