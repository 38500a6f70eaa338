"""The sweep protocol: search stages, the choice of configuration on val, and fail-fast validation."""
import pandas as pd
import pytest

from saif_utils.data import prompting_instructions
from saif_utils.methods import Condition
from saif_utils.stages.steering import SweepConfig, best_condition, search_plans, search_space


def test_staged_search_refines_layer_alpha_then_k_then_position():
    cfg = SweepConfig(k_grid=(1, 5), alpha_grid=(0.3, 0.5), k_start=5)
    stages = search_space(cfg, "json", "saif", (10, 20))
    assert [len(s) for s in stages] == [4, 2, 1]
    assert {(c.layer, c.alpha, c.k, c.position) for c in stages[0]} == {
        (10, 0.3, 5, "post"), (10, 0.5, 5, "post"), (20, 0.3, 5, "post"), (20, 0.5, 5, "post")}
    assert [c.k for c in stages[1]] == [1, 5] and stages[1][0].layer is None  # taken from the best so far
    assert stages[2][0].position == "pre"
    dim = search_space(cfg, "json", "diff_in_means", (10, 20))
    assert [len(s) for s in dim] == [4, 1] and all(c.k is None for s in dim for c in s)
    grid = search_space(SweepConfig(search="grid", k_grid=(1, 5), alpha_grid=(0.3, 0.5)), "json", "saif", (10, 20))
    assert len(grid) == 1 and len(grid[0]) == 2 * 2 * 2 * 2


def test_anchored_search_keeps_its_anchors_layer_and_position_and_searches_k_and_alpha():
    cfg = SweepConfig(k_grid=(1, 5), alpha_grid=(0.3, 0.5), k_start=5)
    anchors = {("json", "saif"): Condition("json", "saif", 20, 1, 0.3, "pre")}
    searches = [("json", "saif_output"), ("summarize", "saif_output"), ("json", "saif")]
    plans = search_plans(cfg, searches, (10, 20), anchors)
    assert set(plans) == {("json", "saif_output"), ("json", "saif")}  # summarize's anchor chose nothing
    first, ks = plans[("json", "saif_output")]  # no position stage: the anchor's position is kept
    assert {(c.layer, c.alpha, c.k, c.position) for c in first} == {(20, 0.3, 5, "pre"), (20, 0.5, 5, "pre")}
    assert [c.k for c in ks] == [1, 5]
    assert plans[("json", "saif")] == search_space(cfg, "json", "saif", (10, 20))
    grid = search_plans(SweepConfig(search="grid", k_grid=(1, 5), alpha_grid=(0.3, 0.5)), searches[:1], (10, 20),
                        anchors)[("json", "saif_output")]
    assert {(c.layer, c.position) for c in grid[0]} == {(20, "pre")} and len(grid[0]) == 2 * 2


def test_an_anchored_method_needs_its_anchor_among_the_methods():
    with pytest.raises(ValueError, match="saif_output.*add them to methods"):
        SweepConfig(methods=("no_instruction", "saif_output"))


def test_best_condition_prefers_accuracy_with_degenerate_failing_then_fewer_degenerate_then_smaller_settings():
    rows = pd.DataFrame([
        {"task": "t", "method": "saif", "layer": 20, "k": 15, "alpha": 0.5, "position": "post", "strict_acc": 0.5,
         "loose_acc": 0.5, "degenerate_rate": 0.4},
        {"task": "t", "method": "saif", "layer": 10, "k": 15, "alpha": 0.5, "position": "post", "strict_acc": 0.5,
         "loose_acc": 0.5, "degenerate_rate": 0.1},
        {"task": "t", "method": "saif", "layer": 10, "k": 5, "alpha": 0.3, "position": "post", "strict_acc": 0.5,
         "loose_acc": 0.5, "degenerate_rate": 0.1},
        {"task": "t", "method": "saif", "layer": 15, "k": 15, "alpha": 0.7, "position": "post", "strict_acc": 0.2,
         "loose_acc": 0.6, "degenerate_rate": 0.0},
        {"task": "t", "method": "saif", "layer": 29, "k": 15, "alpha": 0.7, "position": "post", "strict_acc": 0.1,
         "loose_acc": 0.1, "degenerate_rate": 0.9},  # "ocean-ocean-ocean…": the checker accepts it, but a loop
    ])
    rows["checker_strict_acc"] = rows["checker_loose_acc"] = [0.5, 0.5, 0.5, 0.6, 1.0]
    assert best_condition(rows) == Condition("t", "saif", 10, 5, 0.3, "post")


@pytest.mark.parametrize("kwargs, message", [
    ({"search": "random"}, "search='random'; allowed"),
    ({"k_grid": (0, 5)}, r"k values \[0\] must be integers ≥ 1"),
    ({"alpha_grid": (0.5, float("inf"))}, r"alpha_grid contains \[inf\]"),
    ({"positions": ("middle",)}, r"positions='middle'; allowed: \['post', 'pre'\]"),
    ({"n_test": 0}, "n_test=0 must be ≥ 1"),
    ({"tasks": ()}, "tasks=\\(\\) selects nothing"),
    ({"methods": ("saif", "steer_harder")}, r"contains unknown \['steer_harder'\]; allowed: \['no_instruction'"),
    ({"methods": ("prompting", "random_latents")}, r"\['random_latents'\] reuse the tuned configuration of \['saif'\]"),
])
def test_bad_sweep_parameters_fail_with_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**kwargs)


def test_prompting_instruction_lookup_names_the_missing_variant():
    from saif_utils.data import load_variants

    variants = load_variants()
    found = prompting_instructions(variants, ("translate_fr", "keyword:ocean"), "en-00")
    assert "French" in found["translate_fr"] and "ocean" in found["keyword:ocean"]
    with pytest.raises(ValueError, match="no variant 'translate_fr-xx-99'"):
        prompting_instructions(variants, ("translate_fr",), "xx-99")


