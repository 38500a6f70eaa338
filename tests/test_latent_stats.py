import numpy as np
import pandas as pd
import pytest
import torch

from saif_utils.latent_stats import PairSet, build_pairs, jaccard, latent_stats, rank_latents, robustness
from saif_utils.stages.discovery import DiscoveryConfig


def test_latent_stats_on_a_hand_built_case():
    # latent 0: fires on every positive, never on negatives → consistency 1, large effect
    # latent 1: fires equally on both → consistency 0 (negative not far below), mean_diff 0
    # latent 2: fires on half of the positives only
    pos = torch.tensor([[2.0, 1.0, 1.0], [2.0, 1.0, 0.0], [2.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0, 0.0]] * 4)
    stats = latent_stats(pos, neg, fire_threshold=0.0, negative_ratio=0.25)
    np.testing.assert_allclose(stats["freq_pos"], [1, 1, 0.5])
    np.testing.assert_allclose(stats["freq_neg"], [0, 1, 0])
    np.testing.assert_allclose(stats["mean_diff"], [2, 0, 0.5])
    np.testing.assert_allclose(stats["consistency"], [1, 0, 0.5])
    assert stats["score"][0] > stats["score"][2] > stats["score"][1] == 0
    assert list(rank_latents(stats["score"], stats["effect_size"])) == [0, 2, 1]
    # equal scores (tanh saturated) are ordered by effect size, then by index
    assert list(rank_latents(np.array([0.5, 0.5, 0.5, 0.9]), np.array([4.0, 9.0, 4.0, 1.0]))) == [3, 1, 0, 2]


def test_negative_ratio_defines_far_less():
    pos, neg = torch.tensor([[1.0]]), torch.tensor([[0.2]])
    assert latent_stats(pos, neg, negative_ratio=0.25)["consistency"][0] == 1
    assert latent_stats(pos, neg, negative_ratio=0.1)["consistency"][0] == 0


def test_jaccard():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([1], [1]) == 1.0
    assert np.isnan(jaccard([], []))


def _toy_prompts():
    rows = []
    for p in ("a", "b"):
        rows.append({"prompt_id": f"{p}|-|none", "passage_id": p, "task": None, "position": "none", "label": "negative",
                     "variant_id": None, "language": None, "kind": None})
        for task, v in (("translate_fr", "fr1"), ("translate_es", "es1")):
            rows.append({"prompt_id": f"{p}|{v}|post", "passage_id": p, "task": task, "position": "post",
                         "label": "positive", "variant_id": v, "language": "en", "kind": "paraphrase"})
    return pd.DataFrame(rows)


def test_build_pairs_aligns_positives_with_their_passage_negative_and_siblings():
    prompts = _toy_prompts()
    # rows: a-neg, a-fr, a-es, b-neg, b-fr, b-es ; one latent whose value is the row number
    acts = torch.arange(6, dtype=torch.float32)[:, None]
    content = build_pairs(prompts, acts, "translate_fr", "post", "content")
    assert content.pos[:, 0].tolist() == [1, 4] and content.neg[:, 0].tolist() == [0, 3]
    sibling = build_pairs(prompts, acts, "translate_fr", "post", "sibling", ["translate_es"])
    assert sibling.neg[:, 0].tolist() == [2, 5], "sibling negatives take the max over content and sibling prompts"
    with pytest.raises(ValueError, match="needs sibling tasks"):
        build_pairs(prompts, acts, "translate_fr", "post", "sibling", [])
    with pytest.raises(ValueError, match="no prompts for task='summarize'"):
        build_pairs(prompts, acts, "summarize", "post", "content")


def test_robustness_recovers_a_planted_latent_set():
    gen = torch.Generator().manual_seed(0)
    n_passages, n_variants, d = 10, 6, 200
    planted = [3, 17, 42, 99, 150]
    neg = torch.rand(n_passages * n_variants, d, generator=gen) * 0.1
    pos = neg + torch.rand(n_passages * n_variants, d, generator=gen) * 0.02
    pos[:, planted] += 2.0
    meta = pd.DataFrame({"passage_id": np.repeat([f"p{i}" for i in range(n_passages)], n_variants),
                         "variant_id": np.tile([f"v{j}" for j in range(n_variants)], n_passages),
                         "language": np.tile(["en", "en", "en", "fr", "de", "zh"], n_passages),
                         "kind": np.tile(["paraphrase"] * 3 + ["translation"] * 3, n_passages)})
    cfg = DiscoveryConfig(jaccard_k=5, n_bootstrap=20)
    rows = {r["metric"]: r for r in robustness(PairSet(pos, neg, meta), cfg)}
    assert rows["bootstrap_jaccard"]["value"] == 1.0
    assert rows["paraphrase_vs_translation_jaccard"]["value"] == 1.0


