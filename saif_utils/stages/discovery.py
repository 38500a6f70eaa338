"""Feature discovery: SAE latents that fire when an instruction is present, whatever its wording or language.

Every train passage is paired with every instruction variant (paraphrases and translations) at each placement,
contrasted with the passage alone (and, for tasks with siblings, with the sibling instructions), and every latent of
every SAE is scored (`latent_stats`). The same residuals give the diff-in-means baseline directions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from .. import latent_stats
from ..activations import READ_POSITIONS, encode, read_prompt_residuals
from ..context import RunContext
from ..data import POSITIONS, build_prompts, check_position, sample_passages
from ..io import cached_frames, content_hash, sha256_file, write_table
from ..latent_stats import breakdown, build_pairs, jaccard, robustness, score_table
from ..progress import tqdm
from ..selection import DirectionKey, diff_in_means, save_directions

NAME = "02_feature_discovery"


@dataclass(frozen=True)
class DiscoveryConfig:
    """Knobs of the discovery stage."""

    profile_key: ClassVar[str] = "discovery"

    n_passages: int = 24
    """Train passages used (a seeded sample); every variant is paired with every one of them."""
    positions: tuple[str, ...] = POSITIONS
    """Instruction placements to analyse separately."""
    read_at: str = "last_prompt"
    """Token read: 'last_prompt' (end of the generation prompt), 'end_user' or 'last_instruction'."""
    fire_threshold: float = 0.0
    """A latent 'fires' when its activation exceeds this."""
    negative_ratio: float = 0.25
    """For consistency, the negative's activation must stay ≤ this fraction of the positive's."""
    top_k: int = 30
    """Latents kept per (task, layer, position, contrast) in selected_latents.csv."""
    jaccard_k: int = 15
    """Selection size compared in the robustness checks."""
    n_bootstrap: int = 50
    """Bootstrap resamples over passages for the top-k overlap."""
    seed: int = 0
    """Seed for the passage sample and the bootstrap."""
    tasks: tuple[str, ...] | None = None
    """Base tasks to analyse (their siblings are added as contrasts); None → every task in the data."""

    def __post_init__(self) -> None:
        if self.read_at not in READ_POSITIONS:
            raise ValueError(f"read_at={self.read_at!r}; allowed: {list(READ_POSITIONS)}")
        for position in self.positions:
            check_position(position, "positions")
        for name in ("n_passages", "top_k", "jaccard_k", "n_bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks=() selects nothing; pass None for every task or name at least one")
        if not 0 <= self.negative_ratio < 1:
            raise ValueError(f"negative_ratio={self.negative_ratio} must lie in [0, 1)")


@dataclass(frozen=True)
class DiscoveryResult:
    """What the stage wrote: the prompts it scored, every latent's statistics, the selections, their robustness and
    the diff-in-means directions."""

    prompts: pd.DataFrame
    latent_scores: pd.DataFrame
    selected_latents: pd.DataFrame
    robustness: pd.DataFrame
    breakdown: pd.DataFrame
    summary: pd.DataFrame
    directions: dict[DirectionKey, torch.Tensor]

    @property
    def focus_task(self) -> str:
        """The task the figures zoom in on: translate_fr when it was analysed, else the first task."""
        tasks = sorted(self.selected_latents["task"].unique())
        return "translate_fr" if "translate_fr" in tasks else tasks[0]

    @property
    def focus_layer(self) -> int:
        """The focus task's layer with the most instruction-consistent latents (ties → the more stable selection)."""
        main = self.summary[(self.summary["contrast"] == "content") & (self.summary["task"] == self.focus_task)]
        return int(main.sort_values(["n_consistent", "bootstrap_jaccard"], ascending=False)["layer"].iloc[0])


def select_variants(variants: pd.DataFrame, tasks: dict, wanted: Sequence[str] | None) -> pd.DataFrame:
    """Variants of the `wanted` base tasks plus their siblings (all variants when `wanted` is None)."""
    if wanted is None:
        return variants
    unknown = sorted(set(wanted) - set(tasks))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; allowed: {sorted(tasks)}")
    keep = set(wanted) | {s for t in wanted for s in tasks[t].siblings}
    return variants[variants["base_task"].isin(keep)].reset_index(drop=True)


