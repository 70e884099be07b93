"""Request and response models of the task endpoints and /healthz.

The OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions) use Ray Serve
LLM's (= vLLM's) own protocol models; only lorafleet's task endpoints are defined here. The
OpenAI-shaped error body is in ``errors.py``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ClassifyRequest",
    "ClassifyResponse",
    "SummarizeRequest",
    "SummarizeResponse",
    "TranslateRequest",
    "TranslateResponse",
    "QARequest",
    "QAResponse",
    "Source",
    "HealthResponse",
]

_ADAPTER = Field(
    default=None,
    description="Registry adapter: 'name' (its live version) or 'name@version'. Default: the one the "
    "serve config maps to this task.",
    examples=["tickets-lora", "tickets-lora@2"],
)
_TEXT = Field(min_length=1, description="Input text (must fit the model's context with the answer).")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Request):
    """POST /v1/classify."""

    text: str = _TEXT
    adapter: str | None = _ADAPTER
    labels: list[str] | None = Field(
        default=None, min_length=1,
        description="Restrict the answer to these labels (a subset of the adapter's labels).",
    )


class ClassifyResponse(BaseModel):
    """The most probable label and the probability of each candidate label (they sum to 1)."""

    label: str
    scores: dict[str, float]
    adapter: str = Field(description="The adapter version that answered, 'name@version'.")


class SummarizeRequest(_Request):
    """POST /v1/summarize."""

    text: str = _TEXT
    adapter: str | None = _ADAPTER
    max_tokens: int | None = Field(default=None, ge=1, description="Generation budget (capped by the server).")


class SummarizeResponse(BaseModel):
    summary: str
    adapter: str


class TranslateRequest(_Request):
    """POST /v1/translate."""

    text: str = _TEXT
    adapter: str | None = _ADAPTER
    source_lang: str | None = Field(default=None, description="Source language; the task's is 'English'.")
    target_lang: str | None = Field(default=None, description="Target language; the task's is 'Zilan'.")
    max_tokens: int | None = Field(default=None, ge=1)


class TranslateResponse(BaseModel):
    translation: str
    adapter: str


class QARequest(_Request):
    """POST /v1/qa: answer from `context`, or from passages retrieved from `collection`."""

    question: str = Field(min_length=1)
    context: str | None = Field(default=None, description="Passage to answer from.")
    collection: str | None = Field(
        default=None, description="RAG collection built by `lorafleet rag index DIR --collection NAME`."
    )
    adapter: str | None = _ADAPTER
    top_k: int | None = Field(default=None, ge=1, le=20, description="Passages to retrieve (collection only).")
    max_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _needs_a_source(self) -> "QARequest":
        if not self.context and not self.collection:
            raise ValueError("give 'context' (a passage) or 'collection' (a RAG collection name)")
        return self


class Source(BaseModel):
    """A retrieved passage."""

    id: str = Field(description="'<file>#<chunk>' inside the collection.")
    score: float
    text: str


class QAResponse(BaseModel):
    answer: str
    sources: list[Source] = Field(default_factory=list)
    adapter: str


class HealthResponse(BaseModel):
    status: str
    model: str
