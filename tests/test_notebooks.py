"""Papermill runs of the numbered notebooks on the tiny profile, through the same runner as `make reproduce`."""
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from saif_utils.pipeline import numbered_notebooks


def test_every_notebook_has_a_parameters_cell_and_no_outputs():
    import nbformat

    assert numbered_notebooks(), "no numbered notebooks found"
    for path in numbered_notebooks():
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        for name in ("profile", "output_dir", "remote"):
            assert f"{name} =" in tagged[0].source, f"{path.name}: parameter {name!r} missing"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"


def test_notebook_imports_lists_each_module_a_notebook_imports_once(tmp_path):
    import nbformat

    from saif_utils.pipeline import notebook_imports

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import numpy as np\nfrom saif_utils.io import write_table\nx = 1"),
                nbformat.v4.new_markdown_cell("import os"), nbformat.v4.new_code_cell("%matplotlib inline"),
                nbformat.v4.new_code_cell("import numpy, colorsys\nfrom . import local")]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    assert notebook_imports(tmp_path / "nb.ipynb") == ["numpy", "saif_utils.io", "colorsys"]


def test_kernels_ahead_starts_the_next_kernel_early_with_imports_outside_the_namespace(tmp_path):
    from contextlib import closing

    import nbformat

    from saif_utils.pipeline import kernels_ahead, run_notebook

    notebooks = []
    for name in ("00_a", "00_b"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("import sys, os\nprint('colorsys' in sys.modules, 'colorsys' in dir())"),
                    nbformat.v4.new_code_cell("import colorsys")]
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
        notebooks.append(tmp_path / f"{name}.ipynb")
    with closing(kernels_ahead(notebooks)) as kernels:
        first = next(kernels)
        executed = run_notebook(notebooks[0], tmp_path / "out", {}, km=first)
        second = next(kernels)
        assert not first.is_alive(), "a kernel is shut down once the next one is taken"
        assert first.transport == "ipc" and not Path(first.ip).parent.exists(), "IPC sockets, removed at shutdown"
        assert second.is_alive()
        # The kernel had imported the notebook's modules before its first cell: in sys.modules, not in its namespace.
        assert nbformat.read(executed, as_version=4).cells[0].outputs[0]["text"] == "True False\n"
    assert not second.is_alive(), "closing the generator shuts the kernel in use down"


def test_01_writes_sae_metrics_for_every_layer(tiny_run, tiny_profile):
    output_dir, timings, _ = tiny_run
    stage = output_dir / "01_sae_loading"
    metrics = pd.read_csv(stage / "sae_metrics.csv")
    expected = ["family", "layer", "d_sae", "k", "n_tokens", "explained_variance", "l0", "dead_frac", "ce_clean",
                "ce_spliced", "ce_zero_ablated", "kl"]
    assert list(metrics.columns[: len(expected)]) == expected
    assert sorted(metrics["layer"]) == list(tiny_profile.sae_layers)
    cfg = tiny_profile.sae_train
    assert (metrics["d_sae"] == cfg.d_sae).all() and (metrics["k"] == cfg.k).all()
    assert (metrics["l0"] <= cfg.k + 1e-6).all() and (metrics["l0"] > 0).all()
    # Even a seconds-long training run must learn something real about the residual stream.
    assert (metrics["explained_variance"] > 0.3).all(), metrics[["layer", "explained_variance"]]
    assert metrics["dead_frac"].between(0, 1).all()
    assert (metrics["ce_spliced"] > metrics["ce_clean"]).all() and (metrics["kl"] > 0).all()
    # Deleting a layer's residual is far worse than any trained reconstruction: recovered lies in (0, 1).
    assert (metrics["ce_zero_ablated"] > metrics["ce_spliced"]).all()
    assert metrics["ce_recovered"].between(0, 1, inclusive="neither").all()
    assert all(math.isfinite(v) for v in metrics[["ce_clean", "ce_spliced", "kl"]].to_numpy().ravel())
    for name in ("explained_variance", "ce_increase", "ce_recovered"):  # 95 % CIs over texts bracket each value
        assert (metrics[f"{name}_ci_low"] < metrics[name]).all() and (metrics[name] < metrics[f"{name}_ci_high"]).all()
    assert (metrics["n_texts"] >= metrics["n_ce_texts"]).all() and (metrics["n_ce_texts"] > 1).all()
    assert (stage / "01_sae_loading.ipynb").is_file() and (stage / "latent_firing.png").is_file()
    assert (stage / "sae_quality.png").is_file() and (stage / "sae_learning_curves.png").is_file()
    assert (stage / "saes.json").is_file() and (output_dir / "timings.csv").is_file()
    assert list(timings["stage"]) == [nb.stem for nb in numbered_notebooks()]
    # each kernel's own peak: torch and the model loaded (≫ 200 MB), far below the machine (≪ 20 GB)
    assert timings["peak_rss_mb"].between(200, 20_000).all(), timings["peak_rss_mb"]