def discover(ctx: RunContext, cfg: DiscoveryConfig, variants: pd.DataFrame | None = None,
             passages: pd.DataFrame | None = None) -> DiscoveryResult:
    """Build the contrastive prompts, score every latent, select the top-k, measure robustness and compute the
    diff-in-means directions, in memory. `variants` and `passages` default to the run's data sources; passages are
    sampled from the `train` split."""
    tasks = ctx.data.tasks()
    variants = select_variants(ctx.data.variants() if variants is None else variants, tasks, cfg.tasks)
    passages = sample_passages(ctx.data.passages() if passages is None else passages, "train", cfg.n_passages, cfg.seed)
    prompts = build_prompts(ctx.tokenizer, variants, passages, cfg.positions)
    frames = score_latents(ctx, prompts, tasks, cfg)
    if frames["selected_latents"].empty:  # nothing later stages could steer or ablate with
        raise ValueError(f"no latent of the SAEs at layers {sorted(ctx.saes)} fires more with the instruction than "
                         f"without it for tasks {sorted(set(variants['base_task']))}: check that the SAEs were trained "
                         f"on this model's residual stream at those layers")
    resid = read_prompt_residuals(ctx, prompts, cfg.read_at)
    return DiscoveryResult(prompts=prompts, **frames, summary=summary_table(frames),
                           directions=diff_in_means(prompts, resid, cfg.positions))


def run(ctx: RunContext, cfg: DiscoveryConfig) -> DiscoveryResult:
    """`discover` on the run's data, with every table and the directions written into the stage folder."""
    result = discover(ctx, cfg)
    out = ctx.run.stage(NAME)
    files = {"latent_scores.parquet": result.latent_scores, "selected_latents.csv": result.selected_latents,
             "robustness.csv": result.robustness, "breakdown_by_variant.csv": result.breakdown,
             "summary.csv": result.summary}
    for name, table in files.items():
        write_table(table, out / name)
    save_directions(result.directions, out / "diff_in_means.safetensors")
    ctx.run.write_config(NAME, cfg)
    return result


def score_latents(ctx: RunContext, prompts: pd.DataFrame, tasks: dict, cfg: DiscoveryConfig) -> dict[str, pd.DataFrame]:
    """Score every latent of every SAE for every target task, position and contrast, cached by everything the scores
    depend on: DataFrames `latent_scores`, `selected_latents`, `robustness` and `breakdown` (by variant language and
    kind)."""
    columns = ["prompt_id", "task", "position", "label", "input_ids", READ_POSITIONS[cfg.read_at]]
    key = {"model": ctx.model_key, "saes": ctx.sae_keys, "prompts": content_hash(prompts[columns].to_dict("list")),
           "tasks": {name: asdict(task) for name, task in sorted(tasks.items())}, "config": asdict(cfg),
           # any change to the scoring code recomputes the scores
           "code": content_hash([sha256_file(__file__), sha256_file(latent_stats.__file__)])}
    return cached_frames("discovery", key, lambda: _score_latents(ctx, prompts, tasks, cfg))


