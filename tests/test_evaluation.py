import pytest

from saif_utils.evaluation import (
    Verdict,
    check_bullet_list,
    check_json,
    check_keyword,
    check_summarize,
    check_translate_fr,
    check_uppercase,
    checker_for,
    sentences,
)
from saif_utils.language import is_french

FRENCH = [
    "Le chat dort sur le rebord chaud de la fenêtre.",
    "La bibliothèque sera fermée lundi pour des réparations.",
    "Les abeilles communiquent l'emplacement des fleurs grâce à une danse spéciale.",
    "Ma grand-mère fait du pain tous les dimanches matin. Toute la maison sent la croûte chaude.",
    "Le conseil municipal a approuvé une nouvelle piste cyclable le long de la rivière.",
    "Les volcans se forment là où la roche en fusion remonte à travers les fissures de la croûte terrestre.",
    "Notre équipe de football a gagné le match final par deux buts.",
    "Les panneaux solaires transforment la lumière du soleil en électricité.",
    "Il a plu pendant trois jours sans s'arrêter et la rivière a débordé.",
    "Les éléphants sont les plus grands animaux terrestres.",
    "Le musée a ouvert une nouvelle exposition sur l'Égypte ancienne.",
    "Un bon petit-déjeuner donne de l'énergie pour la matinée.",
    "Le train pour la montagne part à sept heures du matin.",
    "Elle a appris à jouer du piano quand elle avait six ans.",
    "Les tomates poussent mieux par temps chaud et en plein soleil.",
]
OTHER = [
    "The cat sleeps on the warm windowsill.",
    "The library will be closed on Monday for repairs.",
    "Honeybees communicate the location of flowers through a special dance.",
    "El gato duerme en el alféizar caliente de la ventana.",
    "La biblioteca estará cerrada el lunes por reparaciones.",
    "Die Katze schläft auf der warmen Fensterbank.",
    "Die Bibliothek ist am Montag wegen Reparaturen geschlossen.",
    "Il gatto dorme sul davanzale caldo della finestra.",
    "Our football team won the final match by two goals.",
    "Solar panels turn sunlight into electricity, and many families now install them.",
    "A gata dorme no parapeito quente da janela.",
    "De kat slaapt op de warme vensterbank.",
    "Elephants are the largest animals living on land.",
    "Los elefantes son los animales terrestres más grandes.",
    "Rain fell for three days without stopping.",
]
KEYWORD_CASES = [
    ("The ocean was calm this morning.", "ocean"), ("Oceans cover most of the planet.", "ocean"),
    ("We walked along the beach.", "ocean"), ("OCEAN waves crashed.", "ocean"), ("She loves music.", "music"),
    ("Musical notes filled the room.", "music"), ("The garden is full of roses.", "garden"),
    ("Gardens need water.", "garden"), ("He planted tomatoes.", "garden"), ("The concert was loud.", "music"),
    ("Music, art and dance.", "music"), ("Nothing here at all.", "garden"), ("The sea is blue.", "ocean"),
    ("I like the ocean's color.", "ocean"), ("The GARDEN party starts at noon.", "garden"),
]


def _ifeval(kind: str, **kwargs):
    """IFEval's reference checker (from if-verifiable), with langdetect seeded for determinism."""
    from if_verifiable.ifeval import instructions_registry
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0
    checker = instructions_registry.INSTRUCTION_DICT[kind]("ref")
    checker.build_description(**kwargs)
    return checker.check_following


def test_language_verdicts_agree_with_ifeval():
    reference = _ifeval("language:response_language", language="fr")
    texts = FRENCH + OTHER
    agree = [is_french(t) == reference(t) for t in texts]
    assert sum(agree) / len(agree) >= 0.95, [t for t, a in zip(texts, agree) if not a]
    assert all(is_french(t) for t in FRENCH) and not any(is_french(t) for t in OTHER)


def test_keyword_verdicts_agree_with_ifeval():
    agree = [check_keyword(text, word).loose == _ifeval("keywords:existence", keywords=[word])(text)
             for text, word in KEYWORD_CASES]
    assert sum(agree) / len(agree) >= 0.95


def test_translation_needs_real_french_and_fidelity():
    source = "The cat sleeps on the warm windowsill."
    assert check_translate_fr(FRENCH[0], source).strict
    assert all(check_translate_fr(text, source).loose for text in FRENCH)
    pseudo = "Céla La Célère, Le Célère La Célère de la fenêtre. Le chat célère."
    assert not check_translate_fr(pseudo, source).loose, "French-looking syllables are not French"
    off_topic = check_translate_fr(FRENCH[6], source)
    assert not off_topic.strict and off_topic.loose, "French but not a translation of the source"
    mixed = check_translate_fr(f"{FRENCH[0]} The weather is nice. {FRENCH[1]}", source)
    assert mixed.loose and not mixed.strict