def test_01_saes_reload_from_the_run_manifest(tiny_run, tiny_profile):
    from saif_utils.context import RunDir

    saes = RunDir(tiny_run[0]).saes()
    assert sorted(saes) == list(tiny_profile.sae_layers)
    assert all(sae.cfg.d_in == tiny_profile.model.d_model for sae in saes.values())


def test_02_writes_scores_selections_and_robustness(tiny_run, tiny_profile):
    from saif_utils.stages.discovery import DiscoveryConfig

    stage = tiny_run[0] / "02_feature_discovery"
    scores = pd.read_parquet(stage / "latent_scores.parquet")
    expected = ["task", "layer", "position", "latent", "freq_pos", "freq_neg", "mean_diff", "consistency", "score", "rank"]
    assert set(expected) <= set(scores.columns)
    assert {"translate_fr", "summarize"} <= set(scores["task"]) and set(scores["position"]) == {"post", "pre"}
    assert scores["consistency"].between(0, 1).all() and scores["freq_pos"].between(0, 1).all()
    # every (task, layer, position, contrast) ranks every latent exactly once
    for _, group in scores.groupby(["task", "layer", "position", "contrast"]):
        assert sorted(group["rank"]) == list(range(1, len(group) + 1))
    selected = pd.read_csv(stage / "selected_latents.csv")
    assert list(selected.columns[:7]) == ["task", "layer", "position", "contrast", "rank", "latent", "weight"]
    assert (selected["score"] > 0).all()
    # the selection is the top of the score table: its ranks 1 … n, in order, with the same latents and scores
    keys = ["task", "layer", "position", "contrast"]
    top_k = tiny_profile.stage_defaults["discovery"].get("top_k", DiscoveryConfig.top_k)
    for key, chosen in selected.groupby(keys):
        ranked = scores.set_index(keys).loc[key]
        assert len(chosen) == min(top_k, int((ranked["score"] > 0).sum())), key
        top = ranked[ranked["rank"] <= len(chosen)].sort_values("rank")
        assert chosen["rank"].tolist() == list(range(1, len(chosen) + 1)), key
        assert chosen["latent"].tolist() == top["latent"].tolist(), key
        assert chosen["score"].to_numpy() == pytest.approx(top["score"].to_numpy()), key
        assert (top["score"].to_numpy()[:-1] >= top["score"].to_numpy()[1:]).all(), key
    robust = pd.read_csv(stage / "robustness.csv")
    assert {"bootstrap_jaccard", "paraphrase_vs_translation_jaccard", "pre_vs_post_jaccard"} <= set(robust["metric"])
    assert {"translate_fr"} <= set(robust[robust["metric"] == "bootstrap_jaccard"]["task"])
    for name in ("top_latents_by_language.png", "consistency_vs_sensitivity.png"):
        assert (stage / name).is_file(), name


