"""Is a response language a reader would accept, or degenerate text — a loop, a token flood or gibberish?

Each signal is a number a reader can check by hand; `degeneracy_signals` measures them all and `is_degenerate`
applies the thresholds below. The thresholds were set on the development half of the human-read sample in
`data/labels/` and are reported on its held-out half (`tools/label_sample.py`, README "Verdicts").
"""
from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .language import detect_language, dictionary_share, words

COMPRESSION_MAX = 0.35
"""zlib-compressed size / raw size below which a text is a loop (fluent English of this length compresses to
0.55–0.9; texts shorter than `COMPRESSION_MIN_BYTES` are not judged by it)."""
COMPRESSION_MIN_BYTES = 80
CHAR_LOOP_MAX = 0.3
"""Share of characters (case ignored) inside a unit repeated back to back — ≥ 3 copies of any unit ('o-o-o-o',
'ocean-ocean-ocean', 'NANANA') or 2 copies of a unit of ≥ 8 characters (a restarted sentence) — from which a text is
a loop."""
CHAR_LOOP_MIN_SPAN = 8
"""Shortest repeated span that counts ('...' or '000' in ordinary text are not loops)."""
SPAN_REPEAT_MAX = 0.35
"""Share of words inside a word 6-gram that already occurred earlier in the text (words split at any non-letter, so
hyphen chains split) from which a text is a loop: a sentence restarted verbatim, a cycling list."""
SPAN_REPEAT_N = 6
LINE_REPEAT_MAX = 0.5
"""Share of non-empty lines that repeat an earlier line, list markers ignored (texts of ≥ 3 lines)."""
DIGIT_MAX = 0.3
"""Share of the non-space characters that are digits from which a text is a number flood ('1.1.1.2.3.4…',
'3-4-5-6-7-…'); dates and quantities in ordinary answers stay under 0.15."""
TOP_WORD_MAX = 0.3
"""Share of all words taken by the most frequent one (texts of ≥ `TOP_WORD_MIN_WORDS` words): a token flood."""
TOP_WORD_MIN_WORDS = 10
TOP_FUNCTION_WORD_MIN_WORDS = 15
"""A function word (`FUNCTION_WORDS`) counts as a flood only in texts of at least this many words: in a one-sentence
answer 'the' reaches 30 % in fluent text ('The coffee cherry is the fruit of the coffee bean.', 3 of 10 words), while
the floods of function words seen in this study ('A: A: A: …', 'The: 1. The: 2. …', 'la la la') run to 17 words and
more."""
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for by with from and or but as is are was were be it its this that these he she they we "
    "i you his her their our my your not no so if then than there here "
    "le la les l un une de des du d et en au aux à ce cette il elle ils elles on je tu nous vous que qu qui est sont "
    "ne pas se s sa son ses".split())
"""English and French articles, prepositions, conjunctions, pronouns and the commonest auxiliaries (as `words` splits
them: "l'eau" → 'l', 'eau')."""
REAL_WORD_MIN = 0.75
"""Share of words (≥ 2 letters) found in the word list of English, French or the text's detected language
(`language.dictionary_share`) below which a text is gibberish or pseudo-words (texts of ≥ 4 such words)."""

CHAR_LOOPS = (re.compile(r"(.{1,60}?)\1{2,}", re.DOTALL), re.compile(r"(.{8,60}?)\1", re.DOTALL))
LIST_MARKER = re.compile(r"^\s*(?:[-*•·‣◦]|\d+[.)])\s*")