def _score_latents(ctx: RunContext, prompts: pd.DataFrame, tasks: dict, cfg: DiscoveryConfig) -> dict[str, pd.DataFrame]:
    """`score_latents` without the cache."""
    saes = ctx.saes
    resid = read_prompt_residuals(ctx, prompts, cfg.read_at)
    present = [t for t in prompts["task"].dropna().unique()]
    targets = sorted(t for t in present if tasks[t.split(":")[0]].role == "target")
    if not targets:
        raise ValueError("no target task among the prompts; check instructions_path and tasks.jsonl")
    scores, selected, robust, breakdowns = [], [], [], []
    tops: dict[tuple, np.ndarray] = {}
    jobs = [(layer, task, position) for layer in saes for task in targets for position in cfg.positions]
    acts_by_layer = {layer: encode(sae, resid[layer]) for layer, sae in saes.items()}
    for layer, task, position in tqdm(jobs, desc="scoring latents"):
        siblings = [s for s in tasks[task.split(":")[0]].siblings if s in present]
        for contrast in ("content", "sibling") if siblings else ("content",):
            keys = {"task": task, "layer": layer, "position": position, "contrast": contrast}
            pairs = build_pairs(prompts, acts_by_layer[layer], task, position, contrast, siblings)
            table = score_table(pairs, cfg)
            scores.append(table.assign(**keys))
            top = table[table["score"] > 0].nsmallest(cfg.top_k, "rank")
            tops[(task, layer, position, contrast)] = top["latent"].to_numpy()
            selected.append(top[["rank", "latent", "mean_diff", "consistency", "score"]]
                            .rename(columns={"mean_diff": "weight"}).assign(**keys))
            robust += [r | keys for r in robustness(pairs, cfg, top["latent"].to_numpy())]
            breakdowns.append(breakdown(pairs, top["latent"][: cfg.jaccard_k], cfg).assign(**keys))
    if set(POSITIONS) <= set(cfg.positions):
        for (task, layer, position, contrast), top in tops.items():
            if position == "post":
                other = tops[(task, layer, "pre", contrast)]
                robust.append({"metric": "pre_vs_post_jaccard", "value": jaccard(top[: cfg.jaccard_k], other[: cfg.jaccard_k]),
                               "ci_low": np.nan, "ci_high": np.nan, "n": np.nan, "n_pairs": np.nan, "k": cfg.jaccard_k,
                               "task": task, "layer": layer, "position": "post|pre", "contrast": contrast})
    order = ["task", "layer", "position", "contrast"]
    latent_scores = pd.concat(scores, ignore_index=True)
    latent_scores = latent_scores[order + [c for c in latent_scores.columns if c not in order]]
    selected_latents = pd.concat(selected, ignore_index=True)
    selected_latents = selected_latents[order + ["rank", "latent", "weight", "consistency", "score"]]
    robustness_df = pd.DataFrame(robust)
    robustness_df = robustness_df[order + [c for c in robustness_df.columns if c not in order]]
    return {"latent_scores": latent_scores, "selected_latents": selected_latents, "robustness": robustness_df,
            "breakdown": pd.concat(breakdowns, ignore_index=True)}


def summary_table(results: dict[str, pd.DataFrame], consistency_min: float = 0.5) -> pd.DataFrame:
    """One row per (task, layer, position, contrast): pairs, latents with consistency ≥ `consistency_min`, and the
    robustness metrics side by side."""
    keys = ["task", "layer", "position", "contrast"]
    scores = results["latent_scores"]
    counts = (scores.assign(consistent=(scores["consistency"] >= consistency_min) & (scores["score"] > 0))
              .groupby(keys).agg(n_pairs=("n_pairs", "first"), n_consistent=("consistent", "sum"),
                                 max_consistency=("consistency", "max")).reset_index())
    robust = results["robustness"]
    wide = robust[robust["metric"] != "pre_vs_post_jaccard"].pivot_table(
        index=keys, columns="metric", values="value", aggfunc="first").reset_index()
    boot = robust[robust["metric"] == "bootstrap_jaccard"][keys + ["ci_low", "ci_high", "n"]].rename(
        columns={"ci_low": "bootstrap_ci_low", "ci_high": "bootstrap_ci_high", "n": "n_bootstrap"})
    out = counts.merge(wide, on=keys, how="left").merge(boot, on=keys, how="left")
    pre_post = robust[robust["metric"] == "pre_vs_post_jaccard"][["task", "layer", "contrast", "value"]].rename(
        columns={"value": "pre_vs_post_jaccard"})
    return out.merge(pre_post, on=["task", "layer", "contrast"], how="left")


def sibling_overlap(selected: pd.DataFrame, k: int) -> pd.DataFrame:
    """Jaccard between the top-k selections against content-only and against content+sibling negatives."""
    rows = []
    for (task, layer, position), group in selected.groupby(["task", "layer", "position"]):
        by = {c: g.nsmallest(k, "rank")["latent"] for c, g in group.groupby("contrast")}
        if "sibling" in by:
            rows.append({"task": task, "layer": layer, "position": position,
                         "content_vs_sibling_jaccard": jaccard(by["content"], by["sibling"])})
    return pd.DataFrame(rows)
