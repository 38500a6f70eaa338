"""Causal ablation: with the instruction in the prompt, remove the selected latents' decoded contribution
Σ_j a_j(h)·W_dec[j] from the residual at every position and every generated token, and measure how much instruction
following drops — against removing random latents with matched activation mass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from ..activations import activation_mass
from ..context import RunContext
from ..data import check_position, evaluation_prompts, prompting_instructions, sample_passages
from ..evaluation import judge
from ..interventions import AblateLatents
from ..io import write_table
from ..progress import tqdm
from ..selection import check_selection, top_selected
from ..stats import accuracy_table, bootstrap_ci
from ..vectors import mass_matched_latents

NAME = "04_causal_ablation"
CONDITIONS = ("none", "selected", "random")
"""No ablation, the selected latents, mass-matched random latents."""


@dataclass(frozen=True)
class AblationConfig:
    """Knobs of the causal ablation stage."""

    profile_key: ClassVar[str] = "ablation"
    steers_default_tasks: ClassVar[bool] = True

    tasks: tuple[str, ...] | None = None
    """(Sub-)tasks whose prompted behaviour is ablated; None → the tasks file's steered tasks (`data.default_tasks`)."""
    layers: tuple[int, ...] | None = None
    """SAE layers to ablate at (one at a time); None → every layer with an SAE."""
    k: int = 15
    """Top latents removed (selected at `position`, content contrast)."""
    position: str = "post"
    """Instruction placement of the prompts and of the latent selection."""
    n_test: int = 45
    """Test passages."""
    max_new_tokens: int = 48
    """Greedy generation length limit."""
    gen_batch_size: int = 68
    """Prompts generated together: two batches hold the three conditions of a (task, layer) (135 rows with the default
    `n_test`). One batch of all 135 took ≈ 1.2 GB of resident memory; half of it takes ≈ 0.5 GB, for 4–20 % more
    time per response and identical tokens (see benchmarks/README.md)."""
    mass_window: int = 10
    """A random latent is drawn among the `mass_window` latents nearest in activation mass to a selected one."""
    n_random_draws: int = 3
    """Independent random sets, assigned to prompts round-robin."""
    prompt_variant: str = "en-00"
    """Variant id suffix of the instruction written in the prompt."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k} must be ≥ 1")
        check_position(self.position)
        for name in ("n_test", "max_new_tokens", "gen_batch_size", "mass_window", "n_random_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks=() selects nothing; name at least one task")


@dataclass(frozen=True)
class AblationResult:
    """The ablation table (one row per task, layer, k and condition) and every judged response."""

    ablation: pd.DataFrame
    generations: pd.DataFrame


def run(ctx: RunContext, cfg: AblationConfig) -> AblationResult:
    """Ablate every task at every layer on its instructed test prompts and write the table and the responses."""
    cfg = ctx.with_default_tasks(cfg)
    layers = cfg.layers or tuple(sorted(ctx.saes))
    selected = ctx.run.selected_latents()
    check_selection(selected, cfg.tasks, ctx.saes, layers)
    instructions = prompting_instructions(ctx.data.variants(), cfg.tasks, cfg.prompt_variant)
    test = sample_passages(ctx.data.passages(), "test", cfg.n_test, cfg.seed)
    judged = []
    for task, layer in tqdm([(t, la) for t in cfg.tasks for la in layers], desc="ablation"):
        latents = top_selected(selected, task, layer, cfg.position, cfg.k)["latent"].to_numpy()
        if len(latents) == 0:
            continue
        prompts = evaluation_prompts(ctx.tokenizer, test, instructions[task], cfg.position)
        judged.append(ablate_task(ctx, prompts, task, layer, latents, cfg))
    if not judged:
        raise ValueError("no task has selected latents at the requested layers and position; nothing to ablate")
    generations = pd.concat(judged, ignore_index=True)
    result = AblationResult(ablation_table(generations, cfg.seed), generations)
    out = ctx.run.stage(NAME)
    ctx.run.write_config(NAME, cfg)
    write_table(result.ablation, out / "ablation.csv")
    write_table(result.generations, out / "generations.parquet")
    return result


def ablate_task(ctx: RunContext, prompts: pd.DataFrame, task: str, layer: int, latents: np.ndarray,
                cfg: AblationConfig) -> pd.DataFrame:
    """Judged responses of one task at one layer under no ablation, the selected latents and mass-matched random ones.

    Every row also carries `logprob`: the mean token log-probability, under that condition, of the response the
    unablated model gave (its own instruction-following continuation), teacher-forced.
    """
    sae, sae_key = ctx.saes[layer], ctx.sae_keys[layer]
    ids = list(prompts["input_ids"])
    n = len(ids)
    mass = activation_mass(ctx, ids, layer)
    draws = np.arange(n) % cfg.n_random_draws
    random_sets = [mass_matched_latents(mass, latents, seed=cfg.seed * 1000 + d, window=cfg.mass_window)
                   for d in range(cfg.n_random_draws)]
    selected = AblateLatents(sae, tuple(map(int, latents)), sae_key)
    random_edits = [AblateLatents(sae, tuple(map(int, s)), sae_key) for s in random_sets]
    # One edit per prompt and condition, so all three conditions are generated (and scored) in shared batches: full
    # batches cost less than one generation per condition (benchmarks/README.md).
    edits = {"none": [None] * n, "selected": [selected] * n, "random": [random_edits[d] for d in draws]}
    row_edits = [e for condition in CONDITIONS for e in edits[condition]]
    out = ctx.generate(ids * len(CONDITIONS), layer, row_edits, cfg.max_new_tokens, cfg.gen_batch_size,
                       desc=f"{task} L{layer}")
    baseline = out[:n]  # condition "none" comes first
    logprob = ctx.logprob(ids * len(CONDITIONS), baseline * len(CONDITIONS), layer, row_edits, ctx.batch_size)
    tables = []
    for c, condition in enumerate(CONDITIONS):
        new_ids = out[c * n:(c + 1) * n]
        removed = [0.0 if e is None else float(mass[list(e.latents)].sum()) for e in edits[condition]]
        responses = prompts.assign(response=[ctx.tokenizer.decode(g, skip_special_tokens=True).strip() for g in new_ids],
                                   task=task, layer=layer, k=len(latents), condition=condition,
                                   logprob=logprob[c * n:(c + 1) * n], mass_removed=removed,
                                   draw=draws if condition == "random" else 0)
        tables.append(judge(responses, ctx.data.tasks()).drop(columns=["input_ids", "user_text"]))
    return pd.concat(tables, ignore_index=True)


def ablation_table(judged: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row per (task, layer, k, condition): n, strict/loose accuracy, mean log-prob of the unablated response and
    its drop against no ablation (paired per prompt), all with 95 % bootstrap CIs, and the activation mass removed."""
    keys = ["task", "layer", "k", "condition"]
    acc = accuracy_table(judged, keys, seed).drop(columns=["fluency", "nll"])
    base = judged[judged["condition"] == "none"].set_index(["task", "layer", "passage_id"])["logprob"]
    rows = []
    for key, group in judged.groupby(keys, sort=False):
        lp = group["logprob"].to_numpy()
        drop = base.loc[[(key[0], key[1], p) for p in group["passage_id"]]].to_numpy() - lp
        ok = np.isfinite(lp)
        mean, low, high = bootstrap_ci(lp[ok], seed) if ok.any() else (np.nan,) * 3
        d_mean, d_low, d_high = bootstrap_ci(drop[ok], seed) if ok.any() else (np.nan,) * 3
        rows.append(dict(zip(keys, key)) | {"logprob": mean, "logprob_ci_low": low, "logprob_ci_high": high,
                                            "logprob_drop": d_mean, "logprob_drop_ci_low": d_low,
                                            "logprob_drop_ci_high": d_high,
                                            "mass_removed": float(group["mass_removed"].mean())})
    return acc.merge(pd.DataFrame(rows), on=keys)