def test_summary_uppercase_bullets_and_dispatch():
    source = ("Honeybees communicate the location of flowers through a special dance. "
              "The angle of the dance shows the direction of the food relative to the sun.")
    assert check_summarize("Bees dance to show where flowers are.", source).strict
    assert not check_summarize("Bees dance. They point to food.", source).strict
    assert not check_summarize("The stock market fell sharply today.", source).loose
    assert check_uppercase("HELLO WORLD!").strict and not check_uppercase("123").loose
    # loose needs ≥ 80 % of the letters uppercase: 4 of 5 passes, 3 of 5 and ordinary text do not
    assert check_uppercase("ABCDe") == Verdict(False, True) and check_uppercase("ABCde") == Verdict(False, False)
    assert not check_uppercase("The Cat Sleeps On The Warm Windowsill.").loose
    assert check_bullet_list("* a\n* b").strict and not check_bullet_list("- only one").loose
    assert checker_for("json")('```json\n{"a": 1}\n```', "src").strict
    for scalar in ("42", '"a string"', "true", "null", "```json\n3.5\n```"):  # valid JSON, but not an object or array
        assert not check_json(scalar).strict, scalar
    assert checker_for("keyword:ocean")("The ocean.", None).strict
    with pytest.raises(ValueError, match="task 'poetry' is not defined in the tasks file"):
        checker_for("poetry")


def test_keyword_strict_needs_a_response_about_its_passage():
    source = "Honeybees communicate the location of flowers through a special dance."
    on_topic = "The bees dance to tell each other where the flowers are, like waves on the ocean."
    off_topic = "The ocean is the largest body of salt water on Earth."
    assert checker_for("keyword:ocean")(on_topic, source) == Verdict(True, True)
    assert checker_for("keyword:ocean")(off_topic, source) == Verdict(False, False)
    assert checker_for("keyword:ocean")(off_topic, None) == Verdict(True, True), "no source: the word alone"


def test_sentences():
    assert sentences("One. Two!\nThree") == ["One.", "Two!", "Three"]


def test_docstring_examples_hold():
    import doctest

    import saif_utils.evaluation as evaluation

    result = doctest.testmod(evaluation)
    assert result.attempted >= 6 and result.failed == 0


def test_judge_fails_loops_that_a_checker_accepts():
    import pandas as pd

    from saif_utils.evaluation import judge

    source = "The sea was calm tonight and the boats stayed in the harbour."
    responses = ["The ocean is calm tonight, so the boats stay in the harbour.", "The boats stayed in the harbour on the calm ocean" + "-o" * 20,
                 "The ocean's ocean.\n\nThe ocean's ocean.\n\nThe ocean's ocean.\n\nThe ocean's ocean."]
    judged = judge(pd.DataFrame({"task": ["keyword:ocean"] * 3, "source": [source] * 3, "response": responses}))
    assert judged["checker_loose"].tolist() == [True, True, True]
    assert judged["degenerate"].tolist() == [False, True, True]
    assert judged["loose"].tolist() == [True, False, False] and judged["strict"].tolist()[1:] == [False, False]
    assert judged["degenerate_reasons"].iloc[0] == "" and "char_loop" in judged["degenerate_reasons"].iloc[1]


def test_degeneracy_signals_are_cached_per_text_and_read_back_equal(tmp_path, monkeypatch):
    from saif_utils.degeneracy import degeneracy_signals
    from saif_utils.evaluation import cached_degeneracy_signals

    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path))
    texts = ["ocean-ocean-ocean-ocean-ocean-ocean-ocean", FRENCH[3], "", "ocean-ocean-ocean-ocean-ocean-ocean-ocean",
             "The coffee cherry is the fruit of the coffee bean."]
    fresh = [degeneracy_signals(t) for t in texts]
    assert cached_degeneracy_signals(texts) == fresh
    entries = sorted((tmp_path / "degeneracy").glob("*.json"))
    assert len(entries) == 4, "one entry per distinct text"
    stamp = {p: p.stat().st_mtime_ns for p in entries}
    again = cached_degeneracy_signals(texts)
    assert again == fresh and [s.reasons for s in again] == [s.reasons for s in fresh]
    assert {p: p.stat().st_mtime_ns for p in entries} == stamp, "a warm read recomputes nothing"