@dataclass(frozen=True)
class DegeneracySignals:
    """The measured signals of one text, each with a threshold in this module."""

    n_words: int
    compression: float
    char_loop: float
    span_repeat: float
    line_repeat: float
    top_word: float
    digits: float
    real_words: float

    @property
    def degenerate(self) -> bool:
        """True when any signal crosses its threshold."""
        return bool(self.reasons)

    @property
    def reasons(self) -> tuple[str, ...]:
        """The names of the signals that crossed their thresholds."""
        crossed = {"empty": self.n_words == 0, "compression": self.compression < COMPRESSION_MAX,
                   "char_loop": self.char_loop >= CHAR_LOOP_MAX, "span_repeat": self.span_repeat >= SPAN_REPEAT_MAX,
                   "line_repeat": self.line_repeat >= LINE_REPEAT_MAX, "top_word": self.top_word >= TOP_WORD_MAX,
                   "digits": self.digits >= DIGIT_MAX, "real_words": self.real_words < REAL_WORD_MIN}
        return tuple(name for name, hit in crossed.items() if hit)


def compression_ratio(text: str) -> float:
    """zlib-compressed bytes / raw bytes (1.0 for texts too short to judge)."""
    raw = text.encode()
    return 1.0 if len(raw) < COMPRESSION_MIN_BYTES else len(zlib.compress(raw, 9)) / len(raw)


def char_loop_share(text: str) -> float:
    """Share of characters (case ignored) inside spans of ≥ `CHAR_LOOP_MIN_SPAN` characters made of one unit
    (≤ 60 characters) repeated back to back: ≥ 3 copies, or 2 copies of a unit of ≥ 8 characters.

    >>> round(char_loop_share("The ocean's ocean-o-o-o-o-o-o-o"), 2)
    0.45
    """
    if not text:
        return 0.0
    looped = np.zeros(len(text), dtype=bool)
    lowered = text.lower()
    for pattern in CHAR_LOOPS:
        for match in pattern.finditer(lowered):
            if match.end() - match.start() >= CHAR_LOOP_MIN_SPAN:
                looped[match.start():match.end()] = True
    return float(looped.mean())


def span_repeat_share(tokens: list[str], n: int = SPAN_REPEAT_N) -> float:
    """Share of words covered by a word n-gram that already occurred earlier (0 = none, → 1 = a loop)."""
    covered, seen = np.zeros(len(tokens), dtype=bool), set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            covered[i:i + n] = True
        seen.add(gram)
    return float(covered.mean()) if tokens else 0.0


def line_repeat_share(text: str) -> float:
    """Fraction of non-empty lines, list markers ('-', '*', '3.') removed, that repeat an earlier line (0 for fewer
    than three lines)."""
    lines = [LIST_MARKER.sub("", line).strip() for line in text.splitlines() if line.strip()]
    return 0.0 if len(lines) < 3 else 1 - len(set(lines)) / len(lines)


def digit_share(text: str) -> float:
    """Share of the non-space characters that are digits."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def top_word_share(tokens: list[str]) -> float:
    """Share of the most frequent word (0 for fewer than `TOP_WORD_MIN_WORDS` words); a function word is not counted
    in texts shorter than `TOP_FUNCTION_WORD_MIN_WORDS`."""
    if len(tokens) < TOP_WORD_MIN_WORDS:
        return 0.0
    counted = Counter(tokens if len(tokens) >= TOP_FUNCTION_WORD_MIN_WORDS
                      else [t for t in tokens if t not in FUNCTION_WORDS])
    return counted.most_common(1)[0][1] / len(tokens) if counted else 0.0


def degeneracy_signals(text: str) -> DegeneracySignals:
    """Every signal of one text (the text's own language, by fastText, joins English and French for the dictionary)."""
    tokens = words(text)
    languages = ("en", "fr") + ((detect_language(text)[0],) if tokens else ())
    return DegeneracySignals(n_words=len(tokens), compression=compression_ratio(text), char_loop=char_loop_share(text),
                             span_repeat=span_repeat_share(tokens), line_repeat=line_repeat_share(text),
                             top_word=top_word_share(tokens), digits=digit_share(text),
                             real_words=dictionary_share(tokens, languages))


def is_degenerate(text: str) -> bool:
    """True for an empty response or one whose signals cross a threshold."""
    return degeneracy_signals(text).degenerate

