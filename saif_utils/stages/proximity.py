"""Semantic proximity: are the selected latents *about* the instruction? Each latent's decoder direction is read
through the logit lens and compared (cosine) with the model's own representation of the instruction, beside a
random-latent control of the same size; the task × task overlap of the selections shows shared latents."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ..context import RunContext
from ..dashboards import write_dashboards
from ..io import write_table
from ..latent_stats import jaccard
from ..saes import neuronpedia_ids
from ..semantics import cosine, instruction_directions, is_french_related, logit_lens

NAME = "03_semantic_proximity"


@dataclass(frozen=True)
class ProximityConfig:
    """Knobs of the semantic proximity stage."""

    profile_key: ClassVar[str] = "proximity"
    top_n: int = 20
    """Logit-lens tokens kept per latent (top and bottom)."""
    overlap_k: int = 15
    """Selection size for the task × task overlap matrix."""
    n_contents: int = 20
    """Train passages whose content-only residual is subtracted from the instruction's."""
    seed: int = 0
    """Seed of the random-latent control."""
    dashboard_k: int = 15
    """Latents per task and layer on the dashboards (the steering uses up to 15)."""

    def __post_init__(self) -> None:
        for name in ("top_n", "overlap_k", "n_contents", "dashboard_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")


@dataclass(frozen=True)
class ProximityResult:
    """One row per selected and per control latent (`proximity`), the task × task overlap (`overlap`) and the
    latent dashboard page of each task (`dashboards`)."""

    proximity: pd.DataFrame
    overlap: pd.DataFrame
    dashboards: dict[str, Path]


def run(ctx: RunContext, cfg: ProximityConfig) -> ProximityResult:
    """Logit lens and instruction cosine of every selected latent and its random control; task overlap."""
    selected = ctx.run.selected_latents(contrast=None)
    variants = ctx.data.variants()
    passages = ctx.data.passages()
    contents = passages[passages["split"] == "train"]["text"].head(cfg.n_contents).tolist()
    instructions = {t: g["text"].tolist() for t, g in variants[variants["task"].isin(selected["task"])].groupby("task")}
    inst_dirs = instruction_directions(ctx, instructions, contents)
    proximity = proximity_table(ctx, selected, inst_dirs, cfg)
    out = ctx.run.stage(NAME)
    ctx.run.write_config(NAME, cfg)
    write_table(proximity, out / "proximity.parquet")
    write_table(overlap := overlap_matrix(selected, cfg.overlap_k), out / "task_overlap.csv")
    pages = write_dashboards(ctx, selected, proximity, ctx.run.table("02_feature_discovery", "breakdown_by_variant.csv"),
                             out, cfg.dashboard_k)
    return ProximityResult(proximity, overlap, pages)


def random_control(selected: pd.DataFrame, d_sae: dict[int, int], seed: int = 0) -> pd.DataFrame:
    """For every selection, the same number of latents drawn uniformly at random (excluding the selected ones)."""
    rng = np.random.default_rng(seed)
    rows = []
    for keys, group in selected.groupby(["task", "layer", "position", "contrast"]):
        pool = np.setdiff1d(np.arange(d_sae[keys[1]]), group["latent"].to_numpy())
        for rank, latent in enumerate(rng.choice(pool, size=len(group), replace=False), 1):
            rows.append(dict(zip(["task", "layer", "position", "contrast"], keys)) | {"rank": rank, "latent": int(latent)})
    return pd.DataFrame(rows)


def proximity_table(ctx: RunContext, selected: pd.DataFrame, inst_dirs: dict[int, dict[str, torch.Tensor]],
                    cfg: ProximityConfig) -> pd.DataFrame:
    """One row per selected latent and per random-control latent: `cfg.top_n` logit-lens tokens, French-token flag,
    cosine with the task's instruction representation and (for released SAEs) a Neuronpedia URL."""
    model, saes, top_n, neuronpedia = ctx.model, ctx.saes, cfg.top_n, neuronpedia_ids(ctx.profile)
    control = random_control(selected, {layer: sae.cfg.d_sae for layer, sae in saes.items()}, cfg.seed)
    both = pd.concat([selected.assign(control=False), control.assign(control=True)], ignore_index=True)
    parts = []
    for layer, group in both.groupby("layer"):
        W_dec = saes[layer].W_dec.detach()
        dirs = W_dec[group["latent"].to_numpy(copy=True)]  # writable: torch warns on a read-only index
        lens = logit_lens(model, dirs, top_n, ctx.remote)
        base_task = group["task"].str.split(":").str[0]
        cos = [cosine(dirs[i:i + 1], inst_dirs[layer][t])[0] if t in inst_dirs[layer] else np.nan
               for i, t in enumerate(group["task"])]
        part = group.assign(top_tokens=[" | ".join(x["top_tokens"]) for x in lens],
                            bottom_tokens=[" | ".join(x["bottom_tokens"]) for x in lens],
                            french_top_tokens=[sum(map(is_french_related, x["top_tokens"])) for x in lens],
                            cos_instruction=cos, base_task=base_task)
        if neuronpedia and neuronpedia.get(layer):
            part["neuronpedia_url"] = [f"https://www.neuronpedia.org/{neuronpedia[layer]}/{int(j)}" for j in part["latent"]]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def overlap_matrix(selected: pd.DataFrame, k: int) -> pd.DataFrame:
    """Task × task Jaccard of the top-k selections, per (layer, position, contrast) → tidy DataFrame."""
    rows = []
    for (layer, position, contrast), group in selected.groupby(["layer", "position", "contrast"]):
        sets = {t: g.nsmallest(k, "rank")["latent"] for t, g in group.groupby("task")}
        for a in sets:
            for b in sets:
                rows.append({"layer": layer, "position": position, "contrast": contrast, "task_a": a, "task_b": b,
                             "jaccard": jaccard(sets[a], sets[b])})
    return pd.DataFrame(rows)


def french_tokens(proximity: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """For `translate_fr` (content contrast): French-related logit-lens tokens per latent by layer, selected against
    random, and the selected latents with any, most first; None when translate_fr was not analysed."""
    fr = proximity[(proximity["contrast"] == "content") & (proximity["task"] == "translate_fr")]
    if fr.empty:
        return None
    fr = fr.assign(which=fr["control"].map({False: "selected", True: "random"}))
    by_layer = fr.groupby(["layer", "which"])["french_top_tokens"].agg(["mean", "max", "count"]).unstack("which")
    hits = fr[(fr["which"] == "selected") & (fr["french_top_tokens"] > 0)].sort_values("french_top_tokens",
                                                                                       ascending=False)
    return by_layer, hits[["layer", "position", "rank", "latent", "french_top_tokens", "top_tokens"]].head(10)


def cosine_summary(proximity: pd.DataFrame) -> pd.DataFrame:
    """Mean cosine with the instruction representation and n per task and layer, selected beside random (content
    contrast)."""
    view = proximity[proximity["contrast"] == "content"].assign(
        which=lambda d: d["control"].map({False: "selected", True: "random"}))
    return view.groupby(["task", "layer", "which"])["cos_instruction"].agg(["mean", "count"]).unstack("which")