def test_03_writes_proximity_with_a_random_control(tiny_run):
    stage = tiny_run[0] / "03_semantic_proximity"
    prox = pd.read_parquet(stage / "proximity.parquet")
    assert set(prox["control"]) == {True, False}
    assert prox["top_tokens"].str.count(r" \| ").eq(19).all(), "20 logit-lens tokens per latent"
    assert prox["cos_instruction"].between(-1, 1).all()
    overlap = pd.read_csv(stage / "task_overlap.csv")
    diag = overlap[overlap["task_a"] == overlap["task_b"]]["jaccard"].dropna()
    assert (diag == 1).all()
    # one dashboard page per task, a card per selected latent (content contrast) at every layer, contexts included
    selected = pd.read_csv(tiny_run[0] / "02_feature_discovery" / "selected_latents.csv")
    selected = selected[(selected["contrast"] == "content") & (selected["rank"] <= 15)]
    for task, group in selected.groupby("task"):
        page = (stage / "dashboards" / f"{task.replace(':', '_')}.html").read_text()
        cards = set(re.findall(r'id="L(\d+)-(\d+)"', page))
        assert cards == {(str(layer), str(latent)) for layer, latent in zip(group["layer"], group["latent"])}, task
        assert page.count('class="ctx"') > 0 and "<svg" in page, "contexts and histograms missing"
    assert (stage / "dashboards" / "index.html").is_file()


def test_04_writes_ablation_against_mass_matched_random_latents(tiny_run, tiny_profile):
    stage = tiny_run[0] / "04_causal_ablation"
    table = pd.read_csv(stage / "ablation.csv")
    expected = ["task", "layer", "k", "condition", "n", "strict_acc", "strict_ci_low", "strict_ci_high", "loose_acc",
                "loose_ci_low", "loose_ci_high"]
    assert list(table.columns[: len(expected)]) == expected
    assert set(table["condition"]) == {"none", "selected", "random"}
    assert set(table["layer"]) <= set(tiny_profile.sae_layers)
    assert (table["strict_ci_low"] <= table["strict_acc"]).all() and (table["strict_acc"] <= table["strict_ci_high"]).all()
    assert (table["n"] == tiny_profile.stage_defaults["ablation"]["n_test"]).all()
    ablated = table[table["condition"] != "none"]
    assert (ablated["mass_removed"] > 0).all(), "an ablation must remove activation that is actually there"
    # The edit acted: it moves the likelihood of the unablated model's own response at every (task, layer), lowers it
    # on average, and changes some responses (a no-op edit leaves the drop at exactly 0 and every response as it was).
    assert (ablated["logprob_drop"].abs() > 1e-4).all(), ablated[["task", "layer", "condition", "logprob_drop"]]
    assert ablated["logprob_drop"].mean() > 0
    gens = pd.read_parquet(stage / "generations.parquet")
    assert len(gens) == table["n"].sum() and gens["response"].str.len().gt(0).any()
    by_condition = gens.pivot_table(index=["task", "layer", "passage_id"], columns="condition", values="response",
                                    aggfunc="first")
    assert (by_condition["selected"] != by_condition["none"]).any(), "no response changed under ablation"
    assert (stage / "ablation.png").is_file()