def test_bootstrap_by_passage_weights_equals_explicit_resampling():
    from saif_utils.latent_stats import bootstrap_top_latents, top_latents

    gen = torch.Generator().manual_seed(1)
    n_passages, n_variants, d = 6, 5, 64
    neg = torch.rand(n_passages * n_variants, d, generator=gen)
    pos = neg + torch.randn(n_passages * n_variants, d, generator=gen) * 0.5
    meta = pd.DataFrame({"passage_id": np.repeat([f"p{i}" for i in range(n_passages)], n_variants)})
    pairs, cfg = PairSet(pos, neg, meta), DiscoveryConfig(jaccard_k=8)
    draws = np.random.default_rng(0).choice(n_passages, size=(5, n_passages), replace=True)
    fast = bootstrap_top_latents(pairs, cfg, 8, draws)
    passages = meta["passage_id"].to_numpy()
    for draw, top in zip(draws, fast):
        rows = np.concatenate([np.flatnonzero(passages == f"p{p}") for p in draw])
        explicit = top_latents(PairSet(pos[rows], neg[rows], meta.iloc[rows]), cfg, 8)
        assert set(top) == set(explicit)


def test_diff_in_means_points_from_the_negatives_to_the_positives():
    from saif_utils.selection import DirectionKey, diff_in_means

    prompts = pd.DataFrame({
        "prompt_id": ["p1-neg", "p2-neg", "p1-a", "p2-a", "p1-b", "p2-b"],
        "passage_id": ["p1", "p2", "p1", "p2", "p1", "p2"],
        "label": ["negative", "negative", "positive", "positive", "positive", "positive"],
        "task": [None, None, "summarize", "summarize", "summarize", "summarize"],
        "position": [None, None, "post", "post", "post", "post"],
        "variant_id": [None, None, "a", "a", "b", "b"], "language": "en", "kind": "paraphrase"})
    # passages differ (their negatives), the instruction adds +[1, 2] on top of each passage's own residual
    negatives = torch.tensor([[0.0, 0.0], [4.0, -2.0]])
    resid = torch.cat([negatives, negatives + torch.tensor([1.0, 2.0]), negatives + torch.tensor([3.0, 2.0])])
    directions = diff_in_means(prompts, {7: resid}, ["post"])
    assert list(directions) == [DirectionKey("summarize", 7, "post")]
    assert torch.equal(directions[DirectionKey("summarize", 7, "post")], torch.tensor([2.0, 2.0]))


def _last_bits(values: np.ndarray, seed: int) -> np.ndarray:
    """`values` perturbed by 1e-6 relative, as float32 sums come out of another CPU's kernels."""
    noise = np.random.default_rng(seed).standard_normal(values.shape)
    return (values * (1 + 1e-6 * noise)).astype(values.dtype)


def test_a_selection_survives_last_bit_differences_in_the_scores():
    # scores of 3000 latents whose top ones come in near-ties, as float32 statistics of many latents do
    gen = np.random.default_rng(0)
    score = (gen.beta(0.5, 4.0, 3000) * (gen.random(3000) < 0.5)).astype(np.float32)
    top = np.argsort(-score)[:60]
    score[top[1::2]] = score[top[0::2]] * np.float32(1 - 2e-6)
    effect = gen.gamma(2.0, 2.0, 3000).astype(np.float32)
    effect[top[1::2]] = effect[top[0::2]] * np.float32(1 + 2e-6)
    chosen = rank_latents(score, effect)[:30]
    for trial in range(20):
        nudged = rank_latents(_last_bits(score, trial), _last_bits(effect, 100 + trial))
        assert nudged[:30].tolist() == chosen.tolist(), f"perturbation {trial}"


def test_a_mass_matched_draw_survives_last_bit_differences_in_the_masses():
    from saif_utils.vectors import mass_matched_latents

    # masses like an SAE layer's: 60 % dead latents, the rest log-normal over four decades, with near-ties (on the
    # default profile's layer 20 the closest two masses differ by 2.6e-6 relative)
    gen = np.random.default_rng(0)
    mass = np.where(gen.random(4608) < 0.6, 0.0, np.exp(gen.normal(-2.0, 1.5, 4608))).astype(np.float32)
    alive = np.flatnonzero(mass > 0)
    twins = gen.choice(alive, size=(300, 2), replace=False)
    mass[twins[:, 1]] = mass[twins[:, 0]] * np.float32(1 + 2e-6)
    selected = gen.choice(np.flatnonzero(mass > 0.05), size=15, replace=False)
    draws = [mass_matched_latents(mass, selected, seed) for seed in range(3)]
    for trial in range(20):
        nudged = _last_bits(mass, trial)
        for seed, draw in enumerate(draws):
            assert np.array_equal(mass_matched_latents(nudged, selected, seed), draw), f"perturbation {trial}, seed {seed}"
