"""The run report: the paper's claims beside our measurements, headline tables with n and 95 % CIs, figures, run
times and the environment — written as `report.md` and `report.html` at the top of the run folder. Every number in
it is read from a table another stage wrote."""
from __future__ import annotations

import datetime
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from ..context import RunDir
from ..data import AGREEMENT_PATH, POSITIONS
from ..io import atomic_path, write_table
from ..methods import METHODS
from ..models import model_fingerprint
from ..paths import REPO_ROOT
from ..profiles import PROFILES, Profile
from ..saes import sae_fingerprint
from ..stats import selection_objective
from .steering import alpha_curve, k_curve, pre_post_pairs, rows_at

NAME = "06_report"
PACKAGES = ("torch", "transformers", "nnsight", "sae-lens", "papermill", "pandas", "scipy", "numpy")
NOT_TESTED = "not tested on this profile"
PAIRED_COLUMNS = ("strict_vs_prompting", "strict_vs_diff_in_means", "strict_recovered", "loose_recovered")
STATUSES = ("confirmed", "not confirmed", NOT_TESTED)
FIGURES = {  # stage → figures shown in the report, in order
    "01_sae_loading": ("sae_quality.png", "sae_learning_curves.png"),
    "02_feature_discovery": ("top_latents_by_language.png", "consistency_vs_sensitivity.png"),
    "03_semantic_proximity": ("cosine_selected_vs_random.png",),
    "04_causal_ablation": ("ablation.png",),
    "05_steering_sweeps": ("results.png", "recovered_share.png", "decomposition.png", "layer_comparison.png",
                           "accuracy_vs_k.png", "pre_vs_post.png", "calibration_rounds.png", "calibrated_weights.png"),
}


def ci_cell(row, name: str) -> str:
    """'0.42 [0.29, 0.56]' for one accuracy, rate or plain value (`<name>_acc`, `<name>_rate` or `<name>`) and its
    95 % CI (`<name>_ci_low`, `<name>_ci_high`); '—' when the value is missing."""
    value = next(row[key] for key in (f"{name}_acc", f"{name}_rate", name) if key in row)
    if pd.isna(value):
        return "—"
    low, high = (f"{bound:.2f}" if np.isfinite(bound) else ("−∞" if bound < 0 else "∞")
                 for bound in (row[f"{name}_ci_low"], row[f"{name}_ci_high"]))
    return f"{value:.2f} [{low}, {high}]"


