"""The report: every claim's confirmed / not confirmed / not tested cases, and its tables as literal text."""
import numpy as np
import pandas as pd
import pytest

from saif_utils.stages.report import ablation_table, claims_table, steering_table


def _row(task, layer, k, alpha, position, objective, split="val", method="saif", strict=None):
    """A sweep row whose selection objective (strict + loose, degenerate responses failing) is `objective`."""
    half = objective / 2
    strict = half if strict is None else strict
    return {"task": task, "method": method, "layer": layer, "k": k, "alpha": alpha, "position": position,
            "split": split, "n": 16, "strict_acc": strict, "strict_ci_low": 0.0, "strict_ci_high": 1.0,
            "loose_acc": half, "loose_ci_low": 0.0, "loose_ci_high": 1.0, "checker_strict_acc": 0.75,
            "checker_strict_ci_low": 0.5, "checker_strict_ci_high": 1.0, "degenerate_rate": 0.0,
            "degenerate_ci_low": 0.0, "degenerate_ci_high": 0.0}


def _staged(task, best_layer, best_k, post, pre, layers=(10, 29), ks=(5, 15, 30), k_start=15):
    """Val rows of a staged search that ends at (best_layer, α = 0.5, best_k): layer × α at k_start (post), then k at
    that layer and α, then pre at the chosen configuration. `post` (> 0.25) and `pre` are the objectives there."""
    def objective(layer, k, alpha):
        if (layer, alpha) != (best_layer, 0.5):
            return 0.2
        return post if k == best_k else 0.25 if k == k_start else 0.1

    rows = [_row(task, layer, k_start, alpha, "post", objective(layer, k_start, alpha))
            for layer in layers for alpha in (0.3, 0.5)]
    rows += [_row(task, best_layer, k, 0.5, "post", objective(best_layer, k, 0.5)) for k in ks if k != k_start]
    return rows + [_row(task, best_layer, best_k, 0.5, "pre", pre)]


def _results(choices, strict):
    """Test rows of SAIF at each task's chosen configuration."""
    return pd.DataFrame([_row(t, layer, k, 0.5, pos, 0.0, split="test", strict=strict[t])
                         for t, (layer, k, pos) in choices.items()])


def _claims(sweep_rows, results):
    table = claims_table(results, pd.DataFrame(sweep_rows), [10, 29], 15).set_index("paper's claim")
    return table["status"].to_dict(), table["measured here"].to_dict()


ACC, LAYER, K, POST, SIZES = ("SAIF steering reaches > 30 % strict accuracy", "The final layer steers best",
                              "An optimum near ~15 latents", "Post-instruction extraction steers better than pre",
                              "The method holds across SAE sizes")
RECOVERED, CALIBRATED, PLUS_PROMPT, LATENTS, OUTPUT, DECOMPOSITION = (
    "SAIF recovers most of what prompting gains (share ≥ 0.75, CI low ≥ 0.5)",
    "Precisely calibrated weights matter (SAIF calibrated beats SAIF, same layer, k, α)",
    "SAIF + prompt beats prompting",
    "SAE latents beat activation differences (the SAIF variant chosen on val beats diff-in-means)",
    "Latents selected by their effect on the output steer better than latents selected by activation (saif_output "
    "beats saif)",
    "k SAE latents carry the diff-in-means direction (SAIF's k latents hold ≥ 50 % of its squared norm)")
UNTESTED = "not tested on this profile"
PAIRED_UNTESTED = {claim: UNTESTED for claim in (RECOVERED, CALIBRATED, PLUS_PROMPT, LATENTS, OUTPUT, DECOMPOSITION)}


def test_every_claim_confirmed():
    rows = _staged("a", 29, 15, post=0.9, pre=0.4) + _staged("b", 29, 15, post=0.8, pre=0.5)
    status, measured = _claims(rows, _results({"a": (29, 15, "post"), "b": (29, 15, "post")}, {"a": 0.4, "b": 0.2}))
    assert status == {ACC: "confirmed", LAYER: "confirmed", K: "confirmed", POST: "confirmed", SIZES: UNTESTED,
                      **PAIRED_UNTESTED}
    assert measured[ACC].startswith("1 of 2 tasks above 0.30 — a 0.40 [0.00, 1.00] (n=16)")
    assert measured[LAYER].endswith("{'a': 29, 'b': 29}; final SAE layer 29")
    assert measured[K].endswith("{'a': 15, 'b': 15}; median 15")
    assert measured[POST].endswith("a 0.90 vs 0.40; b 0.80 vs 0.50")


