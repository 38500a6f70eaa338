"""Contrastive latent statistics: which SAE latents fire with an instruction and not without it, and how stable
that selection is.

Every positive prompt (passage + instruction variant) is paired with a negative (the passage alone, or the strongest
sibling instruction), and every latent is scored over the pairs:

* `freq_pos`, `freq_neg` — firing frequency (activation > `fire_threshold`) on positives and on their negatives;
* `mean_diff` — mean activation on positives minus on negatives (activation units of the SAE);
* `consistency` — fraction of pairs where the latent fires on the positive and stays at most
  `negative_ratio` × that activation on the negative ("fires with the instruction, not without");
* `effect_size` — `mean_diff` divided by the pooled standard deviation of the latent over positives and negatives;
* `score = consistency × tanh(max(effect_size, 0))` — reliable *and* strong. Latents are ranked on the score rounded
  to `SCORE_DIGITS` significant digits, then on the effect size rounded alike, then by latent index.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from .stats import round_significant

CONTRASTS = ("content", "sibling")
"""Negatives: the passage alone, or the element-wise maximum over it and the sibling tasks' prompts."""
SCORE_DIGITS = 4
"""Significant digits of the score and effect size a ranking reads, so that float32 statistics that differ between
CPUs in their last bits rank alike. tanh saturates for strong latents: among latents of equal consistency, scores then
differ only in late digits (on the default profile a third of the selections hold two top scores less than 1e-4
apart, some exactly equal), and the rounded scores tie; the effect size, which does not saturate, orders them."""


class ScoreSettings(Protocol):
    """The knobs the statistics read (a stage config provides them)."""

    fire_threshold: float
    negative_ratio: float
    jaccard_k: int
    n_bootstrap: int
    seed: int


def latent_stats(pos_acts: torch.Tensor, neg_acts: torch.Tensor, fire_threshold: float = 0.0,
                 negative_ratio: float = 0.25) -> dict[str, np.ndarray]:
    """Per-latent statistics over aligned pairs: `pos_acts[i]` is a positive, `neg_acts[i]` its negative `[n, d_sae]`."""
    fires_pos = pos_acts > fire_threshold
    fires_neg = neg_acts > fire_threshold
    mean_diff = pos_acts.mean(0) - neg_acts.mean(0)
    pooled_std = torch.sqrt((pos_acts.var(0, unbiased=False) + neg_acts.var(0, unbiased=False)) / 2)
    # A latent that separates perfectly with zero spread gets a huge (finite) effect rather than a division by zero.
    effect = mean_diff / pooled_std.clamp_min(1e-6)
    consistent = fires_pos & (neg_acts <= negative_ratio * pos_acts)
    consistency = consistent.float().mean(0)
    return {"freq_pos": fires_pos.float().mean(0).numpy(), "freq_neg": fires_neg.float().mean(0).numpy(),
            "mean_diff": mean_diff.numpy(), "effect_size": effect.numpy(), "consistency": consistency.numpy(),
            "score": (consistency * torch.tanh(effect.clamp_min(0))).numpy()}


def rank_latents(score: np.ndarray, effect_size: np.ndarray) -> np.ndarray:
    """Latent indices by descending score, then descending effect size (both rounded to `SCORE_DIGITS`), then index."""
    return np.lexsort((np.arange(len(score)), -round_significant(effect_size, SCORE_DIGITS),
                       -round_significant(score, SCORE_DIGITS)))


