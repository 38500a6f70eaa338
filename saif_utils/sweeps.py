"""Steering sweeps (notebook 05): steer prompts that carry no instruction and measure whether the model follows it.

Methods, all on identical prompts and judged by the same checkers:

* `no_instruction` — content alone, no intervention (the floor);
* `prompting` — the instruction written in the prompt (the ceiling SAIF is compared with);
* `saif` — content alone plus v = α‖h̄‖·unit(Σ_j w_j W_dec[j]) over the top-k latents from notebook 02;
* `diff_in_means` — content alone plus the mean-difference direction (with − without instruction), same norm;
* `random_latents` — content alone plus k random latents with the selected weights, same norm (SAIF's configuration);
* `saif_plus_prompt` — the instruction in the prompt *and* the SAIF vector.

(layer, k, α, extraction position) are chosen on the `val` passages — by strict + loose accuracy where a degenerate
response (a repetition loop) counts as a failure — and reported on the disjoint `test` passages.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .data import evaluation_prompts
from .discovery import check_selection, top_selected
from .evaluation import accuracy_table, judge
from .models import chat_prompt
from .steering import AddVector, cached_generate, cached_logprob, direction_from_latents, random_latents, scale_direction

METHODS = ("no_instruction", "prompting", "saif", "diff_in_means", "random_latents", "saif_plus_prompt")
SEARCHES = ("staged", "grid")
CONDITION_KEYS = ["task", "method", "layer", "k", "alpha", "position", "split"]


@dataclass(frozen=True)
class SweepConfig:
    """Knobs of the steering sweeps; notebook 05's papermill parameters map onto these fields."""

    tasks: tuple[str, ...] = ("translate_fr", "summarize", "keyword:ocean", "bullet_list", "json")
    """(Sub-)tasks to steer; each needs latents in notebook 02's selected_latents.csv."""
    methods: tuple[str, ...] = METHODS
    """Methods evaluated on test (random_latents and saif_plus_prompt reuse SAIF's tuned configuration)."""
    layers: tuple[int, ...] | None = None
    """SAE layers to sweep; None → every layer with an SAE."""
    k_grid: tuple[int, ...] = (1, 5, 10, 15, 20, 30)
    """Numbers of top latents combined into the steering vector."""
    alpha_grid: tuple[float, ...] = (0.3, 0.5, 0.7)
    """Steering strengths, as multiples of the layer's mean residual norm."""
    positions: tuple[str, ...] = ("post", "pre")
    """Instruction placements the latents / directions were extracted from (the first is the main one)."""
    search: str = "staged"
    """'grid': every (layer, k, α, position); 'staged': layer × α at `k_start`, then k, then position."""
    k_start: int = 15
    """k used while layer and α are searched (staged search)."""
    n_val: int = 16
    """Validation passages used to choose the configuration."""
    n_test: int = 45
    """Test passages the chosen configurations are reported on."""
    max_new_tokens: int = 48
    """Greedy generation length limit (generation also stops at end-of-turn)."""
    gen_batch_size: int = 256
    """Prompts generated (and fluency-scored) together, left-padded and length-bucketed. A decode step costs a fixed
    ≈ 55 ms plus a per-row share on 2 CPU cores: 3.5 ms per row at 64 rows, 2.7 at 128, 2.4 at 256."""
    n_random_draws: int = 3
    """Independent random-latent sets, assigned to test prompts round-robin."""
    prompt_variant: str = "en-00"
    """Variant id suffix of the instruction used for prompting (e.g. translate_fr-en-00)."""
    seed: int = 0
    """Seed for passage samples and random latents."""

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(f"search={self.search!r}; allowed: {list(SEARCHES)}")
        if not self.tasks:
            raise ValueError("tasks=() selects nothing; name at least one task")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods={list(self.methods)} contains unknown {unknown}; allowed: {list(METHODS)}")
        needs_saif = sorted({"random_latents", "saif_plus_prompt"} & set(self.methods))
        if needs_saif and "saif" not in self.methods:
            raise ValueError(f"methods {needs_saif} reuse SAIF's tuned configuration; add 'saif' to methods")
        for name in ("k_grid", "alpha_grid", "positions"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; give at least one value")
        bad_k = [k for k in (*self.k_grid, self.k_start) if not (isinstance(k, int) and k >= 1)]
        if bad_k:
            raise ValueError(f"k values {bad_k} must be integers ≥ 1 (k_grid, k_start)")
        bad_alpha = [a for a in self.alpha_grid if not np.isfinite(a)]
        if bad_alpha:
            raise ValueError(f"alpha_grid contains {bad_alpha}; every α must be a finite number")
        for position in self.positions:
            if position not in ("post", "pre"):
                raise ValueError(f"positions contains {position!r}; allowed: 'post', 'pre'")
        for name in ("n_val", "n_test", "max_new_tokens", "gen_batch_size", "n_random_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")


@dataclass(frozen=True)
class Condition:
    """One steering configuration; fields that do not apply to a method are None."""

    task: str
    method: str
    layer: int | None = None
    k: int | None = None
    alpha: float | None = None
    position: str | None = None


@dataclass
class SteeringSetup:
    """Everything the sweeps read: the model, SAEs, notebook 02's selections and directions, prompts and scales."""

    model: object
    model_key: str
    saes: dict[int, object]
    selected: pd.DataFrame
    """Notebook 02's selected_latents.csv (content contrast)."""
    directions: dict[str, torch.Tensor]
    """Notebook 02's diff-in-means vectors, keyed '<task>|<layer>|<position>'."""
    norms: dict[int, float]
    """Mean residual norm per layer (α is a multiple of it)."""
    passages: dict[str, pd.DataFrame]
    """The val and test passages."""
    instructions: dict[str, str]
    """The prompting instruction of each task."""
    cfg: SweepConfig
    remote: bool = False
    nll_prefix: list[int] = field(default_factory=list)
    """Tokens the fluency NLL conditions on: an empty user turn, so a response is not judged by its instruction."""

    def prompts(self, split: str, task: str | None) -> pd.DataFrame:
        """Chat prompts of a split: content alone (task None) or with the task's instruction after it."""
        instruction = None if task is None else self.instructions[task]
        return evaluation_prompts(self.model.tokenizer, self.passages[split], instruction, "post")

    def latents(self, task: str, layer: int, position: str, k: int) -> pd.DataFrame:
        """The top-k selected latents (rank, latent, weight) of a task at a layer and extraction position."""
        return top_selected(self.selected, task, layer, position, k)


def prompting_instructions(variants: pd.DataFrame, tasks: tuple[str, ...], suffix: str) -> dict[str, str]:
    """The instruction text used by `prompting` for every task (variant `<base>-<suffix>`, `:<word>` for keywords)."""
    out = {}
    for task in tasks:
        base, _, word = task.partition(":")
        variant_id = f"{base}-{suffix}" + (f":{word}" if word else "")
        match = variants[variants["variant_id"] == variant_id]
        if match.empty:
            raise ValueError(f"prompt_variant={suffix!r}: no variant {variant_id!r} for task {task!r} in the instruction data")
        out[task] = match["text"].iloc[0]
    return out


def validate_setup(setup: SteeringSetup, layers: tuple[int, ...]) -> None:
    """Fail before any generation if a task, layer or k cannot be served by notebook 02's outputs."""
    cfg = setup.cfg
    check_selection(setup.selected, cfg.tasks, setup.saes, layers)
    d_sae = min(sae.cfg.d_sae for sae in setup.saes.values())
    too_big = [k for k in (*cfg.k_grid, cfg.k_start) if k > d_sae]
    if too_big:
        raise ValueError(f"k values {too_big} exceed d_sae={d_sae}")
    for task in cfg.tasks:
        for layer in layers:
            for position in cfg.positions:
                if f"{task}|{layer}|{position}" not in setup.directions:
                    raise ValueError(f"no diff-in-means direction for {task} at layer {layer}, {position}; rerun 02")


def steering_vector(setup: SteeringSetup, cond: Condition, draw: int = 0) -> tuple[torch.Tensor, int]:
    """The vector a condition adds and the number of latents behind it (0 for diff-in-means)."""
    norm = setup.norms[cond.layer]
    if cond.method == "diff_in_means":
        direction = setup.directions[f"{cond.task}|{cond.layer}|{cond.position}"].float()
        return scale_direction(direction, cond.alpha, norm), 0
    top = setup.latents(cond.task, cond.layer, cond.position, cond.k)
    if top.empty:
        raise ValueError(f"no latent with a positive score for {cond.task} at layer {cond.layer}, {cond.position}")
    latents, weights = top["latent"].to_numpy(), top["weight"].to_numpy()
    if cond.method == "random_latents":
        seed = np.random.SeedSequence([setup.cfg.seed, cond.layer, len(cond.task), sum(map(ord, cond.task)), draw])
        latents = random_latents(setup.saes[cond.layer].cfg.d_sae, len(latents), latents, seed.generate_state(1)[0])
    direction = direction_from_latents(setup.saes[cond.layer], latents.tolist(), weights.tolist())
    return scale_direction(direction, cond.alpha, norm), len(latents)


def evaluate_many(setup: SteeringSetup, conds: list[Condition], split: str) -> list[pd.DataFrame]:
    """Generate for every prompt of `split` under each condition, judge each response and score its fluency. The
    prompts of every condition at one layer are generated in shared batches (each row with its own vector), which
    keeps batches full when a split has few passages."""
    cfg = setup.cfg
    jobs = []  # per condition: prompts, random draw per prompt, edit per prompt, number of latents
    for cond in conds:
        instructed = cond.method in ("prompting", "saif_plus_prompt")
        prompts = setup.prompts(split, cond.task if instructed else None)
        n = len(prompts)
        draws = np.arange(n) % cfg.n_random_draws if cond.method == "random_latents" else np.zeros(n, int)
        edits, n_latents = [None] * n, 0
        if cond.method not in ("no_instruction", "prompting"):
            for draw in np.unique(draws):
                vector, n_latents = steering_vector(setup, cond, int(draw))
                for i in np.flatnonzero(draws == draw):
                    edits[i] = AddVector(vector)
        jobs.append((prompts, draws, edits, n_latents))
    new_ids: list[list] = [[None] * len(job[0]) for job in jobs]
    by_layer: dict = {}
    for c, cond in enumerate(conds):
        by_layer.setdefault(cond.layer if jobs[c][2][0] is not None else None, []).append(c)
    for layer, members in by_layer.items():
        rows = [(c, i) for c in members for i in range(len(jobs[c][0]))]
        out = cached_generate(setup.model, setup.model_key, [jobs[c][0]["input_ids"].iloc[i] for c, i in rows], layer,
                              [jobs[c][2][i] for c, i in rows], cfg.max_new_tokens, "both", cfg.gen_batch_size,
                              setup.remote, desc=f"{split} L{layer}" if layer is not None else f"{split} unsteered")
        for (c, i), generated in zip(rows, out):
            new_ids[c][i] = generated
    flat = [g for ids in new_ids for g in ids]
    nll = -cached_logprob(setup.model, setup.model_key, [setup.nll_prefix] * len(flat), flat,
                          batch_size=cfg.gen_batch_size, remote=setup.remote)
    tok, tables, start = setup.model.tokenizer, [], 0
    for cond, (prompts, draws, _, n_latents), ids in zip(conds, jobs, new_ids):
        responses = prompts.assign(response=[tok.decode(g, skip_special_tokens=True).strip() for g in ids],
                                   n_new_tokens=[len(g) for g in ids], draw=draws, n_latents=n_latents,
                                   **cond.__dict__, split=split, nll=nll[start:start + len(ids)])
        start += len(ids)
        tables.append(judge(responses).drop(columns=["input_ids", "user_text"]))
    return tables


def search_space(cfg: SweepConfig, task: str, method: str, layers: tuple[int, ...]) -> list[list[Condition]]:
    """The conditions to try on `val`, as stages: each stage after the first refines the best condition so far.

    A stage is a list; an entry of None in a later stage means "take it from the best so far"."""
    ks = (None,) if method == "diff_in_means" else cfg.k_grid
    if cfg.search == "grid":
        return [[Condition(task, method, layer, k, alpha, pos)
                 for layer, k, alpha, pos in itertools.product(layers, ks, cfg.alpha_grid, cfg.positions)]]
    k0 = None if method == "diff_in_means" else cfg.k_start
    first = [Condition(task, method, layer, k0, alpha, cfg.positions[0])
             for layer, alpha in itertools.product(layers, cfg.alpha_grid)]
    stages = [first]
    if method != "diff_in_means":
        stages.append([Condition(task, method, None, k, None, None) for k in ks])
    stages.append([Condition(task, method, None, None, None, pos) for pos in cfg.positions[1:]])
    return stages


def best_condition(table: pd.DataFrame) -> Condition:
    """The configuration with the highest strict + loose accuracy on val, counting degenerate responses (loops) as
    failures; ties → fewer degenerate responses, then smaller layer, k and α (deterministic)."""
    ranked = table.assign(objective=table["fluent_strict_acc"] + table["fluent_loose_acc"]).sort_values(
        ["objective", "degenerate_rate", "layer", "k", "alpha"], ascending=[False, True, True, True, True],
        kind="stable")
    row = ranked.iloc[0]
    k = None if pd.isna(row["k"]) else int(row["k"])
    return Condition(row["task"], row["method"], int(row["layer"]), k, float(row["alpha"]), row["position"])


Search = tuple[str, str]
"""A tuned (task, method) pair."""


def tune(setup: SteeringSetup, searches: list[Search], layers: tuple[int, ...]
         ) -> tuple[dict[Search, Condition], list[pd.DataFrame]]:
    """Search (layer, k, α, position) on val for every (task, method) in `searches`; returns the best condition of
    each and every judged table. The searches advance in lockstep: stage s of all of them is generated in one
    `evaluate_many` call, so each layer's batches are full (a single search's later stages hold only 16–80 prompts)."""
    plans = {search: search_space(setup.cfg, *search, layers) for search in searches}
    summaries: dict[Search, list[dict]] = {search: [] for search in searches}
    best: dict[Search, Condition] = {}
    judged = []
    for stage_index in range(max(len(stages) for stages in plans.values())):
        active = [search for search, stages in plans.items() if stage_index < len(stages)]
        todo: list[Condition] = []
        for task, method in active:
            for cond in plans[(task, method)][stage_index]:
                if stage_index > 0:
                    prev = best[(task, method)]
                    cond = Condition(task, method, *(
                        getattr(cond, f) if getattr(cond, f) is not None else getattr(prev, f)
                        for f in ("layer", "k", "alpha", "position")))
                no_latents = method != "diff_in_means" and setup.latents(task, cond.layer, cond.position, 1).empty
                seen = cond in todo or any(s["cond"] == cond for s in summaries[(task, method)])
                if not (no_latents or seen):
                    todo.append(cond)
        for cond, table in zip(todo, evaluate_many(setup, todo, "val")):
            judged.append(table)
            summaries[(cond.task, cond.method)].append(
                {"cond": cond, "table": accuracy_table(table, CONDITION_KEYS, setup.cfg.seed)})
        for task, method in active:
            if not summaries[(task, method)]:
                raise ValueError(f"{task}: no layer/position has selected latents for {method}; check notebook 02's output")
            best[(task, method)] = best_condition(pd.concat([s["table"] for s in summaries[(task, method)]],
                                                            ignore_index=True))
    return best, judged


def run_sweeps(setup: SteeringSetup, layers: tuple[int, ...]) -> dict[str, pd.DataFrame]:
    """Tune SAIF and diff-in-means on val, then evaluate every method on test.

    Returns `sweep` (one row per evaluated condition and split), `results` (test rows: the chosen configuration of
    every task × method) and `generations` (every prompt, condition and judged response)."""
    validate_setup(setup, layers)
    cfg = setup.cfg
    searches = [(task, method) for task in cfg.tasks for method in ("saif", "diff_in_means") if method in cfg.methods]
    tuned, judged = tune(setup, searches, layers) if searches else ({}, [])
    test_conds = []
    for task in cfg.tasks:
        chosen = {"no_instruction": Condition(task, "no_instruction"), "prompting": Condition(task, "prompting")}
        chosen |= {method: cond for (t, method), cond in tuned.items() if t == task}
        if "saif" in chosen:
            saif = chosen["saif"]
            for method in ("random_latents", "saif_plus_prompt"):
                chosen[method] = Condition(task, method, saif.layer, saif.k, saif.alpha, saif.position)
        test_conds += [chosen[method] for method in cfg.methods]
    judged += evaluate_many(setup, test_conds, "test")
    generations = pd.concat(judged, ignore_index=True)
    sweep = accuracy_table(generations, CONDITION_KEYS + ["n_latents"], setup.cfg.seed)
    results = sweep[sweep["split"] == "test"].reset_index(drop=True)
    return {"sweep": sweep, "results": results, "generations": generations}


def nll_prefix(tokenizer) -> list[int]:
    """Token ids of a chat prompt with an empty user turn (the context fluency is scored in)."""
    return tokenizer(chat_prompt(tokenizer, ""), add_special_tokens=False)["input_ids"]