def test_05_writes_sweeps_results_and_generations(tiny_run, tiny_profile):
    stage = tiny_run[0] / "05_steering_sweeps"
    sweep = pd.read_parquet(stage / "sweep.parquet")
    columns = ["task", "method", "layer", "k", "alpha", "position", "split", "n", "strict_acc", "strict_ci_low",
               "strict_ci_high", "loose_acc", "loose_ci_low", "loose_ci_high", "fluency"]
    assert set(columns) <= set(sweep.columns)
    results = pd.read_csv(stage / "results.csv")
    from saif_utils.methods import METHODS

    for task, group in results.groupby("task"):
        assert sorted(group["method"]) == sorted(METHODS), task
    on_val = {m for m, method in METHODS.items() if method.tuned or method.fits}  # fitted ones, for the variant choice
    assert (results["split"] == "test").all() and sweep[sweep["split"] == "val"]["method"].isin(on_val).all()
    assert on_val <= set(sweep.loc[sweep["split"] == "val", "method"])
    paired = ["strict_vs_no_instruction", "strict_vs_prompting", "strict_vs_diff_in_means", "strict_vs_saif",
              "strict_recovered", "loose_recovered"]
    assert {c + s for c in paired for s in ("", "_ci_low", "_ci_high")} <= set(results.columns)
    assert results.loc[results["method"] == "saif", "strict_vs_no_instruction"].notna().all()
    rankings = pd.read_csv(stage / "latent_rankings.csv")
    assert set(rankings["method"]) == {"saif_output"} and set(rankings["task"]) == set(results["task"])
    decomposition = pd.read_csv(stage / "decomposition.csv")
    assert {"saif", "best", "diff_in_means"} <= set(decomposition["span"]) and decomposition["n"].gt(0).all()
    assert decomposition["norm_share"].between(0, 1 + 1e-6).all()
    calibration = pd.read_csv(stage / "calibration.csv")
    assert {"n_steps", "converged"} <= set(calibration.columns)
    # the configuration reported on test is one that was evaluated on val
    val = sweep[sweep["split"] == "val"]
    for row in results[results["method"] == "saif"].itertuples():
        assert ((val["task"] == row.task) & (val["method"] == "saif") & (val["layer"] == row.layer)
                & (val["k"] == row.k) & (val["alpha"] == row.alpha) & (val["position"] == row.position)).any()
    assert (results["n"] == tiny_profile.stage_defaults["steering"]["n_test"]).all()
    gens = pd.read_parquet(stage / "generations.parquet")
    # The vector acted: some SAIF responses differ from the unsteered ones on the same test passage.
    test = gens[gens["split"] == "test"].pivot_table(index=["task", "passage_id"], columns="method", values="response",
                                                      aggfunc="first")
    assert (test["saif"] != test["no_instruction"]).any(), "steering changed no response"
    assert {"passage_id", "response", "strict", "loose", "nll", "method", "split"} <= set(gens.columns)
    assert set(gens[gens["split"] == "test"]["passage_id"]).isdisjoint(gens[gens["split"] == "val"]["passage_id"])
    for name in ("results.png", "accuracy_vs_k.png", "accuracy_fluency_vs_alpha.png", "layer_comparison.png",
                 "residual_norms.csv", "recovered_share.png", "decomposition.png"):
        assert (stage / name).is_file(), name


def test_06_report_traces_every_headline_number_to_a_table(tiny_run):
    from saif_utils.stages.report import STATUSES

    run = tiny_run[0]
    report = (run / "report.md").read_text()
    assert (run / "report.html").read_text().startswith("<!doctype html>")
    claims = pd.read_csv(run / "06_report" / "claims.csv")
    assert len(claims) == 11 and set(claims["status"]) <= set(STATUSES)
    for claim, status in zip(claims["paper's claim"], claims["status"]):
        assert f"| {claim} | {status} |" in report
    # every steering and ablation accuracy in the report is the one in the stage's CSV
    for table in (pd.read_csv(run / "05_steering_sweeps" / "results.csv"), pd.read_csv(run / "04_causal_ablation" / "ablation.csv")):
        for row in table.to_dict("records"):
            for name in ("strict", "loose"):
                low, high = row[f"{name}_ci_low"], row[f"{name}_ci_high"]
                assert "{:.2f} [{:.2f}, {:.2f}]".format(row[f"{name}_acc"], low, high) in report, (name, row)
    env = pd.read_csv(run / "06_report" / "environment.csv")
    assert {"git commit", "torch", "nnsight", "sae-lens", "model", "device"} <= set(env["item"])
    for stage in ("01_sae_loading", "02_feature_discovery", "03_semantic_proximity", "04_causal_ablation",
                  "05_steering_sweeps"):
        assert f"| {stage} |" in report, f"run time of {stage} missing from the report"
    assert "![results.png](05_steering_sweeps/results.png)" in report
    # the decomposition's and the calibration diagnosis' numbers are the ones in their tables
    for row in pd.read_csv(run / "05_steering_sweeps" / "decomposition.csv").to_dict("records"):
        k = "—" if pd.isna(row["k"]) else int(row["k"])
        assert f"| {row['span']} | {k} | {row['norm_share']:.2f} | {row['n']} |" in report, row
    for row in pd.read_csv(run / "05_steering_sweeps" / "calibration_diagnosis.csv").to_dict("records"):
        assert f"| {row['method']} | {row['n_val_targets']} | {row['val_nll']:.3f} [" in report, row
    links = re.findall(r"\]\((03_semantic_proximity/dashboards/[^)#]+)(#layer-\d+)?\)", report)
    pages = {f"03_semantic_proximity/dashboards/{p.name}" for p in (run / "03_semantic_proximity" / "dashboards")
             .glob("*.html") if p.name != "index.html"}
    assert pages and {path for path, _ in links} == pages, "the report links every dashboard page"
    assert any(anchor for _, anchor in links), "no link points at the layer the steering chose"


