"""The task endpoints' logic: request model in, response model out, the engine behind an interface.

:class:`TaskHandlers` is prompt -> engine -> answer: the catalog (:mod:`lorafleet.serving.catalog`)
says which adapter answers (the request's, else the serve config's default; for /v1/translate the
one trained for the language pair) and the task as it was trained, the handler builds the
training/eval prompt contract (``lorafleet.data.prompt_ids`` / ``target_ids``) and asks an
:class:`~lorafleet.serving.engine.Engine` for greedy completions or label log-probs. It knows
nothing of Ray Serve or FastAPI: the router (``router.py``) calls it, and tests drive it with a
fake engine.

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
from lorafleet.serving.catalog import Pick
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
        self.engine = engine
        self.settings = settings
        self.models = models
        self.catalog = models.catalog
        self.tokenizer = tokenizer
        self.metrics = metrics or RequestMetrics()
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
            choice = await self.catalog.pick("classification", body.adapter,
                                             default=self.settings.tasks.get("classification"))
            model_id, ref = choice.model_id, choice.ref
            info["adapter"] = ref
            spec = choice.spec  # the adapter's labels, in its prompt's order
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
            self._fit(prompt, max(len(x) for x in label_ids) + 1)  # prompt + label, then 1 generated token
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
        chosen = None
        if body.adapter is None and (body.source_lang or body.target_lang):
            chosen = await self.catalog.pick_for_languages(body.source_lang, body.target_lang,
                                                           self.settings.tasks.get("translation"))
        text, ref = await self._generate("translation", {"text": body.text}, body.adapter, body.max_tokens,
                                         "translate", langs=(body.source_lang, body.target_lang), chosen=chosen)
        return TranslateResponse(translation=text, adapter=ref)

    async def qa(self, body: QARequest) -> QAResponse:
        """Extractive QA over the given context, or over the top-k passages of a RAG collection."""
        sources: list[Source] = []
        context = body.context or ""
        check_text(body.question, self.settings.limits, "question")
        check_text(context, self.settings.limits, "context")
        chosen = None
        if body.collection:
            passages = await self.collections.search(body.collection, body.question,
                                                     body.top_k or self.settings.rag.top_k)
            # The answering adapter's prompt and answer budget decide how many passages fit.
            chosen = await self.catalog.pick("qa", body.adapter, default=self.settings.tasks.get("qa"))
            passages = await self._off_loop(self._fit_passages, chosen.spec, body.question, context, passages,
                                            self._budget(chosen.spec, body.max_tokens))
            sources = [Source(id=p.id, score=p.score, text=p.text) for p in passages]
            context = " ".join([context, *[p.text for p in passages]]).strip()
        answer, ref = await self._generate("qa", {"question": body.question, "context": context}, body.adapter,
                                           body.max_tokens, "qa", chosen=chosen)
        return QAResponse(answer=answer, sources=sources, adapter=ref)

    # ----- shared steps ----------------------------------------------------------------------

    async def _generate(self, task: str, row: dict[str, Any], adapter: str | None, max_tokens: int | None,
                        endpoint: str, langs: tuple[str | None, str | None] = (None, None),
                        chosen: Pick | None = None) -> tuple[str, str]:
        from lorafleet.data import prompt_ids

        with self.metrics.timed(endpoint) as info:
            if task != "qa":  # qa's question and context were checked before retrieval added passages
                check_text(row["text"], self.settings.limits)
            choice = chosen or await self.catalog.pick(task, adapter, default=self.settings.tasks.get(task),
                                                       source_lang=langs[0], target_lang=langs[1])
            info["adapter"] = choice.ref
            spec = choice.spec
            budget = self._budget(spec, max_tokens)
            prompt = await self._off_loop(prompt_ids, self.tokenizer, spec.instruction(row))
            self._fit(prompt, budget)
            response = await self.engine.complete(choice.model_id, [prompt], max_tokens=budget)
            return response.choices[0].text.strip(), choice.ref

    def _budget(self, spec: Any, max_tokens: int | None) -> int:
        """The answer's token budget: the request's, else the adapter's (``spec.max_new_tokens``: its
        registry metadata's, or the task's default), capped at the server's ``max_tokens``."""
        return cap_tokens(max_tokens or spec.max_new_tokens, self.settings.max_tokens)

    def _fit(self, prompt: list[int], extra: int, field: str = "text") -> None:
        limit = self.settings.max_model_len
        if len(prompt) + extra > limit:
            raise ServingError(
                413, f"{field} is {len(prompt)} prompt tokens (+{extra} for the answer); the model's "
                f"limit is {limit} tokens in all: shorten the {field}", type="request_too_large", param=field,
            )

    async def _label_logprobs(self, model_id: str, prompt: list[int], label_ids: list[list[int]]) -> list[float]:
        """log P(label tokens | prompt) per label.

        The serving engines score next to vLLM (``label_scores.py``): the prompt once, each label's
        tokens as prompt log-probs over the shared prefix cache, about one prompt pass in all. An
        engine with ``complete`` only (tests' fakes) gets the older form, one batched request in
        which each distinct prefix ``prompt + label[:k]`` generates one token and returns the raw
        logprobs of the label tokens (``logprob_token_ids``): one prompt pass per label token. So
        does an adapter with ``lm_head`` weights, for which the engine answers None.
        """
        scorer = getattr(self.engine, "label_logprobs", None)
        if scorer is not None:
            scores = await scorer(model_id, prompt, label_ids)
            if scores is not None:
                return scores
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

    def _fit_passages(self, spec: Any, question: str, context: str, passages: list, budget: int) -> list:
        """Drop the lowest-ranked passages until the prompt (``spec``'s) plus ``budget`` answer tokens
        fits the context window."""
        from lorafleet.data import prompt_ids

        keep = list(passages)
        while len(keep) > 1:
            row = {"question": question, "context": " ".join([context, *[p.text for p in keep]])}
            tokens = len(prompt_ids(self.tokenizer, spec.instruction(row))) + budget
            if tokens <= self.settings.max_model_len:
                break
            keep.pop()
        return keep