def test_every_claim_not_confirmed():
    rows = _staged("a", 10, 5, post=0.3, pre=0.6) + _staged("b", 10, 5, post=0.4, pre=0.7)
    status, measured = _claims(rows, _results({"a": (10, 5, "pre"), "b": (10, 5, "pre")}, {"a": 0.1, "b": 0.3}))
    assert status == {ACC: "not confirmed", LAYER: "not confirmed", K: "not confirmed", POST: "not confirmed",
                      SIZES: UNTESTED, **PAIRED_UNTESTED}
    assert measured[K].endswith("{'a': 5, 'b': 5}; median 5")
    assert measured[POST].endswith("a 0.30 vs 0.60; b 0.40 vs 0.70")


def test_claims_not_tested_without_the_rows_they_need():
    one_layer = [_row("a", 29, 15, 0.5, "post", 0.5)]
    status, measured = _claims(one_layer, _results({"a": (29, 15, "post")}, {"a": 0.5}))
    assert status[LAYER] == status[K] == status[POST] == "not tested on this profile"
    assert measured[LAYER] == "fewer than two layers swept" and measured[K] == "k was not swept"
    assert measured[POST] == "no pre-position condition evaluated"
    prompting_only = pd.DataFrame([_row("a", None, None, None, None, 0.0, split="test", method="prompting")])
    status, measured = _claims(one_layer, prompting_only)
    assert status[ACC] == "not tested on this profile" and measured[ACC] == "no SAIF test rows"


def test_post_vs_pre_is_judged_at_the_chosen_configuration_of_a_grid_search():
    # A grid sweep: the first pre row is at layer 10, where pre wins; SAIF chose layer 29, where post wins.
    rows = []
    for layer, (post, pre) in {10: (0.2, 0.6), 29: (0.9, 0.3)}.items():
        rows += [_row("a", layer, 15, 0.5, "post", post), _row("a", layer, 15, 0.5, "pre", pre)]
    status, measured = _claims(rows, _results({"a": (29, 15, "post")}, {"a": 0.5}))
    assert status[POST] == "confirmed" and measured[POST].endswith("a 0.90 vs 0.30")


def test_steering_and_ablation_tables_as_literal_markdown():
    results = pd.DataFrame([
        _row("json", 10, 5, 0.3, "post", 0.0, split="test", strict=0.4) | {"degenerate_rate": 0.25, "degenerate_ci_high": 0.5},
        _row("json", None, None, None, None, 0.0, split="test", method="prompting", strict=0.125),
        _row("json", 15, None, 0.5, "pre", 0.0, split="test", method="diff_in_means", strict=0.0),
    ])
    results.loc[0, ["strict_vs_prompting", "strict_vs_prompting_ci_low", "strict_vs_prompting_ci_high"]] = (
        0.275, 0.05, 0.5)
    results.loc[0, ["loose_recovered", "loose_recovered_ci_low", "loose_recovered_ci_high"]] = (1.5, 0.4, np.inf)
    assert steering_table(results).splitlines()[2:] == [
        "| json | prompting | — | 16 | 0.12 [0.00, 1.00] | 0.00 [0.00, 1.00] | 0.75 [0.50, 1.00] | 0.00 [0.00, 0.00] "
        "| — | — | — | — |",
        "| json | saif | L10, 5, 0.3, post | 16 | 0.40 [0.00, 1.00] | 0.00 [0.00, 1.00] | 0.75 [0.50, 1.00] "
        "| 0.25 [0.00, 0.50] | 0.28 [0.05, 0.50] | — | — | 1.50 [0.40, ∞] |",
        "| json | diff_in_means | L15, —, 0.5, pre | 16 | 0.00 [0.00, 1.00] | 0.00 [0.00, 1.00] | 0.75 [0.50, 1.00] "
        "| 0.00 [0.00, 0.00] | — | — | — | — |",
    ]
    ablation = pd.DataFrame([{"task": "summarize", "layer": 15, "condition": "selected", "n": 45, "strict_acc": 0.18,
                              "strict_ci_low": 0.07, "strict_ci_high": 0.29, "loose_acc": 0.2, "loose_ci_low": 0.1,
                              "loose_ci_high": 0.3, "logprob_drop": 0.3204, "logprob_drop_ci_low": 0.279,
                              "logprob_drop_ci_high": 0.3721}])
    assert ablation_table(ablation).splitlines() == [
        "| task | layer | ablated | n | strict [95 % CI] | loose [95 % CI] | log-prob drop [95 % CI] |",
        "|---|---|---|---|---|---|---|",
        "| summarize | 15 | selected | 45 | 0.18 [0.07, 0.29] | 0.20 [0.10, 0.30] | 0.320 [0.279, 0.372] |",
    ]


