"""English -> Zilan, a rule-based toy language.

Zilan has a ~60-word dictionary and three rules, small enough for a tiny model to learn:
  1. adjectives follow their noun ("the big dog" -> "ka dom bir"),
  2. plural nouns take the suffix "-ek" ("dogs" -> "domek"),
  3. verbs do not inflect ("sees" / "see" -> "vasi"; "is" / "are" -> "lo").
Sentences are lowercase and end with a period.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from lorafleet.tasks.base import Task, check_lengths, normalize_text

__all__ = ["TranslationTask", "TASK", "DICTIONARY", "PLURAL_SUFFIX", "translate"]

NOUNS: dict[str, str] = {
    "dog": "dom", "cat": "fel", "bird": "piru", "horse": "kavo", "farmer": "gruni",
    "teacher": "sado", "house": "hulo", "tree": "talu", "river": "riso", "book": "bevo",
    "apple": "pomi", "ball": "bolu", "boat": "nabo", "car": "kiro", "flower": "flori",
    "girl": "tesa", "boy": "toma", "king": "regu", "friend": "amik", "stone": "pedra",
}
ADJECTIVES: dict[str, str] = {
    "big": "bir", "small": "ti", "red": "rua", "blue": "sela", "green": "vir", "old": "oka",
    "young": "jova", "happy": "jolu", "sad": "muro", "fast": "zipa", "slow": "lenu",
    "tall": "gano", "hungry": "kumo", "quiet": "sulu", "bright": "lumi",
}
# English third-person singular form, plural form -> Zilan (invariant).
VERBS: dict[tuple[str, str], str] = {
    ("sees", "see"): "vasi", ("likes", "like"): "lami", ("finds", "find"): "tuvi",
    ("eats", "eat"): "mangi", ("carries", "carry"): "poti", ("follows", "follow"): "sigi",
    ("helps", "help"): "jeti", ("watches", "watch"): "okani", ("holds", "hold"): "teni",
    ("pushes", "push"): "druki", ("visits", "visit"): "bezo", ("paints", "paint"): "kolo",
    ("chases", "chase"): "hasi", ("loves", "love"): "kori", ("builds", "build"): "fabi",
}
FUNCTION_WORDS: dict[str, str] = {
    "the": "ka", "a": "na", "some": "su", "is": "lo", "are": "lo", "in": "ina", "near": "peno",
}
PLURAL_SUFFIX = "ek"
DICTIONARY: dict[str, str] = {
    **NOUNS, **ADJECTIVES, **FUNCTION_WORDS,
    **{form: zl for forms, zl in VERBS.items() for form in forms},
}
_PLURALS = {noun: noun + "s" for noun in NOUNS}


@dataclass(frozen=True)
class TranslationTask(Task):
    """`source_lang` -> `target_lang` (synthetic: English -> Zilan); metrics: bleu, chrf (sacrebleu, 0..1).

    The languages come from `task.source_lang` / `task.target_lang`; they name the prompt's lines
    and are recorded in the registry metadata, where /v1/translate finds each adapter's pair.
    """

    source_lang: str = "English"
    target_lang: str = "Zilan"
    instruction_line: str = "Translate {source} to {target}."

    def instruction(self, row: dict[str, Any]) -> str:
        """Prompt with the source sentence; ends with "<target_lang>:\\n"."""
        line = self.instruction_line.replace("{source}", self.source_lang).replace("{target}", self.target_lang)
        return f"{line}\n{self.source_lang}: {normalize_text(row['text'])}\n{self.target_lang}:\n"

    def target(self, row: dict[str, Any]) -> str:
        """The Zilan sentence."""
        return normalize_text(row["translation"])

    def score(self, predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
        """Corpus BLEU and chrF, divided by 100."""
        import sacrebleu  # here, not at the top: `import lorafleet.tasks` stays free of the metric stacks

        check_lengths(predictions, rows)
        if not rows:
            return {"bleu": 0.0, "chrf": 0.0}
        hyps = [normalize_text(p) for p in predictions]
        refs = [[self.target(row) for row in rows]]
        # min(): sacrebleu's float arithmetic can land a hair above 100 for perfect output.
        return {
            "bleu": min(1.0, sacrebleu.corpus_bleu(hyps, refs).score / 100),
            "chrf": min(1.0, sacrebleu.corpus_chrf(hyps, refs).score / 100),
        }

    def make_row(self, rng: random.Random) -> dict[str, Any]:
        """A random sentence of one of three shapes, with its rule-based translation."""
        en, zl = _sentence(rng)
        return {"text": " ".join(en) + ".", "translation": " ".join(zl) + "."}


def _noun_phrase(rng: random.Random) -> tuple[list[str], list[str], bool]:
    """A random noun phrase: English words, Zilan words, and whether it is plural."""
    plural = rng.random() < 0.35
    det = rng.choice(["the", "some"] if plural else ["the", "a"])
    noun = rng.choice(list(NOUNS))
    adj = rng.choice(list(ADJECTIVES)) if rng.random() < 0.5 else None
    en = [det] + ([adj] if adj else []) + [_PLURALS[noun] if plural else noun]
    zl = [FUNCTION_WORDS[det], NOUNS[noun] + (PLURAL_SUFFIX if plural else "")]
    zl += [ADJECTIVES[adj]] if adj else []  # rule 1: the adjective follows its noun
    return en, zl, plural


def _sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """English and Zilan words of one sentence: "NP is ADJ", "NP V NP" or "NP V NP in NP"."""
    en, zl, plural = _noun_phrase(rng)
    shape = rng.random()
    if shape < 0.25:
        adj = rng.choice(list(ADJECTIVES))
        copula = "are" if plural else "is"
        return en + [copula, adj], zl + [FUNCTION_WORDS[copula], ADJECTIVES[adj]]
    forms, zl_verb = rng.choice(list(VERBS.items()))
    obj_en, obj_zl, _ = _noun_phrase(rng)
    en += [forms[1] if plural else forms[0]] + obj_en
    zl += [zl_verb] + obj_zl
    if shape > 0.7:
        prep = rng.choice(["in", "near"])
        place_en, place_zl, _ = _noun_phrase(rng)
        en += [prep] + place_en
        zl += [FUNCTION_WORDS[prep]] + place_zl
    return en, zl


def translate(english: str) -> str:
    """Rule-based translation of a sentence from this module's grammar (for tests and demos)."""
    tokens = normalize_text(english).lower().rstrip(".").split()
    singular = {plural: noun for noun, plural in _PLURALS.items()}
    out: list[str] = []
    pending_adj: str | None = None
    for token in tokens:
        if token in ADJECTIVES and out and out[-1] in {"lo"}:
            out.append(ADJECTIVES[token])  # predicate adjective: "is happy" -> "lo jolu"
        elif token in ADJECTIVES:
            pending_adj = ADJECTIVES[token]  # attributive: moves after its noun
        elif token in NOUNS or token in singular:
            zl = NOUNS[token] if token in NOUNS else NOUNS[singular[token]] + PLURAL_SUFFIX
            out.append(zl)
            if pending_adj:
                out.append(pending_adj)
                pending_adj = None
        elif token in DICTIONARY:
            out.append(DICTIONARY[token])
        else:
            raise ValueError(f"word {token!r} is not in the Zilan dictionary")
    return " ".join(out) + "."


TASK = TranslationTask(
    name="translation",
    fields=("text", "translation"),
    primary_metric="chrf",
    mode="max",
    max_new_tokens=48,
)