def jaccard(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two latent sets (NaN when both are empty: nothing was selected to compare)."""
    a, b = set(map(int, a)), set(map(int, b))
    return len(a & b) / len(a | b) if a | b else float("nan")


@dataclass(frozen=True)
class PairSet:
    """Aligned positive/negative latent activations for one (task, layer, position, contrast)."""

    pos: torch.Tensor  # [n_pairs, d_sae]
    neg: torch.Tensor  # [n_pairs, d_sae]
    meta: pd.DataFrame  # one row per pair: passage_id, variant_id, language, kind


def build_pairs(prompts: pd.DataFrame, acts: torch.Tensor, task: str, position: str, contrast: str,
                siblings: Sequence[str] = ()) -> PairSet:
    """Pair each positive of `task` at `position` with its passage's negative.

    With `contrast='sibling'` the negative is the element-wise maximum over the content-only prompt and the sibling
    tasks' prompts for the same passage and position, so a latent must beat the strongest distractor.
    """
    row_of = {pid: i for i, pid in enumerate(prompts["prompt_id"])}
    positives = prompts[(prompts["task"] == task) & (prompts["position"] == position)]
    if positives.empty:
        raise ValueError(f"no prompts for task={task!r} at position={position!r}")
    negatives = prompts[prompts["label"] == "negative"].set_index("passage_id")
    neg_vec = {pid: acts[row_of[negatives.loc[pid, "prompt_id"]]] for pid in positives["passage_id"].unique()}
    if contrast == "sibling":
        if not siblings:
            raise ValueError(f"contrast='sibling' needs sibling tasks for {task!r}; tasks.jsonl lists none")
        sib = prompts[prompts["task"].isin(siblings) & (prompts["position"] == position)]
        for pid, group in sib.groupby("passage_id"):
            if pid in neg_vec:
                stacked = acts[[row_of[p] for p in group["prompt_id"]]]
                neg_vec[pid] = torch.maximum(neg_vec[pid], stacked.max(0).values)
    elif contrast != "content":
        raise ValueError(f"contrast={contrast!r}; allowed: {list(CONTRASTS)}")
    pos = acts[[row_of[p] for p in positives["prompt_id"]]]
    neg = torch.stack([neg_vec[pid] for pid in positives["passage_id"]])
    meta = positives[["passage_id", "variant_id", "language", "kind"]].reset_index(drop=True)
    return PairSet(pos, neg, meta)


def score_table(pairs: PairSet, cfg: ScoreSettings) -> pd.DataFrame:
    """All latents' statistics and rank for one pair set (one row per latent)."""
    stats = latent_stats(pairs.pos, pairs.neg, cfg.fire_threshold, cfg.negative_ratio)
    df = pd.DataFrame(stats)
    df.insert(0, "latent", np.arange(len(df)))
    df["rank"] = np.empty(len(df), dtype=int)
    df.loc[rank_latents(stats["score"], stats["effect_size"]), "rank"] = np.arange(1, len(df) + 1)
    df["n_pairs"] = len(pairs.meta)
    return df


def top_latents(pairs: PairSet, cfg: ScoreSettings, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Top-k latents by score (only those with a positive score), optionally on the pairs selected by `mask`."""
    if mask is not None:
        pairs = PairSet(pairs.pos[mask], pairs.neg[mask], pairs.meta[mask])
    stats = latent_stats(pairs.pos, pairs.neg, cfg.fire_threshold, cfg.negative_ratio)
    order = rank_latents(stats["score"], stats["effect_size"])[:k]
    return order[stats["score"][order] > 0]


def bootstrap_top_latents(pairs: PairSet, cfg: ScoreSettings, k: int, draws: np.ndarray) -> list[np.ndarray]:
    """`top_latents` on each bootstrap resample of passages, without copying pairs: `draws[b]` lists the passage
    indices (into the sorted unique passage ids) of resample b. Every statistic of `latent_stats` is a mean over
    pairs, so a resample is a weighting of per-passage sums — one matrix product for all resamples."""
    _, passage_of = np.unique(pairs.meta["passage_id"].to_numpy(), return_inverse=True)
    n_passages = int(passage_of.max()) + 1
    one_hot = torch.zeros((n_passages, len(passage_of)), dtype=torch.float64)
    one_hot[torch.as_tensor(passage_of), torch.arange(len(passage_of))] = 1.0
    pos, neg = pairs.pos.double(), pairs.neg.double()
    consistent = ((pairs.pos > cfg.fire_threshold) & (pairs.neg <= cfg.negative_ratio * pairs.pos)).double()
    sums = {name: one_hot @ value for name, value in
            {"pos": pos, "neg": neg, "pos2": pos ** 2, "neg2": neg ** 2, "consistent": consistent}.items()}
    counts = torch.stack([torch.bincount(torch.as_tensor(d), minlength=n_passages) for d in draws]).double()
    n = (counts @ one_hot.sum(1))[:, None]  # pairs per resample
    mean = {name: counts @ total / n for name, total in sums.items()}
    var_pos = (mean["pos2"] - mean["pos"] ** 2).clamp_min(0)
    var_neg = (mean["neg2"] - mean["neg"] ** 2).clamp_min(0)
    effect = (mean["pos"] - mean["neg"]) / torch.sqrt((var_pos + var_neg) / 2).clamp_min(1e-6)
    score = (mean["consistent"] * torch.tanh(effect.clamp_min(0))).float().numpy()
    effect = effect.float().numpy()
    tops = []
    for row, row_effect in zip(score, effect):
        order = rank_latents(row, row_effect)[:k]
        tops.append(order[row[order] > 0])
    return tops


def robustness(pairs: PairSet, cfg: ScoreSettings, full: np.ndarray | None = None) -> list[dict]:
    """Top-`jaccard_k` stability: bootstrap over passages, and paraphrase-only vs translation-only selections.

    `full` is the selection on all pairs when the caller already has it (it is recomputed otherwise).
    """
    k = cfg.jaccard_k
    full = top_latents(pairs, cfg, k) if full is None else np.asarray(full)[:k]
    passages = pairs.meta["passage_id"].to_numpy()
    unique = np.unique(passages)
    rng = np.random.default_rng(cfg.seed)
    draws = np.stack([rng.choice(len(unique), size=len(unique), replace=True) for _ in range(cfg.n_bootstrap)])
    boot = np.asarray([jaccard(full, top) for top in bootstrap_top_latents(pairs, cfg, k, draws)])
    boot = boot[~np.isnan(boot)]
    summary = (boot.mean(), np.quantile(boot, 0.025), np.quantile(boot, 0.975)) if len(boot) else (np.nan,) * 3
    out = [{"metric": "bootstrap_jaccard", "value": summary[0], "ci_low": summary[1], "ci_high": summary[2],
            "n": len(boot), "n_pairs": len(passages), "k": k, "n_selected": len(full)}]
    kinds = pairs.meta["kind"].to_numpy()
    if {"paraphrase", "translation"} <= set(kinds):
        para = top_latents(pairs, cfg, k, kinds == "paraphrase")
        trans = top_latents(pairs, cfg, k, kinds == "translation")
        out.append({"metric": "paraphrase_vs_translation_jaccard", "value": jaccard(para, trans),
                    "ci_low": np.nan, "ci_high": np.nan, "n": int((kinds == "translation").sum()),
                    "n_pairs": len(passages), "k": k, "n_selected": len(full)})
    return out


def breakdown(pairs: PairSet, latents: Sequence[int], cfg: ScoreSettings) -> pd.DataFrame:
    """Consistency and firing frequency of `latents`, split by variant language and kind (one row per group × latent)."""
    rows = []
    latents = list(map(int, latents))
    if not latents:  # nothing selected (a tiny profile's task/layer): no statistics over zero columns, no warning
        return pd.DataFrame(rows)
    for (language, kind), group in pairs.meta.groupby(["language", "kind"]):
        idx = group.index.to_numpy(copy=True)  # writable: torch warns on indexing with a read-only array
        stats = latent_stats(pairs.pos[idx][:, latents], pairs.neg[idx][:, latents], cfg.fire_threshold,
                             cfg.negative_ratio)
        for j, latent in enumerate(latents):
            rows.append({"language": language, "kind": kind, "latent": latent, "n_pairs": len(idx),
                         "consistency": stats["consistency"][j], "freq_pos": stats["freq_pos"][j],
                         "mean_diff": stats["mean_diff"][j]})
    return pd.DataFrame(rows)