def test_setup_validation_names_tasks_layers_and_k_before_any_generation():
    from types import SimpleNamespace

    from saif_utils.methods import VectorSource
    from saif_utils.selection import DirectionKey
    from saif_utils.stages.steering import SteeringSetup, validate_setup

    selected = pd.DataFrame({"task": ["json"], "layer": [10], "position": ["post"], "rank": [1], "latent": [3],
                             "weight": [1.0]})
    sae = SimpleNamespace(cfg=SimpleNamespace(d_sae=64))
    source = VectorSource({10: sae}, selected, {DirectionKey("json", 10, "post"): None}, {10: 1.0})

    def setup(tasks=("json",), **cfg):
        return SteeringSetup(SimpleNamespace(saes={10: sae}), source, {}, {},
                             SweepConfig(tasks=tasks, positions=("post",), **cfg))

    validate_setup(setup(k_grid=(1, 5), k_start=5))
    with pytest.raises(ValueError, match=r"k values \[100\] exceed d_sae=64"):
        validate_setup(setup(k_grid=(1, 100), k_start=5))
    with pytest.raises(ValueError, match=r"layers \[20\] have no SAE; allowed: \[10\]"):
        validate_setup(setup(k_grid=(1,), k_start=1, layers=(10, 20)))
    with pytest.raises(ValueError, match=r"tasks \['poem'\] have no selected latents"):
        validate_setup(setup(tasks=("poem",)))
    missing_direction = SteeringSetup(SimpleNamespace(saes={10: sae}), VectorSource({10: sae}, selected, {}, {10: 1.0}),
                                      {}, {}, SweepConfig(tasks=("json",), positions=("post",), k_grid=(1,), k_start=1))
    with pytest.raises(ValueError, match="no diff-in-means direction for json at layer 10, post"):
        validate_setup(missing_direction)


def test_paired_comparisons_pair_passages_by_id_not_by_row_order():
    from saif_utils.stages.steering import paired_comparisons

    ids = [f"p{i:02d}" for i in range(40)]
    floor = [False] * 40
    ceiling = [i % 2 == 0 for i in range(40)]  # prompting follows on the even passages
    saif = [i % 4 == 0 for i in range(40)]  # SAIF on half of those

    def rows(method, passes, order):
        return pd.DataFrame({"task": "t", "method": method, "split": "test", "passage_id": [ids[i] for i in order],
                             "strict": [passes[i] for i in order], "loose": [passes[i] for i in order]})

    forward, backward = list(range(40)), list(range(39, -1, -1))
    generations = pd.concat([rows("no_instruction", floor, forward), rows("prompting", ceiling, backward),
                             rows("saif", saif, forward), rows("saif", saif, forward).assign(split="val")])
    table = paired_comparisons(generations).set_index("method")
    saif_row = table.loc["saif"]
    # Every passage SAIF follows, prompting follows too: SAIF − prompting is never positive on a passage, so its
    # paired CI stays at or below 0; by row position the two would disagree on 30 of 40 passages.
    assert saif_row["strict_vs_prompting"] == pytest.approx(-0.25)
    assert saif_row["strict_vs_prompting_ci_high"] < 0
    assert saif_row["strict_recovered"] == pytest.approx(0.5)
    assert 0 < saif_row["strict_recovered_ci_low"] < 0.5 < saif_row["strict_recovered_ci_high"] < 1
    assert pd.isna(saif_row["strict_vs_saif"]) and pd.isna(saif_row["strict_vs_diff_in_means"])
    assert table.loc["prompting", "loose_recovered"] == 1.0
    assert set(table.index) == {"no_instruction", "prompting", "saif"}


def test_output_ranking_scores_each_latent_by_its_effect_on_the_targets_likelihood(tiny_run, tmp_path):
    """saif_output's score is the fall in the targets' mean NLL per unit added along the latent's direction: a finite
    step along the top latent lowers the NLL by that much, and the order follows the score."""
    import shutil

    import torch

    from saif_utils.calibration import target_nll
    from saif_utils.context import open_run
    from saif_utils.stages import steering

    for stage in ("01_sae_loading", "02_feature_discovery"):
        shutil.copytree(tiny_run[0] / stage, tmp_path / stage)
    ctx = open_run("tiny", tmp_path)
    setup = steering.build_setup(ctx, ctx.stage_config(steering.SweepConfig, tasks=("summarize",), layers=(6,)),
                                 splits=("train", "val"))
    fitter = steering.MethodFitter(setup)
    ranking = fitter.output_ranking("summarize", 6, "post")
    pool = fitter.candidates("summarize", 6, "post")
    assert (ranking["ranked_by"] == "output").all() and len(ranking) >= 2
    assert set(ranking["latent"]) <= set(pool["latent"]) and (ranking["output_score"] > 0).all()
    assert ranking["output_score"].is_monotonic_decreasing
    assert ranking["rank"].tolist() == list(range(1, len(ranking) + 1))
    train = fitter.targets("train")["summarize"]
    decoder = ctx.saes[6].W_dec.detach().float()
    base = target_nll(ctx.model, 6, torch.zeros(decoder.shape[1]), None, train, 16)[0]
    for row in (ranking.iloc[0], ranking.iloc[-1]):
        step = 0.5 * decoder[int(row["latent"])] / decoder[int(row["latent"])].norm()
        fall = base - target_nll(ctx.model, 6, step, None, train, 16)[0]
        assert fall / 0.5 == pytest.approx(row["output_score"], rel=0.05), row["latent"]