def test_07_playground_runs_headless_with_its_default_widgets(tiny_run):
    import nbformat

    stage = tiny_run[0] / "07_playground"
    comparison = pd.read_csv(stage / "default_comparison.csv", keep_default_na=False)
    assert list(comparison.columns) == ["answer", "response", "strict", "loose", "degenerate"]
    labels = comparison["answer"].tolist()
    assert len(labels) == 3 and labels[0] == "no instruction" and labels[1].startswith("prompted: ")
    assert re.fullmatch(r"saif \(L\d+, k=\d+, α=[\d.]+, (post|pre)\)", labels[2]), labels[2]
    assert comparison["response"].str.strip().str.len().gt(0).all(), "every answer has text"
    assert comparison["response"].iloc[2] != comparison["response"].iloc[0], "the steered answer equals the unsteered"
    nb = nbformat.read(stage / "07_playground.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), "widgets built"


def test_a_run_shows_the_running_cell_its_loop_bar_and_the_line_that_failed(tmp_path, monkeypatch):
    """The runner's live status names the cell running, the innermost loop's text bar from the kernel and the time
    against the last run's; a failed cell is traced to its source line."""
    import io

    import nbformat
    from papermill.exceptions import PapermillExecutionError

    from saif_utils.pipeline import run_notebook
    from saif_utils.progress import LiveStatus, failed_line

    monkeypatch.setenv("SAIF_TEXT_PROGRESS", "1")  # as the runner sets it for its kernels
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import time\nfrom saif_utils.progress import tqdm"),
                nbformat.v4.new_code_cell("# a loop the status line follows\nfor i in tqdm(range(5), desc='toy loop', "
                                          "mininterval=0):\n    time.sleep(0.5)"),
                nbformat.v4.new_code_cell("x = 1\nraise ValueError('broken on purpose')")]
    nbformat.write(nb, tmp_path / "00_toy.ipynb")
    out = io.StringIO()  # not a terminal: the status is printed as lines
    with pytest.raises(PapermillExecutionError) as failure, LiveStatus("00_toy", 3, 100.0, out, log_every=0.3) as status:
        run_notebook(tmp_path / "00_toy.ipynb", tmp_path / "out", {}, status=status)
    lines = out.getvalue().splitlines()
    loop_lines = [line for line in lines if "· cell 2/3 · for i in tqdm(range(5), desc='toy loop'" in line]
    assert loop_lines and all("(last run 1:40, ≈ 1:" in line for line in loop_lines), lines
    assert any(re.search(r"· toy loop: +[2-8]0%\|.*\| [1-4]/5 \[", line) for line in loop_lines), loop_lines
    assert any("· cell 3/3 · x = 1" in line for line in lines)
    executed = nbformat.read(tmp_path / "out" / "00_toy" / "00_toy.ipynb", as_version=4)
    assert failed_line(executed.cells, failure.value.traceback) == "raise ValueError('broken on purpose')"


def test_library_bars_obey_tqdm_disable(monkeypatch, capsys):
    """`TQDM_DISABLE=1` (how `make bench` runs) silences the library's bars, even those it creates with
    `disable=False` so that a single batch still names its phase."""
    from saif_utils.progress import tqdm

    monkeypatch.setenv("SAIF_TEXT_PROGRESS", "1")
    list(tqdm(range(3), desc="shown", disable=False))
    assert "shown" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(tqdm(range(3), desc="hidden", disable=False))
    assert "hidden" not in capsys.readouterr().err
