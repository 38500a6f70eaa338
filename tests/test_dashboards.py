"""Latent dashboards: the cards hold the right contexts and histogram, the pages are safe self-contained HTML, the tiny
run writes one per task and the report links them; Neuronpedia URLs come from sae-lens's registry (offline)."""
import re

import numpy as np
import pytest

from saif_utils.dashboards import DashboardConfig, held_out_budget, latent_cards, render_page, task_layers
from saif_utils.profiles import PROFILES
from saif_utils.saes import neuronpedia_ids


def test_cards_pick_each_texts_peak_and_count_what_fired():
    token_ids = [[0, 1, 2, 3, 4, 5], [0, 6, 7, 8], [0, 9, 10]]  # first token skipped → 5 + 3 + 2 rows
    acts = np.zeros((10, 2), dtype=np.float32)
    acts[[1, 3], 0] = [2.0, 5.0]   # text 0: peak at row 3 (token 4)
    acts[6, 0] = 7.0               # text 1: row 6 (token 7) — the strongest text comes first
    acts[9, 1] = 1.5               # latent 1 fires once, in text 2
    def span_text(ids):
        return [f"<t{t}>" for t in ids]

    cards = latent_cards(acts, token_ids, 1, [11, 22], span_text, DashboardConfig(n_contexts=5, radius=2, n_bins=4))
    first = cards[11]
    assert [c["max"] for c in first["contexts"]] == [7.0, 5.0], "one context per text, strongest first, none silent"
    peak = [t for t in first["contexts"][1]["tokens"] if t["peak"]]
    assert peak == [{"text": "<t4>", "act": 5.0, "peak": True}]
    assert [t["text"] for t in first["contexts"][1]["tokens"]] == ["<t2>", "<t3>", "<t4>", "<t5>"], "2 before, 1 after"
    assert sum(first["hist_counts"]) == 3 and first["freq"] == pytest.approx(0.3)
    assert cards[22]["freq"] == pytest.approx(0.1) and len(cards[22]["contexts"]) == 1


def test_a_page_escapes_tokens_and_needs_no_network():
    card = {"rank": 1, "latent": 7, "positions": "post", "weight": 0.5, "consistency": 0.9, "freq": 0.01, "scale": 2.0,
            "top_tokens": "Fr | <script>", "bottom_tokens": "x", "url": "https://www.neuronpedia.org/g/6-x/7",
            "hist_counts": [3, 1], "hist_edges": [0.0, 1.0, 2.0], "breakdown": [
                {"language": "fr", "kind": "paraphrase", "n_pairs": 12, "consistency": 0.75, "freq_pos": 0.8}],
            "contexts": [{"max": 2.0, "tokens": [{"text": "<img src=x>", "act": 2.0, "peak": True}]}]}
    page = render_page("Latent dashboards — t", "intro", [{"layer": 6, "cards": [card]}], 1000)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;img src=x&gt;" in page
    assert not re.search(r"<(script|link|img)\b", page), "self-contained: no script, stylesheet or image fetch"
    assert 'id="layer-6"' in page and 'href="https://www.neuronpedia.org/g/6-x/7"' in page
    assert "rgba(224,123,0,1.00)" in page and page.count("<rect") == 2


def test_each_card_holds_its_own_latents_breakdown_by_language_and_kind():
    """A card's table aggregates the breakdown rows of its layer and latent only (pairs: first; consistency and firing:
    mean over the rows of a language and kind), in language then kind order; a latent without rows gets none."""
    import pandas as pd

    selected = pd.DataFrame({"layer": [6, 6, 6, 9], "latent": [7, 7, 3, 7], "rank": [2, 1, 3, 1],
                             "position": ["pre", "post", "post", "post"], "weight": [0.5, 0.5, 0.2, 0.9],
                             "consistency": [0.8, 0.8, 0.6, 0.7]})
    breakdown = pd.DataFrame({"layer": [6, 6, 6, 6, 9], "latent": [7, 7, 7, 4, 7],
                              "language": ["fr", "en", "fr", "en", "en"],
                              "kind": ["paraphrase", "paraphrase", "paraphrase", "paraphrase", "translation"],
                              "n_pairs": [12, 5, 12, 9, 4], "consistency": [0.5, 0.9, 1.0, 0.1, 0.2],
                              "freq_pos": [0.25, 0.6, 0.75, 0.3, 0.4]})
    proximity = pd.DataFrame({"layer": [6, 9], "latent": [7, 7], "control": [False, False],
                              "top_tokens": ["a", "b"], "bottom_tokens": ["c", "d"]})
    card = {"contexts": [], "freq": 0.0, "hist_counts": [], "hist_edges": []}
    layers = task_layers(selected, proximity, breakdown, {6: {7: card, 3: card}, 9: {7: card}}, {})
    by_latent = {(layer["layer"], c["latent"]): c for layer in layers for c in layer["cards"]}
    assert by_latent[(6, 7)]["breakdown"] == [
        {"language": "en", "kind": "paraphrase", "n_pairs": 5, "consistency": 0.9, "freq_pos": 0.6},
        {"language": "fr", "kind": "paraphrase", "n_pairs": 12, "consistency": 0.75, "freq_pos": 0.5}]
    assert by_latent[(9, 7)]["breakdown"] == [
        {"language": "en", "kind": "translation", "n_pairs": 4, "consistency": 0.2, "freq_pos": 0.4}]
    assert by_latent[(6, 3)]["breakdown"] == []
    assert [c["latent"] for c in layers[0]["cards"]] == [7, 3] and by_latent[(6, 7)]["positions"] == "post and pre"


def test_held_out_budget_keeps_whole_texts():
    assert held_out_budget([[1] * 5, [2] * 5, [3] * 5], 11) == [[1] * 5, [2] * 5]
    assert held_out_budget([[1] * 50], 11) == [[1] * 50], "at least one text"


def test_neuronpedia_ids_come_from_the_sae_lens_registry_for_released_saes():
    expected = {"gemma-2-2b": "gemma-2-2b/{layer}-gemmascope-res-16k", "gemma-2-9b": "gemma-2-9b/{layer}-gemmascope-res-16k",
                "llama-3.1-8b": "llama3.1-8b/{layer}-llamascope-res-32k"}
    for name, template in expected.items():
        profile = PROFILES[name]
        assert neuronpedia_ids(profile) == {layer: template.format(layer=layer) for layer in profile.sae_layers}
    assert neuronpedia_ids(PROFILES["default"]) == {}, "our own SAEs have no Neuronpedia pages"


def test_split_characters_show_whole(tiny_model):
    """Byte-level tokens that each hold part of a character: decoded one by one they read "�"; as a stream, the token
    that completes the character carries it and the text joins back to the original."""
    from saif_utils.models import span_token_texts, token_texts

    tok = tiny_model.tokenizer
    text = "Café 🐝 naïve — 東京"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in "".join(token_texts(tok, ids).values()), "the case this guards against: split characters"
    texts = span_token_texts(tok, ids)
    assert len(texts) == len(ids) and "".join(texts) == text and "\ufffd" not in "".join(texts)
