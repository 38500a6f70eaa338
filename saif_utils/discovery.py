"""Feature discovery: SAE latents that fire when an instruction is present, whatever its wording or language.

For every (passage, variant, position) positive and its content-only negative we read the residual at one token
position, encode it with each layer's SAE and score every latent:

* `freq_pos`, `freq_neg` — firing frequency (activation > `fire_threshold`) on positives and on their negatives;
* `mean_diff` — mean activation on positives minus on negatives (activation units of the SAE);
* `consistency` — fraction of pairs where the latent fires on the positive and stays at most
  `negative_ratio` × that activation on the negative ("fires with the instruction, not without");
* `effect_size` — `mean_diff` divided by the pooled standard deviation of the latent over positives and negatives;
* `score = consistency × tanh(max(effect_size, 0))` — reliable *and* strong; ties broken by latent index.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from .io import atomic_path, cache_root, cached_frames, content_hash, sha256_file
from .models import read_residual

READ_POSITIONS = {"last_prompt": "idx_last_prompt", "end_user": "idx_end_user", "last_instruction": "idx_last_instruction"}
CONTRASTS = ("content", "sibling")


@dataclass(frozen=True)
class DiscoveryConfig:
    """Knobs of the discovery stage; notebook 02's papermill parameters map onto these fields."""

    n_passages: int = 24
    """Train passages used (a seeded sample); every variant is paired with every one of them."""
    positions: tuple[str, ...] = ("post", "pre")
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
            if position not in ("post", "pre"):
                raise ValueError(f"positions contains {position!r}; allowed: 'post', 'pre'")
        for name in ("n_passages", "top_k", "jaccard_k", "n_bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks=() selects nothing; pass None for every task or name at least one")
        if not 0 <= self.negative_ratio < 1:
            raise ValueError(f"negative_ratio={self.negative_ratio} must lie in [0, 1)")


def select_variants(variants: pd.DataFrame, tasks: dict, wanted: Sequence[str] | None) -> pd.DataFrame:
    """Variants of the `wanted` base tasks plus their siblings (all variants when `wanted` is None)."""
    if wanted is None:
        return variants
    unknown = sorted(set(wanted) - set(tasks))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; allowed: {sorted(tasks)}")
    keep = set(wanted) | {s for t in wanted for s in tasks[t].siblings}
    return variants[variants["base_task"].isin(keep)].reset_index(drop=True)