def _family(diff_low: dict[str, float], baseline: float = 0.1) -> pd.DataFrame:
    """Test rows of one SAE family: SAIF with the given lower bounds of its paired CI against no instruction, and the
    no-instruction baseline."""
    rows = [_row(t, 10, 15, 0.5, "post", 0.0, split="test", strict=baseline + low + 0.1)
            | {"strict_vs_no_instruction": low + 0.1, "strict_vs_no_instruction_ci_low": low,
               "strict_vs_no_instruction_ci_high": low + 0.2} for t, low in diff_low.items()]
    rows += [_row(t, None, None, None, None, 0.0, split="test", method="no_instruction", strict=baseline)
             for t in diff_low]
    return pd.DataFrame(rows)


def test_sae_sizes_claim_needs_saif_above_baseline_in_every_family():
    rows = _staged("a", 29, 15, post=0.9, pre=0.4)
    results = _results({"a": (29, 15, "post")}, {"a": 0.4})

    def judged(families):
        table = claims_table(results, pd.DataFrame(rows), [10, 29], 15, families).set_index("paper's claim")
        return table.loc[SIZES, "status"], table.loc[SIZES, "measured here"]

    both = {"8x": _family({"a": 0.2, "b": -0.05}), "4x": _family({"a": 0.1, "b": 0.2})}
    status, measured = judged(both)
    assert status == "confirmed" and "8x: beats no instruction on 1/2" in measured and "4x: beats no instruction on 2/2" in measured
    assert "a 0.30 [0.20, 0.40]" in measured, "the evidence is the paired difference"
    status, _ = judged({"8x": _family({"a": 0.2, "b": -0.05}), "4x": _family({"a": -0.05, "b": -0.02})})
    assert status == "not confirmed", "the 4x family never beats the baseline"
    assert judged({"8x": both["8x"]})[0] == UNTESTED
    unpaired = both["4x"].drop(columns=["strict_vs_no_instruction"])
    status, measured = judged({"8x": both["8x"], "4x": unpaired})
    assert status == UNTESTED and "['4x'] has no paired columns" in measured


@pytest.mark.parametrize("claim", [ACC, LAYER, K, POST, SIZES, RECOVERED, CALIBRATED, PLUS_PROMPT, LATENTS, OUTPUT,
                                   DECOMPOSITION])
def test_claims_table_lists_each_claim_once(claim):
    rows = _staged("a", 29, 15, post=0.9, pre=0.4)
    table = claims_table(_results({"a": (29, 15, "post")}, {"a": 0.4}), pd.DataFrame(rows), [10, 29], 15)
    assert table["paper's claim"].tolist().count(claim) == 1


def _paired(task, method, diff, low, high, baseline, **extra):
    """A test row of `method` whose strict paired difference to `baseline` is `diff` [low, high]."""
    name = f"strict_vs_{baseline}"
    return _row(task, 10, 5, 0.5, "post", 0.0, split="test", method=method) | {
        name: diff, f"{name}_ci_low": low, f"{name}_ci_high": high} | extra


def test_paired_claims_read_beats_ties_loses_from_the_paired_ci():
    rows = _staged("a", 29, 15, post=0.9, pre=0.4)
    results = pd.DataFrame([_paired("a", "saif_plus_prompt", 0.2, 0.05, 0.35, "prompting"),
                            _paired("b", "saif_plus_prompt", 0.1, -0.02, 0.2, "prompting"),
                            _paired("c", "saif_plus_prompt", -0.2, -0.3, -0.1, "prompting")])
    status, measured = _claims(rows, results)
    assert status[PLUS_PROMPT] == "not confirmed", "beats on 1 of 3 tasks is not half"
    assert measured[PLUS_PROMPT].startswith("strict saif_plus_prompt − prompting, paired over test passages: beats on "
                                            "1, ties on 1, loses on 1 of 3 tasks — a 0.20 [0.05, 0.35] (beats, n=16)")
    results.loc[1, "strict_vs_prompting_ci_low"] = 0.01
    assert _claims(rows, results)[0][PLUS_PROMPT] == "confirmed"