def steering_table(results: pd.DataFrame) -> str:
    """Markdown: every task × method on test with its configuration, n, strict/loose accuracy (degenerate responses
    fail), the checker's raw strict accuracy (degenerate responses pass), the degenerate rate, and the paired
    comparisons (`steering.paired_comparisons`: differences to prompting and diff-in-means, share of prompting's gain;
    '—' against itself, where undefined, or in a table written before they existed)."""
    lines = ["| task | method | config (layer, k, α, position) | n | strict [95 % CI] | loose [95 % CI] "
             "| checker strict, degenerate pass | degenerate [95 % CI] | strict − prompting, paired "
             "| strict − diff-in-means, paired | share of prompting's strict gain | … loose gain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    results = results.assign(order=results["method"].map(order)).sort_values(["task", "order"])
    for row in results.to_dict("records"):
        config = "—"
        if pd.notna(row["layer"]):
            k = "—" if pd.isna(row["k"]) else int(row["k"])
            config = f"L{int(row['layer'])}, {k}, {row['alpha']:g}, {row['position']}"
        lines.append(f"| {row['task']} | {row['method']} | {config} | {row['n']} | {ci_cell(row, 'strict')} | "
                     f"{ci_cell(row, 'loose')} | {ci_cell(row, 'checker_strict')} | {ci_cell(row, 'degenerate')} | "
                     + " | ".join(ci_cell(row, name) if name in row else "—" for name in PAIRED_COLUMNS) + " |")
    return "\n".join(lines)


def ablation_table(table: pd.DataFrame) -> str:
    """Markdown: strict/loose accuracy and log-prob drop per task, layer and ablation condition."""
    lines = ["| task | layer | ablated | n | strict [95 % CI] | loose [95 % CI] | log-prob drop [95 % CI] |",
             "|---|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        drop = f"{row['logprob_drop']:.3f} [{row['logprob_drop_ci_low']:.3f}, {row['logprob_drop_ci_high']:.3f}]"
        lines.append(f"| {row['task']} | {row['layer']} | {row['condition']} | {row['n']} | {ci_cell(row, 'strict')} | "
                     f"{ci_cell(row, 'loose')} | {drop} |")
    return "\n".join(lines)


def decomposition_table(table: pd.DataFrame) -> str:
    """Markdown: per task at SAIF's layer, the cosine of SAIF's vector with diff-in-means, then per span and k the
    share of diff-in-means' squared norm the span carries and val accuracy steering with the projection."""
    lines = ["| task | layer | cos(SAIF, DiM) | span | k | share of ‖DiM‖² | n | val strict [95 % CI] "
             "| val loose [95 % CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        k = "—" if pd.isna(row["k"]) else int(row["k"])
        lines.append(f"| {row['task']} | L{int(row['layer'])} | {row['cosine_saif_dim']:.2f} | {row['span']} | {k} | "
                     f"{row['norm_share']:.2f} | {row['n']} | {ci_cell(row, 'strict')} | {ci_cell(row, 'loose')} |")
    return "\n".join(lines)


def diagnosis_table(table: pd.DataFrame) -> str:
    """Markdown: per calibrated task and method, the calibration objective on val (NLL of the accepted prompted
    responses, instruction absent) beside val accuracy."""
    lines = ["| task | method | val targets | val NLL [95 % CI] | n | val strict [95 % CI] | val loose [95 % CI] |",
             "|---|---|---|---|---|---|---|"]
    for row in table.to_dict("records"):
        nll = f"{row['val_nll']:.3f} [{row['val_nll_ci_low']:.3f}, {row['val_nll_ci_high']:.3f}]"
        n = "—" if pd.isna(row.get("n")) else int(row["n"])
        acc = [ci_cell(row, name) if f"{name}_acc" in row else "—" for name in ("strict", "loose")]
        lines.append(f"| {row['task']} | {row['method']} | {row['n_val_targets']} | {nll} | {n} | {acc[0]} | "
                     f"{acc[1]} |")
    return "\n".join(lines)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A plain markdown table of a DataFrame (floats formatted with `floatfmt`)."""
    def fmt(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "—" if np.isnan(value) else format(value, floatfmt)
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _argmax_per_task(rows: pd.DataFrame, column: str) -> dict[str, int]:
    """Per task, the value of `column` with the highest selection objective; tasks whose objective does not vary are
    left out (a flat row of zeros names no best setting)."""
    out = {}
    for task, g in rows.groupby("task"):
        score = selection_objective(g)
        if g[column].nunique() > 1 and score.nunique() > 1:
            out[task] = int(g.loc[score.idxmax(), column])
    return out


def claims_table(results: pd.DataFrame, sweep: pd.DataFrame, layers: list[int], k_start: int,
                 family_results: dict[str, pd.DataFrame] | None = None,
                 decomposition: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our measurements beside the paper's headline claims, each confirmed / not confirmed / not tested here.

    Sources: `results.csv` (test) for accuracy and the paired comparisons; the SAIF rows of `sweep.parquet` (val) for
    layer, k and position, scored by the selection objective, and for the SAIF variant chosen per task;
    `family_results` (SAE family → its run's `results.csv`, this run included) for the claim across SAE sizes;
    `decomposition` (`decomposition.csv`) for the share of diff-in-means that SAIF's latents carry."""
    rows = [_claim_accuracy(results), _claim_recovered(results), _claim_final_layer(sweep, layers, k_start),
            _claim_k(sweep, results), _claim_post_vs_pre(sweep, results), _claim_sae_sizes(family_results or {}),
            _claim_paired(results, "Precisely calibrated weights matter (SAIF calibrated beats SAIF, same layer, k, α)",
                          "saif_calibrated", "saif"),
            _claim_paired(results, "SAIF + prompt beats prompting", "saif_plus_prompt", "prompting"),
            _claim_paired(results, "SAE latents beat activation differences (the SAIF variant chosen on val beats "
                          "diff-in-means)", chosen_variants(results, sweep), "diff_in_means"),
            _claim_paired(results, "Latents selected by their effect on the output steer better than latents "
                          "selected by activation (saif_output beats saif)", "saif_output", "saif"),
            _claim_decomposition(decomposition)]
    return pd.DataFrame(rows, columns=["paper's claim", "status", "measured here"])


SAIF_VARIANTS = ("saif", "saif_output", "saif_calibrated")
"""The methods built from SAE latents chosen for the instruction, among which one is chosen per task on val."""


def chosen_variants(results: pd.DataFrame, sweep: pd.DataFrame) -> dict[str, str]:
    """Per task, the SAIF variant (`SAIF_VARIANTS`) with the best val selection objective at the configuration it
    is reported at (ties → the first in `SAIF_VARIANTS`)."""
    val = sweep[sweep["split"] == "val"]
    best: dict[str, tuple[float, str]] = {}
    for row in results[results["method"].isin(SAIF_VARIANTS)].to_dict("records"):
        same = rows_at(val, row["task"], row["method"], row["layer"], row["alpha"], row["k"], row["position"])
        if same.empty:
            continue
        objective = float(selection_objective(same).max())
        if row["task"] not in best or objective > best[row["task"]][0]:
            best[row["task"]] = (objective, row["method"])
    return {task: method for task, (_, method) in best.items()}


def paired_verdict(row, name: str) -> str | None:
    """'beats' / 'loses' when the paired 95 % CI of `name` (a difference) lies above / below 0, 'ties' when it holds
    0; None when the difference is missing."""
    if name not in row or pd.isna(row[name]):
        return None
    return "beats" if row[f"{name}_ci_low"] > 0 else "loses" if row[f"{name}_ci_high"] < 0 else "ties"


def _claim_paired(results: pd.DataFrame, claim: str, method: str | dict[str, str], baseline: str,
                  score: str = "strict") -> tuple[str, str, str]:
    """Holds when `method` (one name, or one per task) beats `baseline` (paired CI of the per-passage difference
    above 0, `score` accuracy on test) on at least half of the tasks both ran."""
    name = f"{score}_vs_{baseline}"
    per_task = isinstance(method, dict)
    rows = (results[[(t, m) in method.items() for t, m in zip(results["task"], results["method"])]] if per_task
            else results[results["method"] == method])
    verdicts = {row["task"]: (paired_verdict(row, name), row) for row in rows.to_dict("records")}
    verdicts = {task: (verdict, row) for task, (verdict, row) in verdicts.items() if verdict is not None}
    label = "the chosen variant" if per_task else method
    if not verdicts:
        return claim, NOT_TESTED, f"{label} and {baseline} did not both run on test"
    counts = {v: sum(verdict == v for verdict, _ in verdicts.values()) for v in ("beats", "ties", "loses")}
    status = "confirmed" if 2 * counts["beats"] >= len(verdicts) else "not confirmed"
    cells = "; ".join(task + (f" ({row['method']})" if per_task else "") + f" {ci_cell(row, name)} ({verdict}, "
                      f"n={row['n']})" for task, (verdict, row) in verdicts.items())
    return claim, status, (f"{score} {label} − {baseline}, paired over test passages: beats on {counts['beats']}, "
                           f"ties on {counts['ties']}, loses on {counts['loses']} of {len(verdicts)} tasks — {cells}")


DECOMPOSITION_SHARE = 0.5
"""SAIF's latents carry the diff-in-means direction when their span holds at least this share of its squared norm."""


def _claim_decomposition(decomposition: pd.DataFrame | None) -> tuple[str, str, str]:
    """Holds when, on at least half of the tasks, the span of SAIF's k latents (its chosen k, at its chosen layer)
    carries `DECOMPOSITION_SHARE` of diff-in-means' squared norm."""
    claim = "k SAE latents carry the diff-in-means direction (SAIF's k latents hold ≥ 50 % of its squared norm)"
    if decomposition is None or decomposition.empty:
        return claim, NOT_TESTED, "no decomposition (notebook 05 with diff_in_means and saif both tuned)"
    met, cells = 0, []
    for task, rows in decomposition.groupby("task", sort=False):
        k = int(rows["saif_k"].iloc[0])
        share = rows.set_index(["span", "k"])["norm_share"]
        saif_share, best_share = share.get(("saif", k), np.nan), share.get(("best", k), np.nan)
        met += bool(saif_share >= DECOMPOSITION_SHARE)
        largest = rows.loc[rows["span"] == "best", "k"].max()
        cells.append(f"{task} (L{int(rows['layer'].iloc[0])}): SAIF's {k} latents carry {saif_share:.0%}, the best "
                     f"{k} {best_share:.0%}, the best {int(largest)} {share.get(('best', largest), np.nan):.0%}; "
                     f"cos(SAIF, diff-in-means) {rows['cosine_saif_dim'].iloc[0]:.2f}")
    n_tasks = decomposition["task"].nunique()
    status = "confirmed" if 2 * met >= n_tasks else "not confirmed"
    return claim, status, (f"share of diff-in-means' squared norm in the span of k decoder directions (SAIF's chosen "
                           f"k), met on {met} of {n_tasks} tasks — " + "; ".join(cells))


RECOVERED_GOAL = (0.75, 0.5)
"""A method recovers most of prompting's gain when the share is ≥ 0.75 with the CI's lower bound ≥ 0.5."""


def _claim_recovered(results: pd.DataFrame) -> tuple[str, str, str]:
    """Holds when SAIF recovers most of prompting's gain (`RECOVERED_GOAL`, strict or loose) on at least half of the
    tasks where prompting beats no instruction."""
    claim = "SAIF recovers most of what prompting gains (share ≥ 0.75, CI low ≥ 0.5)"
    rows = results[results["method"] == "saif"]
    if "strict_recovered" not in rows or rows.empty:
        return claim, NOT_TESTED, "no SAIF test rows with prompting and no instruction beside them"
    share, floor = RECOVERED_GOAL
    defined, met, cells = 0, 0, []
    for row in rows.to_dict("records"):
        scores = [s for s in ("strict", "loose") if pd.notna(row[f"{s}_recovered"])]
        if not scores:
            cells.append(f"{row['task']} undefined (prompting does not beat no instruction)")
            continue
        defined += 1
        hits = [s for s in scores if row[f"{s}_recovered"] >= share and row[f"{s}_recovered_ci_low"] >= floor]
        met += bool(hits)
        cells.append(f"{row['task']} " + ", ".join(f"{s} {ci_cell(row, f'{s}_recovered')}" for s in scores)
                     + (f" (met on {', '.join(hits)})" if hits else ""))
    if not defined:
        return claim, NOT_TESTED, "; ".join(cells)
    status = "confirmed" if 2 * met >= defined else "not confirmed"
    return claim, status, (f"met on {met} of {defined} tasks where prompting beats no instruction (paired, n per "
                           f"task in results.csv) — " + "; ".join(cells))


def _claim_sae_sizes(family_results: dict[str, pd.DataFrame]) -> tuple[str, str, str]:
    """Holds when, in every family, SAIF's strict accuracy beats no instruction (the paired CI of their per-passage
    difference above 0) on at least half of the tasks both families ran."""
    claim = "The method holds across SAE sizes"
    if len(family_results) < 2:
        return claim, NOT_TESTED, ("one SAE family run; run the other family's profile (e.g. `make reproduce "
                                   "PROFILE=default-4x`) into the same outputs folder")
    unpaired = sorted(f for f, r in family_results.items() if "strict_vs_no_instruction" not in r)
    if unpaired:
        return claim, NOT_TESTED, f"results.csv of {unpaired} has no paired columns: rerun notebook 05 on that profile"
    tasks = sorted(set.intersection(*(set(r.loc[r["method"] == "saif", "task"]) for r in family_results.values())))
    if not tasks:
        return claim, NOT_TESTED, "the families share no SAIF task"
    wins, evidence = {}, []
    for family, results in family_results.items():
        by_method = results.set_index(["task", "method"])
        beats = [t for t in tasks if paired_verdict(by_method.loc[(t, "saif")], "strict_vs_no_instruction") == "beats"]
        wins[family] = len(beats)
        cells = ", ".join(f"{t} {ci_cell(by_method.loc[(t, 'saif')], 'strict_vs_no_instruction')}" for t in tasks)
        evidence.append(f"{family}: beats no instruction on {len(beats)}/{len(tasks)} ({cells})")
    status = "confirmed" if all(2 * n >= len(tasks) for n in wins.values()) else "not confirmed"
    return claim, status, ("SAIF − no instruction, strict on test, paired over passages (n per cell in results.csv) — "
                           + "; ".join(evidence))


def _saif_val(sweep: pd.DataFrame) -> pd.DataFrame:
    return sweep[(sweep["method"] == "saif") & (sweep["split"] == "val")]


def _first_position(sweep: pd.DataFrame) -> str | None:
    """The extraction position the staged search starts from (that of the first SAIF val row)."""
    positions = _saif_val(sweep)["position"].dropna()
    return positions.iloc[0] if not positions.empty else None


def _claim_accuracy(results: pd.DataFrame) -> tuple[str, str, str]:
    claim = "SAIF steering reaches > 30 % strict accuracy"
    saif_test = results[results["method"] == "saif"]
    if saif_test.empty:
        return claim, NOT_TESTED, "no SAIF test rows"
    above = saif_test[saif_test["strict_acc"] > 0.30]
    evidence = "; ".join(f"{r['task']} {ci_cell(r, 'strict')} (n={r['n']})" for r in saif_test.to_dict("records"))
    status = "confirmed" if len(above) * 2 >= len(saif_test) else "not confirmed"
    return claim, status, f"{len(above)} of {len(saif_test)} tasks above 0.30 — {evidence}"


def _claim_final_layer(sweep: pd.DataFrame, layers: list[int], k_start: int) -> tuple[str, str, str]:
    claim = "The final layer steers best"
    first = _first_position(sweep)
    stage1 = alpha_curve(sweep, k_start, first) if first is not None else sweep.iloc[:0]
    if stage1["layer"].nunique() < 2:
        return claim, NOT_TESTED, "fewer than two layers swept"
    best = _argmax_per_task(stage1, "layer")
    final = max(layers)
    n_final = sum(layer == final for layer in best.values())
    status = NOT_TESTED if not best else "confirmed" if n_final * 2 > len(best) else "not confirmed"
    return claim, status, (f"best val layer per task (k={k_start}, tasks where the layer made no difference left "
                           f"out): {best}; final SAE layer {final}")


def _claim_k(sweep: pd.DataFrame, results: pd.DataFrame) -> tuple[str, str, str]:
    claim = "An optimum near ~15 latents"
    first = _first_position(sweep)
    curve = k_curve(sweep, results, first) if first is not None else sweep.iloc[:0]
    best_k = {}
    for _, g in curve.groupby("task"):
        best_k |= _argmax_per_task(g, "k")
    if not best_k:
        return claim, NOT_TESTED, "k was not swept"
    median = float(np.median(list(best_k.values())))
    return claim, "confirmed" if 10 <= median <= 20 else "not confirmed", (
        f"best val k per task (at its chosen layer and α; flat tasks left out): {best_k}; median {median:g}")


def _claim_post_vs_pre(sweep: pd.DataFrame, results: pd.DataFrame) -> tuple[str, str, str]:
    claim = "Post-instruction extraction steers better than pre"
    pairs = pre_post_pairs(sweep, results[results["method"] == "saif"])
    post_vs_pre = {}
    for task, g in pairs.groupby("task"):
        by_position = g.set_index("position")
        if set(POSITIONS) <= set(by_position.index):  # (post, pre)
            post_vs_pre[task] = tuple(float(selection_objective(by_position.loc[[p]]).iloc[0]) for p in POSITIONS)
    if not post_vs_pre:
        return claim, NOT_TESTED, "no pre-position condition evaluated"
    decided = {t: post > pre for t, (post, pre) in post_vs_pre.items() if post != pre}
    wins = sum(decided.values())
    detail = "; ".join(f"{t} {p:.2f} vs {q:.2f}" for t, (p, q) in post_vs_pre.items())
    status = NOT_TESTED if not decided else "confirmed" if wins * 2 > len(decided) else "not confirmed"
    return claim, status, f"val strict+loose (degenerate = fail), post vs pre at the chosen config: {detail}"


def environment(profile: Profile, model_key: str, sae_keys: dict[int, str], repo_root: Path = REPO_ROOT) -> pd.DataFrame:
    """Package versions, machine, device, model and SAE hashes and the git commit, as (item, value) rows."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    device = torch.cuda.get_device_name(0) if profile.device == "cuda" and torch.cuda.is_available() else "CPU"
    rows = [("profile", f"{profile.name} — {profile.description}"), ("model", f"{profile.model.hf_id} ({model_key})"),
            ("device", f"{device}; {torch.get_num_threads()} torch threads"),
            ("machine", f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}"),
            ("python", platform.python_version()), ("git commit", commit)]
    rows += [(f"SAE layer {layer}", key) for layer, key in sorted(sae_keys.items())]
    for package in PACKAGES:
        try:
            rows.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    return pd.DataFrame(rows, columns=["item", "value"])


def write_report(markdown: str, output_dir: Path, title: str) -> tuple[Path, Path]:
    """Write `report.md` and a self-contained `report.html` (figures referenced relative to the run folder)."""
    import mistune

    md_path, html_path = output_dir / "report.md", output_dir / "report.html"
    body = mistune.create_markdown(plugins=["table"])(markdown)
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
            "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}"
            "img{max-width:100%}</style></head><body>" + body + "</body></html>")
    for path, text in ((md_path, markdown), (html_path, html)):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return md_path, html_path


def report_markdown(run_dir: Path, profile: Profile, claims: pd.DataFrame, env: pd.DataFrame, date: str) -> str:
    """The whole report as markdown, from the tables the stages wrote under `run_dir` (a missing stage is named,
    not skipped silently)."""
    run_dir = Path(run_dir)
    parts = [f"# SAIF run report — profile `{profile.name}` ({date})", "",
             f"{profile.description} Every number below is read from a table in this folder; file names are given "
             "with each section. Accuracies are fractions of test prompts with 95 % bootstrap CIs; a degenerate response "
             "(a loop, a token flood, gibberish — `saif_utils/degeneracy.py`) fails whatever its checker says, and the "
             "checker's raw verdict is kept as a secondary column.", "",
             "## The paper's claims, measured here — `06_report/claims.csv`", "", markdown_table(claims), "",
             *tables_markdown(run_dir), *dashboards_markdown(run_dir), *agreement_markdown(), "## Figures", ""]
    for stage, names in FIGURES.items():
        for name in names:
            if (run_dir / stage / name).is_file():
                parts += [f"**{stage}/{name}**", "", f"![{name}]({stage}/{name})", ""]
    timings = run_dir / "timings.csv"
    parts += ["## Run time and peak memory per stage — `timings.csv`", ""]
    if timings.is_file():
        table = pd.read_csv(timings)
        table = table[[c for c in ("stage", "seconds", "peak_rss_mb") if c in table]]
        parts += [markdown_table(table, ".1f"), "", f"Total of the stages listed: {table['seconds'].sum() / 60:.1f} min "
                  "(the report's own stage is recorded after it finishes). `peak_rss_mb`: the notebook kernel's peak "
                  "resident memory (Linux `VmHWM`), imports included.", ""]
    else:
        parts += ["*timings.csv is missing (notebooks run by hand rather than through `make reproduce`).*", ""]
    parts += ["## Environment — `06_report/environment.csv`", "", markdown_table(env), ""]
    return "\n".join(parts)


def dashboards_markdown(run_dir: Path) -> list[str]:
    """Links to notebook 03's latent dashboards, each at the layer the steering stage chose for SAIF on that task."""
    folder = Path(run_dir) / "03_semantic_proximity" / "dashboards"
    title = "## Latent dashboards — `03_semantic_proximity/dashboards/`"
    pages = sorted(p for p in folder.glob("*.html") if p.name != "index.html")
    if not pages:
        return [title, "", "*No dashboards: run notebook 03 for this output folder.*", ""]
    results = Path(run_dir) / "05_steering_sweeps" / "results.csv"
    chosen = {}
    if results.is_file():
        table = pd.read_csv(results)
        chosen = dict(zip(table.loc[table["method"] == "saif", "task"].str.replace(":", "_"),
                          table.loc[table["method"] == "saif", "layer"].astype(int)))
    links = [f"- [{p.stem}](03_semantic_proximity/dashboards/{p.name}"
             + (f"#layer-{chosen[p.stem]}) — at layer {chosen[p.stem]}, where the steering stage chose SAIF's vector"
                if p.stem in chosen else ")") for p in pages]
    return [title, "", "Per selected latent: top-activating held-out contexts, activation histogram, logit-lens tokens "
            "and consistency by variant language and kind.", "", *links, ""]


def sae_quality_table(metrics: pd.DataFrame) -> str:
    """Markdown: one row per SAE (family, layer) with its held-out reconstruction and spliced cross-entropy numbers,
    explained variance, CE increase and CE recovered with 95 % CIs over texts (n texts in the headers)."""
    metrics = metrics.copy()
    for name in ("explained_variance", "ce_increase", "ce_recovered"):
        if f"{name}_ci_low" in metrics:  # tables written before the CIs existed show the value alone
            metrics[name] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                             zip(metrics[name], metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"])]
    columns = ["family", "layer", "d_sae", "k", "n_texts", "n_tokens", "explained_variance", "l0", "dead_frac",
               "n_ce_texts", "n_ce_predictions", "ce_clean", "ce_spliced", "ce_increase", "ce_recovered", "kl",
               "meets_targets", "source"]
    return markdown_table(metrics[[c for c in columns if c in metrics]])


def tables_markdown(run_dir: Path) -> list[str]:
    """The headline tables of a run — steering, ablation, SAE quality, discovery — as markdown sections, each naming
    the file it was read from."""
    sections = [
        ("Steering (test split) — `05_steering_sweeps/results.csv`", "05_steering_sweeps/results.csv", steering_table),
        ("Diff-in-means against spans of SAE decoder directions, val split — `05_steering_sweeps/decomposition.csv`",
         "05_steering_sweeps/decomposition.csv", decomposition_table),
        ("Does the calibration objective track following? — `05_steering_sweeps/calibration_diagnosis.csv`",
         "05_steering_sweeps/calibration_diagnosis.csv", diagnosis_table),
        ("Causal ablation (instruction in the prompt) — `04_causal_ablation/ablation.csv`",
         "04_causal_ablation/ablation.csv", ablation_table),
        ("SAE quality, every SAE family on the same held-out text — `01_sae_loading/sae_metrics.csv`",
         "01_sae_loading/sae_metrics.csv", sae_quality_table),
        ("Feature discovery, post position, content contrast — `02_feature_discovery/summary.csv`",
         "02_feature_discovery/summary.csv",
         lambda df: markdown_table(df[(df["position"] == "post") & (df["contrast"] == "content")][
             ["task", "layer", "n_pairs", "n_consistent", "max_consistency", "bootstrap_jaccard", "bootstrap_ci_low",
              "bootstrap_ci_high", "n_bootstrap", "paraphrase_vs_translation_jaccard", "pre_vs_post_jaccard"]])),
    ]
    parts = []
    for title, name, render in sections:
        parts += [f"## {title}", ""]
        path = Path(run_dir) / name
        if path.is_file():
            parts += [render(pd.read_csv(path)), ""]
        else:
            parts += [f"*{name} is missing: run that notebook for this output folder.*", ""]
    return parts


def agreement_markdown(path: Path = AGREEMENT_PATH) -> list[str]:
    """The judges' precision and recall against the human-read responses (held-out fold), as a markdown section."""
    title = f"## The judges against human-read responses — `data/labels/{path.name}`"
    if not path.is_file():
        return [title, "", f"*{path} is missing: run `python tools/label_sample.py agreement`.*", ""]
    table = pd.read_csv(path)
    rows = ["| judge | n | judge / label positives | precision [95 % CI] | recall [95 % CI] |", "|---|---|---|---|---|"]
    for row in table[table["fold"] == "heldout"].to_dict("records"):
        rows.append(f"| {row['judge']} | {row['n']} | {row['n_judge_positive']} / {row['n_label_positive']} | "
                    f"{ci_cell(row, 'precision')} | {ci_cell(row, 'recall')} |")
    return [title, "", "Held-out half of the labelled sample (the thresholds were set on the other half); how the "
            "responses were read is in `data/labels/README.md`.", "", *rows, ""]


def family_results(profile: Profile, run_root: Path, results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """SAE family → test results: this run's, and those of sibling runs (same outputs folder) of the profiles that run
    the same study on the model's other SAE families (e.g. `default` and `default-4x`)."""
    out = {profile.sae_family: results} if profile.sae_family else {}
    for other in PROFILES.values():
        if (other.sae_family and other.sae_family not in out and other.model == profile.model
                and other.stage_defaults == profile.stage_defaults):
            path = Path(run_root).parent / other.name / "05_steering_sweeps" / "results.csv"
            if path.is_file():
                out[other.sae_family] = pd.read_csv(path)
    return out


@dataclass(frozen=True)
class ReportResult:
    """The claims table, the environment table, the report's markdown and where it was written."""

    claims: pd.DataFrame
    environment: pd.DataFrame
    markdown: str
    paths: tuple[Path, Path]


def run(profile: Profile, run_dir: RunDir, date: str | None = None) -> ReportResult:
    """Judge the claims on the steering stage's tables, record the environment and write the report."""
    out = run_dir.stage(NAME)
    saes = run_dir.saes(profile.device)
    results = run_dir.table("05_steering_sweeps", "results.csv")
    sweep = run_dir.table("05_steering_sweeps", "sweep.parquet")
    swept_with = run_dir.config("05_steering_sweeps")  # what 05 ran with, not what the profile would give today
    decomposition = run_dir.root / "05_steering_sweeps" / "decomposition.csv"
    claims = claims_table(results, sweep, sorted(saes), swept_with["k_start"],
                          family_results(profile, run_dir.root, results),
                          pd.read_csv(decomposition) if decomposition.is_file() else None)
    env = environment(profile, model_fingerprint(profile), {layer: sae_fingerprint(s) for layer, s in saes.items()})
    write_table(claims, out / "claims.csv")
    write_table(env, out / "environment.csv")
    markdown = report_markdown(run_dir.root, profile, claims, env, date or datetime.date.today().isoformat())
    return ReportResult(claims, env, markdown, write_report(markdown, run_dir.root, f"SAIF report — {profile.name}"))
