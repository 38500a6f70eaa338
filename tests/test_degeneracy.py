"""The degeneracy detector: the loops, floods and gibberish a reader rejects, and ordinary answers it must leave alone."""
import pytest

from saif_utils.degeneracy import (
    char_loop_share,
    compression_ratio,
    degeneracy_signals,
    digit_share,
    is_degenerate,
    line_repeat_share,
    span_repeat_share,
    top_word_share,
)
from saif_utils.language import dictionary_share, words

# Every example below is a response of this study, or has the shape of one.
DEGENERATE = {
    "char_loop": "The ocean's ocean-o-o-o-o-o-o-o-o-o-o-o-o-o-o-o-o-o-o-o-o",
    "hyphen_chain": "ocean-souls-souls-souls-souls-souls-souls-souls-souls-souls",
    "one_word": "ocean-ocean-ocean-ocean-ocean-ocean-ocean-ocean-ocean-ocean",
    "repeated_lines": "The ocean's ocean.\n\nThe ocean's ocean.\n\nThe ocean's ocean.\n\nThe ocean's ocean.",
    "syllables": "DUE MABNANANANANANANANA",
    "pseudo_french": "Céla La Célère, Le Célère La Célère, Le Célère de la Célère.",
    "flood": "ocean the ocean of ocean and ocean by ocean in ocean sea ocean",
    "gibberish": "Thrumble vasquet orindal presh, muntavo keltrish ambrovel sintaquor.",
    "restarted": "The new phone, which has a larger screen, will be in stores next month.\n\nThe new phone, which has a "
                 "larger screen, will be in stores next month.",
    "cycling_list": "1. Rome's Colosseum\n2. Hadrian's Wall\n3. Hadrian's Wall\n4. Hadrian's Wall\n5. Colosseum",
    "counting": "1\n2\n3\n4\n5\n\nThe 4-5-6-7-8-9-10-11-12-13-14-15-16-17",
    "function_word_flood": "1. A group of volunteers cleaned the beach on Saturday: 1. A group of volunteers: 2. A "
                           "group of: 3. A: A: A: A: A: A: A: A: A:",
    "empty": "",
}
COHERENT = [
    "The passage describes how honeybees tell each other where flowers are, by dancing in a figure of eight.",
    "Le chat dort sur le rebord chaud de la fenêtre. Il fait beau aujourd'hui.",
    "- Bees dance to share where flowers are\n- The angle shows the direction\n- The sun is the reference",
    '{"title": "Bees", "summary": "Honeybees dance to show where flowers are."}',
    "El gato duerme en la ventana caliente y sueña con peces.",
    "The library will be closed on Monday for repairs... It opens again on Tuesday at 9:00.",
    "Yes.",
    "猫在温暖的窗台上睡觉，它梦见了鱼。",
    # One-sentence summaries in which a function word takes 3 of 10 words.
    "The coffee cherry is the fruit of the coffee bean.",
    "The coffee bean is the seed of the coffee cherry.",
    "Silk is a product of a single species, a cocoon.",
]


@pytest.mark.parametrize("kind", sorted(DEGENERATE))
def test_detector_rejects_what_a_reader_rejects(kind):
    assert is_degenerate(DEGENERATE[kind]), degeneracy_signals(DEGENERATE[kind])


@pytest.mark.parametrize("text", COHERENT)
def test_detector_keeps_ordinary_answers(text):
    assert not is_degenerate(text), degeneracy_signals(text).reasons


def test_each_signal_measures_its_own_pattern():
    assert char_loop_share("ocean-" * 4) == 1.0 and char_loop_share("Wait... 1000 people came.") == 0
    assert compression_ratio("short") == 1.0 and compression_ratio("The ocean. " * 20) < 0.2
    assert char_loop_share("Je suis là, je suis là, je suis là.") > 0.6, "case ignored"
    assert char_loop_share("The new phone is out. The new phone is out. The") > 0.9, "a restarted sentence"
    assert span_repeat_share(words("a-b-c-d-e-f-a-b-c-d-e-f")) == 0.5 and span_repeat_share(words("one two three")) == 0
    assert line_repeat_share("1. x\n2. x\n3. x\n4. y") == 0.5 and line_repeat_share("x\nx") == 0
    assert digit_share("1.2.3.4") == 4 / 7 and digit_share("In 1999 it rained.") < 0.3
    assert top_word_share(words("ocean " * 10)) == 1.0 and top_word_share(words("one two")) == 0
    assert top_word_share(words("The coffee cherry is the fruit of the coffee bean.")) == 0.2, "'the' not counted"
    assert top_word_share(words("the " * 15)) == 1.0, "function words count in longer texts"
    assert dictionary_share(words("the cat sat on the warm mat"), ("en",)) == 1.0
    assert dictionary_share(words("Thrumble vasquet orindal presh"), ("en", "fr")) == 0.0


def test_dictionary_lookups_in_many_languages_keep_a_bounded_number_of_word_lists_loaded():
    """Steered gibberish is detected as dozens of languages; wordfreq would keep every list it loads (≈ 35–60 MB
    each), so the judge holds at most `MAX_WORDLISTS` of them, and a word's verdict does not depend on which are held."""
    from wordfreq import get_frequency_dict, zipf_frequency

    from saif_utils.language import MAX_WORDLISTS

    languages = ("de", "es", "it", "pt", "nl", "pl", "sv", "da")
    assert len(languages) > MAX_WORDLISTS
    # Words no earlier test looked up, so every language's list is consulted (the lookups themselves are memoised).
    shares = [dictionary_share(words(f"haus katze hund qqbounded{lang}"), ("en", "fr", lang)) for lang in languages]
    assert get_frequency_dict.cache_info().currsize <= MAX_WORDLISTS
    assert shares[0] == 0.75 and shares[-1] == 0.5, "German words are German, not Danish"
    assert zipf_frequency("katze", "de") >= 2.0 > zipf_frequency("katze", "da")


def test_reasons_name_every_crossed_threshold():
    signals = degeneracy_signals(DEGENERATE["repeated_lines"])
    assert {"char_loop", "line_repeat"} <= set(signals.reasons)
    assert degeneracy_signals(DEGENERATE["empty"]).reasons == ("empty",)


def test_docstring_examples_hold():
    import doctest

    import saif_utils.degeneracy as degeneracy
    import saif_utils.language as language

    results = [doctest.testmod(module) for module in (degeneracy, language)]
    assert all(r.attempted >= 1 and r.failed == 0 for r in results)