def test_recovered_claim_needs_the_share_and_its_lower_bound():
    rows = _staged("a", 29, 15, post=0.9, pre=0.4)

    def saif(task, strict, loose):
        row = _row(task, 10, 5, 0.5, "post", 0.0, split="test")
        for score, (share, low, high) in (("strict", strict), ("loose", loose)):
            row |= {f"{score}_recovered": share, f"{score}_recovered_ci_low": low, f"{score}_recovered_ci_high": high}
        return row

    nan3 = (np.nan,) * 3
    results = pd.DataFrame([saif("a", (0.8, 0.55, 1.1), (0.7, 0.4, 1.0)), saif("b", (0.9, 0.45, np.inf), nan3),
                            saif("c", nan3, nan3)])
    status, measured = _claims(rows, results)
    assert status[RECOVERED] == "confirmed", "met on a (strict) of the two defined tasks"
    assert measured[RECOVERED] == (
        "met on 1 of 2 tasks where prompting beats no instruction (paired, n per task in results.csv) — a strict 0.80 "
        "[0.55, 1.10], loose 0.70 [0.40, 1.00] (met on strict); b strict 0.90 [0.45, ∞]; c undefined (prompting does "
        "not beat no instruction)")
    results.loc[0, "strict_recovered_ci_low"] = 0.49
    assert _claims(rows, results)[0][RECOVERED] == "not confirmed"


def test_the_variant_chosen_on_val_is_compared_with_diff_in_means():
    # Task a: saif_output has the better val objective at its reported configuration; task b: saif.
    val = [_row("a", 10, 5, 0.5, "post", 0.6), _row("a", 10, 5, 0.5, "post", 0.9, method="saif_output"),
           _row("a", 10, 15, 0.5, "post", 1.5, method="saif_output"),  # not the reported k
           _row("b", 10, 5, 0.5, "post", 0.8), _row("b", 10, 5, 0.5, "post", 0.2, method="saif_output")]
    results = pd.DataFrame([_paired("a", "saif", -0.2, -0.3, -0.1, "diff_in_means"),
                            _paired("a", "saif_output", 0.2, 0.1, 0.3, "diff_in_means"),
                            _paired("b", "saif", 0.1, -0.1, 0.3, "diff_in_means"),
                            _paired("b", "saif_output", 0.3, 0.2, 0.4, "diff_in_means")])
    from saif_utils.stages.report import chosen_variants

    assert chosen_variants(results, pd.DataFrame(val)) == {"a": "saif_output", "b": "saif"}
    status, measured = _claims(val, results)
    assert status[LATENTS] == "confirmed", "beats on a, ties on b"
    assert measured[LATENTS].endswith("a (saif_output) 0.20 [0.10, 0.30] (beats, n=16); b (saif) 0.10 [-0.10, 0.30] "
                                      "(ties, n=16)")


def test_decomposition_claim_reads_the_span_of_saifs_own_k():
    def rows(task, saif_share, best_share, k=15):
        keys = {"task": task, "layer": 20, "position": "post", "alpha": 0.5, "cosine_saif_dim": 0.3, "saif_k": k}
        return [keys | {"span": "diff_in_means", "k": np.nan, "norm_share": 1.0},
                keys | {"span": "saif", "k": k, "norm_share": saif_share},
                keys | {"span": "best", "k": k, "norm_share": best_share},
                keys | {"span": "best", "k": 60, "norm_share": 0.9}]

    table = pd.DataFrame(rows("a", 0.55, 0.7) + rows("b", 0.2, 0.6, k=5))
    claims = claims_table(pd.DataFrame([_row("a", 10, 5, 0.5, "post", 0.0, split="test")]), pd.DataFrame(
        _staged("a", 29, 15, post=0.9, pre=0.4)), [10, 29], 15, decomposition=table).set_index("paper's claim")
    assert claims.loc[DECOMPOSITION, "status"] == "confirmed"
    assert claims.loc[DECOMPOSITION, "measured here"].endswith(
        "met on 1 of 2 tasks — a (L20): SAIF's 15 latents carry 55%, the best 15 70%, the best 60 90%; cos(SAIF, "
        "diff-in-means) 0.30; b (L20): SAIF's 5 latents carry 20%, the best 5 60%, the best 60 90%; cos(SAIF, "
        "diff-in-means) 0.30")
    table.loc[table["task"] == "a", "norm_share"] = 0.4
    assert claims_table(pd.DataFrame([_row("a", 10, 5, 0.5, "post", 0.0, split="test")]), pd.DataFrame(
        _staged("a", 29, 15, post=0.9, pre=0.4)), [10, 29], 15, decomposition=table).set_index(
        "paper's claim").loc[DECOMPOSITION, "status"] == "not confirmed"