def sample_passages(passages: pd.DataFrame, split: str, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of `n` passages from `split` (all of them when the split is smaller)."""
    pool = passages[passages["split"] == split]
    if pool.empty:
        raise ValueError(f"no passages in split {split!r}; check content_path")
    return pool.sample(n=min(n, len(pool)), random_state=seed).sort_values("passage_id").reset_index(drop=True)


def read_prompt_residuals(model, prompts: pd.DataFrame, layers: Sequence[int], read_at: str, model_key: str,
                          batch_size: int = 16, remote: bool = False) -> dict[int, torch.Tensor]:
    """Residual at `read_at` for every prompt → `{layer: [n_prompts, d_model]}`, cached on disk by content.

    The key covers the model weights, every prompt's token ids and the read index, so reruns with the same
    data reuse the forward passes and any change recomputes them. Locally, prompts that share a prefix run it once:
    post-position prompts (and the negative) of one passage share the system turn and the passage; pre-position
    prompts share the system turn (grouping them by variant measured slower: 12-prompt groups cost more in calls
    than their shared instruction saves).
    """
    column = READ_POSITIONS[read_at]
    index = prompts[column].where(prompts[column] >= 0, prompts["idx_last_prompt"]).astype(int).tolist()
    token_ids = [list(ids) for ids in prompts["input_ids"]]
    groups = [("pre",) if pos == "pre" else ("post", p) for pos, p in zip(prompts["position"], prompts["passage_id"])]
    key = content_hash({"model": model_key, "ids": content_hash(token_ids), "index": index,
                        "shared_prefix": not remote})
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    root = cache_root() / "residuals"
    paths = {layer: root / f"{key}-L{layer}.safetensors" for layer in layers}

    def load(path):
        try:
            return load_file(str(path))["resid"]
        except (OSError, SafetensorError, KeyError):
            return None

    out = {layer: load(path) for layer, path in paths.items()}
    missing = [layer for layer, resid in out.items() if resid is None or resid.shape[0] != len(token_ids)]
    if missing:
        resid = read_residual(model, token_ids, missing, index, batch_size, remote, groups)
        for layer in missing:
            with atomic_path(paths[layer]) as tmp:
                save_file({"resid": resid[layer].contiguous()}, str(tmp))
            out[layer] = load(paths[layer])
    return out


@torch.inference_mode()
def encode(sae, resid: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """SAE latent activations `[n, d_sae]` for residuals `[n, d_model]`."""
    device = sae.W_dec.device
    return torch.cat([sae.encode(resid[i:i + batch_size].to(device, torch.float32)).cpu()
                      for i in range(0, len(resid), batch_size)])


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


def rank_latents(score: np.ndarray) -> np.ndarray:
    """Latent indices ordered by descending score (stable: ties keep index order)."""
    return np.argsort(-score, kind="stable")


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


def score_table(pairs: PairSet, cfg: DiscoveryConfig) -> pd.DataFrame:
    """All latents' statistics and rank for one pair set (one row per latent)."""
    stats = latent_stats(pairs.pos, pairs.neg, cfg.fire_threshold, cfg.negative_ratio)
    df = pd.DataFrame(stats)
    df.insert(0, "latent", np.arange(len(df)))
    df["rank"] = np.empty(len(df), dtype=int)
    df.loc[rank_latents(stats["score"]), "rank"] = np.arange(1, len(df) + 1)
    df["n_pairs"] = len(pairs.meta)
    return df


def top_latents(pairs: PairSet, cfg: DiscoveryConfig, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Top-k latents by score (only those with a positive score), optionally on the pairs selected by `mask`."""
    if mask is not None:
        pairs = PairSet(pairs.pos[mask], pairs.neg[mask], pairs.meta[mask])
    score = latent_stats(pairs.pos, pairs.neg, cfg.fire_threshold, cfg.negative_ratio)["score"]
    order = rank_latents(score)[:k]
    return order[score[order] > 0]


def bootstrap_top_latents(pairs: PairSet, cfg: DiscoveryConfig, k: int, draws: np.ndarray) -> list[np.ndarray]:
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
    tops = []
    for row in score:
        order = rank_latents(row)[:k]
        tops.append(order[row[order] > 0])
    return tops


def robustness(pairs: PairSet, cfg: DiscoveryConfig, full: np.ndarray | None = None) -> list[dict]:
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


def breakdown(pairs: PairSet, latents: Sequence[int], cfg: DiscoveryConfig) -> pd.DataFrame:
    """Consistency and firing frequency of `latents`, split by variant language and kind (one row per group × latent)."""
    rows = []
    latents = list(map(int, latents))
    for (language, kind), group in pairs.meta.groupby(["language", "kind"]):
        idx = group.index.to_numpy()
        stats = latent_stats(pairs.pos[idx][:, latents], pairs.neg[idx][:, latents], cfg.fire_threshold,
                             cfg.negative_ratio)
        for j, latent in enumerate(latents):
            rows.append({"language": language, "kind": kind, "latent": latent, "n_pairs": len(idx),
                         "consistency": stats["consistency"][j], "freq_pos": stats["freq_pos"][j],
                         "mean_diff": stats["mean_diff"][j]})
    return pd.DataFrame(rows)


def run_discovery(model, saes: dict[int, object], prompts: pd.DataFrame, tasks: dict, cfg: DiscoveryConfig,
                  model_key: str, batch_size: int = 16, remote: bool = False) -> dict[str, pd.DataFrame]:
    """Score every latent of every SAE for every target task, position and contrast.

    Returns DataFrames `latent_scores`, `selected_latents`, `robustness` and `breakdown` (by variant language/kind).
    """
    from .saes import sae_fingerprint

    key = {"model": model_key, "saes": {layer: sae_fingerprint(sae) for layer, sae in saes.items()},
           "prompts": content_hash(prompts[["prompt_id", "task", "position", "label", "input_ids", READ_POSITIONS[cfg.read_at]]]
                                   .to_dict("list")),
           "tasks": {name: asdict(task) for name, task in sorted(tasks.items())}, "config": asdict(cfg),
           "code": sha256_file(__file__)[:16]}  # any change to the scoring code recomputes the scores
    return cached_frames("discovery", key, lambda: _score_latents(model, saes, prompts, tasks, cfg, model_key,
                                                                  batch_size, remote))


def _score_latents(model, saes: dict[int, object], prompts: pd.DataFrame, tasks: dict, cfg: DiscoveryConfig,
                   model_key: str, batch_size: int, remote: bool) -> dict[str, pd.DataFrame]:
    """`run_discovery` without the cache."""
    from tqdm.auto import tqdm

    resid = read_prompt_residuals(model, prompts, list(saes), cfg.read_at, model_key, batch_size, remote)
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
    if {"post", "pre"} <= set(cfg.positions):
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


def top_selected(selected: pd.DataFrame, task: str, layer: int, position: str, k: int) -> pd.DataFrame:
    """The top-k rows (rank, latent, weight, …) of selected_latents.csv for one task, layer and position."""
    rows = selected[(selected["task"] == task) & (selected["layer"] == layer) & (selected["position"] == position)]
    return rows.nsmallest(k, "rank")


def check_selection(selected: pd.DataFrame, tasks: Sequence[str], saes: dict, layers: Sequence[int]) -> None:
    """Fail before any generation if a task has no latents in selected_latents.csv or a layer has no SAE."""
    unknown = sorted(set(tasks) - set(selected["task"]))
    if unknown:
        raise ValueError(f"tasks {unknown} have no selected latents in notebook 02's output; "
                         f"allowed: {sorted(selected['task'].unique())} (or rerun 02 with these tasks)")
    missing = sorted(set(layers) - set(saes))
    if missing:
        raise ValueError(f"layers {missing} have no SAE; allowed: {sorted(saes)}")


def diff_in_means(prompts: pd.DataFrame, resid: dict[int, torch.Tensor], positions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Mean positive minus mean paired content-only negative residual for every target (sub-)task, layer and
    position → `{"<task>|<layer>|<position>": [d_model]}` (the diff-in-means steering baseline)."""
    out = {}
    for task in sorted(prompts.loc[prompts["label"] == "positive", "task"].unique()):
        for layer, acts in resid.items():
            for position in positions:
                pairs = build_pairs(prompts, acts.float(), task, position, "content")
                out[f"{task}|{layer}|{position}"] = (pairs.pos.mean(0) - pairs.neg.mean(0)).contiguous()
    return out


def save_directions(directions: dict[str, torch.Tensor], dest) -> None:
    """Write named direction vectors atomically as safetensors."""
    from safetensors.torch import save_file

    with atomic_path(dest) as tmp:
        save_file(directions, str(tmp))


def load_directions(path) -> dict[str, torch.Tensor]:
    """Named direction vectors written by `save_directions`."""
    from safetensors.torch import load_file

    return load_file(str(path))
