"""Steering sweeps: steer prompts that carry no instruction and measure whether the model follows it.

Every registered method (`methods.METHODS`: no instruction, prompting, SAIF, diff-in-means, random latents, SAIF +
prompt, …) runs on identical prompts and is judged by the same checkers. Tuned methods have (layer, k, α, extraction
position) chosen on the `val` passages by `stats.selection_objective`; every method is then reported once on the
disjoint `test` passages.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from ..activations import mean_residual_norm
from ..calibration import CalibrationConfig, Targets, calibrate, frozen_weights, summed_gradient, target_nll
from ..context import RunContext
from ..data import POSITIONS, check_position, evaluation_prompts, prompting_instructions, sample_passages
from ..decomposition import SPAN_KS, best_latents, cosine, project_on_span, span_share, unit_rows
from ..evaluation import judge
from ..interventions import AddVector
from ..io import cached_frames, content_hash, sha256_file, write_table
from ..methods import METHODS, Condition, VectorSource, get_method
from ..models import chat_prompt
from ..progress import tqdm
from ..selection import DirectionKey, check_selection
from ..stats import accuracy_table, paired_diff_ci, ratio_ci, recovered_share_ci, selection_objective
from ..vectors import scale_direction

NAME = "05_steering_sweeps"
SEARCHES = ("staged", "grid")
CONDITION_KEYS = ["task", "method", "layer", "k", "alpha", "position", "split"]
SCORES = ("strict", "loose")
"""The judged outcomes compared per passage (degenerate responses fail both)."""
FLOOR, CEILING = "no_instruction", "prompting"
"""The methods a steering method's gain is read between: no instruction at all, and the instruction written out."""
BASELINES = (FLOOR, CEILING, "diff_in_means", "saif")
"""Every method on test is compared, passage by passage, with each of these."""


@dataclass(frozen=True)
class SweepConfig:
    """Knobs of the steering sweeps."""

    profile_key: ClassVar[str] = "steering"
    steers_default_tasks: ClassVar[bool] = True
    tasks: tuple[str, ...] | None = None
    """(Sub-)tasks to steer, each with selected latents from the discovery stage; None → the tasks file's steered
    tasks (`data.default_tasks`)."""
    methods: tuple[str, ...] | None = None
    """Methods evaluated on test (a method that borrows a configuration needs the method it borrows from); None →
    every registered method, plugins' included, in registration order."""
    layers: tuple[int, ...] | None = None
    """SAE layers to sweep; None → every layer with an SAE."""
    k_grid: tuple[int, ...] = (1, 5, 10, 15, 20, 30)
    """Numbers of top latents combined into the steering vector."""
    alpha_grid: tuple[float, ...] = (0.3, 0.5, 0.7)
    """Steering strengths, as multiples of the layer's mean residual norm."""
    positions: tuple[str, ...] = POSITIONS
    """Instruction placements the latents / directions were extracted from (the first is the main one)."""
    search: str = "staged"
    """'grid': every (layer, k, α, position); 'staged': layer × α at `k_start`, then k, then position."""
    k_start: int = 15
    """k used while layer and α are searched (staged search)."""
    n_val: int = 16
    """Validation passages used to choose the configuration."""
    n_test: int = 90
    """Test passages the chosen configurations are reported on (every method on the same ones, so that two methods are
    compared passage by passage)."""
    max_new_tokens: int = 48
    """Greedy generation length limit (generation also stops at end-of-turn)."""
    gen_batch_size: int = 64
    """Prompts generated (and fluency-scored) together, left-padded and length-bucketed: a decode step's fixed cost
    is shared by more rows in a larger batch, and the fp32 KV cache grows with it. On the default profile a 128-row
    batch raised resident memory by ≈ 1.2 GB and a 64-row one by ≈ 0.5 GB, for 0.225 vs 0.234–0.268 s per response
    and identical tokens (see benchmarks/README.md): 64 keeps notebook 05 under 3 GB."""
    n_random_draws: int = 3
    """Independent random-latent sets, assigned to test prompts round-robin."""
    prompt_variant: str = "en-00"
    """Variant id suffix of the instruction used for prompting (e.g. translate_fr-en-00)."""
    seed: int = 0
    """Seed for passage samples and random latents."""
    calibration_n_train: int = 8
    """Train passages each instruction variant of a task is written on: the prompted responses the judge accepts are
    the targets calibration fits and `saif_output` ranks by (every variant, so no one wording sets them)."""
    calibration_n_val: int = 4
    """Val passages each variant is written on for the validation targets (which stop calibration)."""
    calibration_max_targets: tuple[int, int] = (64, 32)
    """At most this many accepted (train, val) targets per task are kept (a seeded sample): what a calibration round
    costs grows with them."""
    calibration_tasks: tuple[str, ...] | None = None
    """Of `tasks`, those the fitting methods (`saif_calibrated`, `optimized_dense`) fit and report on; None → every
    task."""
    calibration_min_targets: int = 4
    """Fewer accepted train targets than this (or none on val) leaves a task's vector uncalibrated."""
    calibration_rounds: int = 30
    """Cap on calibration rounds (one Adam pass over the train targets each) for a run that never settles."""
    calibration_patience: int = 2
    """Calibration stops after this many rounds without a validation objective better by
    `calibration_min_improvement` (relative)."""
    calibration_min_improvement: float = 0.002
    """Relative fall of the validation objective that counts as progress (`CalibrationConfig.min_improvement`)."""
    calibration_lr: float = 0.1
    """Adam step relative to the initial parameters' RMS."""
    output_pool: int = 100
    """SAIF's top candidates (positive score, by SAIF's rank) that `saif_output` re-ranks by their effect on the
    output."""
    decomposition_ks: tuple[int, ...] = SPAN_KS
    """Numbers of decoder directions diff-in-means is projected on in the decomposition (empty: no decomposition)."""

    def __post_init__(self) -> None:
        if self.methods is None:  # resolved when the config is made, so methods registered by plugins take part
            object.__setattr__(self, "methods", tuple(METHODS))
        if self.search not in SEARCHES:
            raise ValueError(f"search={self.search!r}; allowed: {list(SEARCHES)}")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks=() selects nothing; name at least one task")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods={list(self.methods)} contains unknown {unknown}; allowed: {list(METHODS)}")
        lenders = {METHODS[m].borrows for m in self.methods} - {None}
        missing = sorted(lender for lender in lenders if lender not in self.methods)
        if missing:
            borrowers = sorted(m for m in self.methods if METHODS[m].borrows in missing)
            raise ValueError(f"methods {borrowers} reuse the tuned configuration of {missing}; add {missing} to methods")
        unanchored = sorted(m for m in self.methods if METHODS[m].anchored_on not in (None, *self.methods))
        if unanchored:
            raise ValueError(f"methods {unanchored} search at the layer and position that "
                             f"{sorted({METHODS[m].anchored_on for m in unanchored})} chose; add them to methods")
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
            check_position(position, "positions")
        if len(self.calibration_max_targets) != 2 or min(self.calibration_max_targets) < 1:
            raise ValueError(f"calibration_max_targets={self.calibration_max_targets} must be two counts ≥ 1 "
                             f"(train, val)")
        for name in ("n_val", "n_test", "max_new_tokens", "gen_batch_size", "n_random_draws", "calibration_n_train",
                     "calibration_n_val", "calibration_min_targets", "calibration_rounds", "calibration_patience",
                     "output_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")

    @property
    def tuned_methods(self) -> tuple[str, ...]:
        """The methods whose configuration is searched on val."""
        return tuple(m for m in self.methods if METHODS[m].tuned)

    @property
    def anchored_methods(self) -> tuple[str, ...]:
        """The tuned methods searched after the method they are anchored on, at its layer and position."""
        return tuple(m for m in self.tuned_methods if METHODS[m].anchored_on is not None)

    @property
    def ranking_methods(self) -> tuple[str, ...]:
        """The methods that order the latents themselves before the search (`SteeringMethod.rank`)."""
        return tuple(m for m in self.methods if METHODS[m].ranks)

    @property
    def fitted_methods(self) -> tuple[str, ...]:
        """The methods that learn their vector after the search (`SteeringMethod.fit`)."""
        return tuple(m for m in self.methods if METHODS[m].fits)

    def calibrates(self, task: str) -> bool:
        """True when the fitting methods fit `task` (`calibration_tasks`)."""
        return self.calibration_tasks is None or task in self.calibration_tasks

    @property
    def calibration(self) -> CalibrationConfig:
        """The optimiser settings of the calibrated methods."""
        return CalibrationConfig(max_rounds=self.calibration_rounds, patience=self.calibration_patience,
                                 min_improvement=self.calibration_min_improvement, lr=self.calibration_lr,
                                 seed=self.seed)


@dataclass
class SteeringSetup:
    """Everything the sweeps read: the run context, what vectors are built from, the passages and the instructions."""

    ctx: RunContext
    source: VectorSource
    passages: dict[str, pd.DataFrame]
    """Passages per split (val, test)."""
    instructions: dict[str, str]
    """The prompting instruction of each task."""
    cfg: SweepConfig
    nll_prefix: list[int] = field(default_factory=list)
    """Tokens the fluency NLL conditions on: an empty user turn, so a response is not judged by its instruction."""
    n_norm_prompts: int = 0
    """Content-only train prompts the mean residual norms were measured over."""

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers swept."""
        return self.cfg.layers or tuple(sorted(self.ctx.saes))

    def prompts(self, split: str, task: str | None) -> pd.DataFrame:
        """Chat prompts of a split: content alone (task None) or with the task's instruction after it."""
        instruction = None if task is None else self.instructions[task]
        return evaluation_prompts(self.ctx.tokenizer, self.passages[split], instruction, "post")


def build_setup(ctx: RunContext, cfg: SweepConfig,
                splits: tuple[str, ...] = ("train", "val", "test")) -> SteeringSetup:
    """Read the discovery stage's selections and directions, sample the passages of `splits`, and measure the mean
    residual norm of every swept layer (over the train passages' content-only prompts; α multiplies it)."""
    passages = ctx.data.passages()
    sizes = {"train": cfg.calibration_n_train, "val": cfg.n_val, "test": cfg.n_test}
    train_prompts = evaluation_prompts(ctx.tokenizer, passages[passages["split"] == "train"])
    layers = cfg.layers or tuple(sorted(ctx.saes))
    norms = mean_residual_norm(ctx.model, list(train_prompts["input_ids"]), layers, ctx.batch_size, ctx.remote,
                               model_key=ctx.model_key)
    source = VectorSource(ctx.saes, ctx.run.selected_latents(), ctx.run.directions(), norms, cfg.seed)
    return SteeringSetup(ctx, source, {s: sample_passages(passages, s, sizes[s], cfg.seed) for s in splits},
                         prompting_instructions(ctx.data.variants(), cfg.tasks, cfg.prompt_variant), cfg,
                         nll_prefix(ctx.tokenizer), len(train_prompts))


def validate_setup(setup: SteeringSetup) -> None:
    """Fail before any generation if a task, layer or k cannot be served by the discovery stage's outputs."""
    cfg, layers = setup.cfg, setup.layers
    check_selection(setup.source.selected, cfg.tasks, setup.source.saes, layers)
    d_sae = min(sae.cfg.d_sae for sae in setup.source.saes.values())
    too_big = [k for k in (*cfg.k_grid, cfg.k_start) if k > d_sae]
    if too_big:
        raise ValueError(f"k values {too_big} exceed d_sae={d_sae}")
    for task in cfg.tasks:
        for layer in layers:
            for position in cfg.positions:
                if DirectionKey(task, layer, position) not in setup.source.directions:
                    raise ValueError(f"no diff-in-means direction for {task} at layer {layer}, {position}; "
                                     f"rerun the discovery stage")


@dataclass(frozen=True)
class GenerationJob:
    """One condition's generations on a split: its prompts, the random draw and the edit (None: unsteered) of each
    prompt, and how many latents its vector combines."""

    cond: Condition
    prompts: pd.DataFrame
    draws: np.ndarray
    edits: list[AddVector | None]
    n_latents: int

    @property
    def layer(self) -> int | None:
        """The layer the edits act at; None when nothing is added."""
        return self.cond.layer if self.edits and self.edits[0] is not None else None


def generation_job(setup: SteeringSetup, cond: Condition, split: str) -> GenerationJob:
    """The prompts a condition runs on `split` and the vector (one per random draw) each of them gets."""
    method = get_method(cond.method)
    prompts = setup.prompts(split, cond.task if method.instructed else None)
    n = len(prompts)
    draws = np.arange(n) % setup.cfg.n_random_draws if method.random_draws else np.zeros(n, int)
    edits, n_latents = [None] * n, 0
    if method.steers:
        for draw in np.unique(draws):
            vector, n_latents = method.vector(setup.source, cond, int(draw))
            for i in np.flatnonzero(draws == draw):
                edits[i] = AddVector(vector)
    return GenerationJob(cond, prompts, draws, edits, n_latents)


def evaluate_many(setup: SteeringSetup, conds: list[Condition], split: str) -> list[pd.DataFrame]:
    """Generate for every prompt of `split` under each condition, judge each response and score its fluency."""
    return evaluate_jobs(setup, [generation_job(setup, cond, split) for cond in conds], split)


def evaluate_jobs(setup: SteeringSetup, jobs: list[GenerationJob], split: str, keep_ids: bool = False
                  ) -> list[pd.DataFrame]:
    """Run every job's generations, judge each response and score its fluency: one judged table per job (with
    `keep_ids`, the token ids of each response and of its prompt in `response_ids` and `prompt_ids`). The prompts of every job at one layer are generated in
    shared batches (each row with its own vector), which keeps batches full when a split has few passages."""
    cfg, ctx = setup.cfg, setup.ctx
    new_ids: list[list] = [[None] * len(job.prompts) for job in jobs]
    by_layer: dict = {}
    for c, job in enumerate(jobs):
        by_layer.setdefault(job.layer, []).append(c)
    for layer, members in by_layer.items():
        rows = [(c, i) for c in members for i in range(len(jobs[c].prompts))]
        out = ctx.generate([jobs[c].prompts["input_ids"].iloc[i] for c, i in rows], layer,
                           [jobs[c].edits[i] for c, i in rows], cfg.max_new_tokens, cfg.gen_batch_size,
                           desc=f"{split} L{layer}" if layer is not None else f"{split} unsteered")
        for (c, i), generated in zip(rows, out):
            new_ids[c][i] = generated
    flat = [g for ids in new_ids for g in ids]
    nll = -ctx.logprob([setup.nll_prefix] * len(flat), flat, batch_size=cfg.gen_batch_size, desc=f"{split} fluency")
    tok, tables, start, tasks = ctx.tokenizer, [], 0, ctx.data.tasks()
    for job, ids in zip(jobs, new_ids):
        cond, prompts, draws, n_latents = job.cond, job.prompts, job.draws, job.n_latents
        if keep_ids:
            prompts = prompts.assign(response_ids=[list(g) for g in ids], prompt_ids=list(prompts["input_ids"]))
        responses = prompts.assign(response=[tok.decode(g, skip_special_tokens=True).strip() for g in ids],
                                   n_new_tokens=[len(g) for g in ids], draw=draws, n_latents=n_latents,
                                   **cond.__dict__, split=split, nll=nll[start:start + len(ids)])
        start += len(ids)
        tables.append(judge(responses, tasks).drop(columns=["input_ids", "user_text"]))
    return tables


def search_space(cfg: SweepConfig, task: str, method: str, layers: tuple[int, ...]) -> list[list[Condition]]:
    """The conditions to try on `val`, as stages: each stage after the first refines the best condition so far.

    A stage is a list; an entry of None in a later stage means "take it from the best so far"."""
    uses_latents = get_method(method).uses_latents
    ks = cfg.k_grid if uses_latents else (None,)
    if cfg.search == "grid":
        return [[Condition(task, method, layer, k, alpha, pos)
                 for layer, k, alpha, pos in itertools.product(layers, ks, cfg.alpha_grid, cfg.positions)]]
    k0 = cfg.k_start if uses_latents else None
    first = [Condition(task, method, layer, k0, alpha, cfg.positions[0])
             for layer, alpha in itertools.product(layers, cfg.alpha_grid)]
    stages = [first]
    if uses_latents:
        stages.append([Condition(task, method, None, k, None, None) for k in ks])
    if cfg.positions[1:]:
        stages.append([Condition(task, method, None, None, None, pos) for pos in cfg.positions[1:]])
    return stages


def best_condition(table: pd.DataFrame) -> Condition:
    """The configuration with the highest `selection_objective` on val; ties → fewer degenerate responses, then
    smaller layer, k and α (deterministic)."""
    ranked = table.assign(objective=selection_objective(table)).sort_values(
        ["objective", "degenerate_rate", "layer", "k", "alpha"], ascending=[False, True, True, True, True],
        kind="stable")
    row = ranked.iloc[0]
    k = None if pd.isna(row["k"]) else int(row["k"])
    return Condition(row["task"], row["method"], int(row["layer"]), k, float(row["alpha"]), row["position"])


Search = tuple[str, str]
"""A tuned (task, method) pair."""


def search_plans(cfg: SweepConfig, searches: list[Search], layers: tuple[int, ...],
                 anchors: dict[Search, Condition] | None = None) -> dict[Search, list[list[Condition]]]:
    """The staged conditions (`search_space`) of every search over `layers`; an anchored method
    (`SteeringMethod.anchored_on`) searches only k and α, at the layer and position its anchor chose (`anchors`: the
    anchors' chosen conditions), and is left out where its anchor chose nothing."""
    plans = {}
    for task, method in searches:
        anchor_name = get_method(method).anchored_on
        if anchor_name is None:
            plans[(task, method)] = search_space(cfg, task, method, layers)
        elif (task, anchor_name) in (anchors or {}):
            anchor = anchors[(task, anchor_name)]
            plans[(task, method)] = search_space(replace(cfg, positions=(anchor.position,)), task, method,
                                                 (anchor.layer,))
    return plans


def tune(setup: SteeringSetup, searches: list[Search], anchors: dict[Search, Condition] | None = None
         ) -> tuple[dict[Search, Condition], list[pd.DataFrame]]:
    """Search (layer, k, α, position) on val for every (task, method) in `searches` (`search_plans`; `anchors` for
    the anchored methods); returns the best condition of each and every judged table. The searches advance in
    lockstep: stage s of all of them is generated in one `evaluate_many` call, so each layer's batches are full (a
    single search's later stages hold few prompts)."""
    plans = search_plans(setup.cfg, searches, setup.layers, anchors)
    summaries: dict[Search, list[dict]] = {search: [] for search in plans}
    best: dict[Search, Condition] = {}
    judged = []
    n_stages = max((len(stages) for stages in plans.values()), default=0)
    for stage_index in tqdm(range(n_stages), desc="val search stages", leave=False):
        active = [search for search, stages in plans.items() if stage_index < len(stages)]
        todo: list[Condition] = []
        for task, method in active:
            for cond in plans[(task, method)][stage_index]:
                if stage_index > 0:
                    prev = best[(task, method)]
                    cond = Condition(task, method, *(
                        getattr(cond, f) if getattr(cond, f) is not None else getattr(prev, f)
                        for f in ("layer", "k", "alpha", "position")))
                no_latents = (get_method(method).uses_latents
                              and get_method(method).latents(setup.source, cond, 1).empty)
                seen = cond in todo or any(s["cond"] == cond for s in summaries[(task, method)])
                if not (no_latents or seen):
                    todo.append(cond)
        for cond, table in zip(todo, evaluate_many(setup, todo, "val")):
            judged.append(table)
            summaries[(cond.task, cond.method)].append(
                {"cond": cond, "table": accuracy_table(table, CONDITION_KEYS, setup.cfg.seed)})
        for task, method in active:
            if not summaries[(task, method)]:
                raise ValueError(f"{task}: no layer/position has selected latents for {method}; "
                                 f"check the discovery stage's output")
            best[(task, method)] = best_condition(pd.concat([s["table"] for s in summaries[(task, method)]],
                                                            ignore_index=True))
    return best, judged


def reported_conditions(cfg: SweepConfig, tuned: dict[Search, Condition]) -> list[Condition]:
    """What each task × method is reported at: a tuned method at its chosen configuration, a borrowing method at its
    lender's, an untuned one with no configuration; a fitting method only on the tasks it fits (`calibration_tasks`)."""
    conds = []
    for task in cfg.tasks:
        for name in cfg.methods:
            method = METHODS[name]
            if method.fits and not cfg.calibrates(task):
                continue
            lender = tuned.get((task, method.borrows or name))
            if method.steers and lender is not None:
                conds.append(Condition(task, name, lender.layer, lender.k, lender.alpha, lender.position))
            else:
                conds.append(Condition(task, name))
    return conds


def calibration_targets(setup: SteeringSetup, split: str, tasks: tuple[str, ...]
                        ) -> tuple[dict[str, Targets], pd.DataFrame]:
    """Per task, the model's own responses to every instruction variant of the task written after each passage of
    `split` (`calibration_n_train` / `calibration_n_val` of them) that the judge accepts (strict: the checker passes
    and the response is not degenerate), each paired with the same passage's prompt without the instruction — at most
    `calibration_max_targets` of them, a seeded sample; and the judged table of every prompted response (`kept` marks
    the targets)."""
    cfg, ctx = setup.cfg, setup.ctx
    passages = setup.passages[split] if split == "train" else setup.passages[split].head(cfg.calibration_n_val)
    variants = ctx.data.variants()
    jobs = []
    for task in tasks:
        for variant in variants[variants["task"] == task].drop_duplicates("variant_id").itertuples():
            prompts = evaluation_prompts(ctx.tokenizer, passages, variant.text, "post").assign(
                variant_id=variant.variant_id)
            jobs.append(GenerationJob(Condition(task, "prompting"), prompts, np.zeros(len(prompts), int),
                                      [None] * len(prompts), 0))
    tables = evaluate_jobs(setup, jobs, split, keep_ids=True)
    bare = dict(zip(passages["passage_id"], evaluation_prompts(ctx.tokenizer, passages)["input_ids"]))
    cap = cfg.calibration_max_targets[0 if split == "train" else 1]
    targets, judged = {}, []
    for task in tasks:
        table = pd.concat([t for t, job in zip(tables, jobs) if job.cond.task == task], ignore_index=True)
        accepted = table[table["strict"] & (table["n_new_tokens"] > 0)]
        if len(accepted) > cap:
            accepted = accepted.sample(n=cap, random_state=cfg.seed).sort_index()
        targets[task] = Targets([list(bare[p]) for p in accepted["passage_id"]],
                                [list(ids) for ids in accepted["response_ids"]],
                                [list(ids) for ids in accepted["prompt_ids"]])
        judged.append(table.assign(kept=table.index.isin(accepted.index)))
    return targets, pd.concat(judged, ignore_index=True).drop(columns=["response_ids", "prompt_ids"])


class MethodFitter:
    """What a fitting method (`SteeringMethod.fit`) learns from: the vector source, the model's own prompted responses
    that the judge accepts on train and val (computed once, on first use), and the cached optimiser."""

    def __init__(self, setup: SteeringSetup):
        self.setup = setup
        self._targets: dict[str, tuple[dict[str, Targets], pd.DataFrame]] = {}
        self._latent_scores: pd.DataFrame | None = None
        self._gradients: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def source(self) -> VectorSource:
        """What steering vectors are built from."""
        return self.setup.source

    def targets(self, split: str) -> dict[str, Targets]:
        """The accepted prompted responses per task on `split` ('train': every task; 'val': the tasks calibration
        fits), generated on first use."""
        if split not in self._targets:
            cfg = self.setup.cfg
            tasks = cfg.tasks if split == "train" else tuple(t for t in cfg.tasks if cfg.calibrates(t))
            self._targets[split] = calibration_targets(self.setup, split, tasks)
        return self._targets[split][0]

    @property
    def target_table(self) -> pd.DataFrame:
        """The judged prompted responses behind the targets; empty when no method asked for targets."""
        tables = [table for _, table in self._targets.values()]
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()

    def n_targets(self, task: str) -> tuple[int, int]:
        """How many accepted train and val targets `task` has."""
        return len(self.targets("train")[task]), len(self.targets("val").get(task, ()))

    def enough_train_targets(self, task: str) -> bool:
        """True when `task` has `calibration_min_targets` train targets."""
        return len(self.targets("train")[task]) >= self.setup.cfg.calibration_min_targets

    def enough_targets(self, task: str) -> bool:
        """True when `task` has `calibration_min_targets` train targets and at least one on val."""
        return self.enough_train_targets(task) and self.n_targets(task)[1] >= 1

    def candidates(self, task: str, layer: int, position: str, n: int | None = None) -> pd.DataFrame:
        """SAIF's top `n` (default `output_pool`) latents with a positive score at a task, layer and position, by
        SAIF's rank: latent, weight (SAIF's, the mean activation difference) and saif_rank."""
        if self._latent_scores is None:
            scores = self.setup.ctx.run.table("02_feature_discovery", "latent_scores.parquet")
            self._latent_scores = scores[(scores["contrast"] == "content") & (scores["score"] > 0)]
        rows = self._latent_scores
        rows = rows[(rows["task"] == task) & (rows["layer"] == layer) & (rows["position"] == position)]
        return (rows.nsmallest(n or self.setup.cfg.output_pool, "rank")[["latent", "mean_diff", "rank"]]
                .rename(columns={"mean_diff": "weight", "rank": "saif_rank"}).reset_index(drop=True))

    def output_gradient(self, task: str, layer: int) -> torch.Tensor:
        """d(mean NLL per response token)/d v at v = 0, v a vector added at block `layer`'s output, over the task's
        train targets (the instruction absent from their prompts): `[d_model]`, cached by content and, for the
        other positions of the same layer, in memory."""
        if (task, layer) in self._gradients:
            return self._gradients[task, layer]
        ctx, cfg = self.setup.ctx, self.setup.cfg
        targets = self.targets("train")[task]
        d_model = int(ctx.saes[layer].W_dec.shape[1])
        key = {"model": ctx.model_key, "layer": layer, "d_model": d_model,
               "targets": content_hash([targets.prompt_ids, targets.response_ids]),
               "grad_rows": cfg.calibration.grad_rows, "code": sha256_file(summed_gradient.__code__.co_filename)[:16]}

        def compute() -> dict[str, pd.DataFrame]:
            with frozen_weights(ctx.model._module):
                grad, n_tokens, _ = summed_gradient(ctx.model, layer, torch.zeros(d_model), None, targets,
                                                 cfg.calibration.grad_rows, ctx.remote)
            return {"gradient": pd.DataFrame({"grad": (grad / n_tokens).numpy()})}

        frame = cached_frames("output_gradient", key, compute)["gradient"]
        self._gradients[task, layer] = torch.tensor(frame["grad"].to_numpy(), dtype=torch.float32)
        return self._gradients[task, layer]

    def output_ranking(self, task: str, layer: int, position: str) -> pd.DataFrame:
        """SAIF's candidates (`candidates`) ordered by their effect on the output: `output_score`, the first-order
        fall in the mean NLL of the task's accepted prompted responses (the instruction absent) per unit of vector
        added along the latent's unit decoder direction, −∇·d_j — one backward pass scores every candidate, and it is
        the exact change for a small step. Latents that would lower the likelihood are dropped. A task with fewer
        than `calibration_min_targets` train targets keeps SAIF's order (`ranked_by` says which)."""
        pool = self.candidates(task, layer, position)
        keys = {"task": task, "layer": layer, "position": position}
        if not self.enough_train_targets(task):
            return pool.assign(rank=pool["saif_rank"], output_score=np.nan, ranked_by="activation (too few targets)",
                               **keys)
        decoder = self.setup.ctx.saes[layer].W_dec.detach().float().cpu()[torch.tensor(pool["latent"].to_numpy())]
        directions = decoder / decoder.norm(dim=1, keepdim=True)
        scored = pool.assign(output_score=(-(directions @ self.output_gradient(task, layer))).numpy())
        scored = scored[scored["output_score"] > 0].sort_values(["output_score", "saif_rank"],
                                                                ascending=[False, True], kind="stable")
        return scored.assign(rank=np.arange(1, len(scored) + 1), ranked_by="output", **keys).reset_index(drop=True)

    def calibrate(self, cond: Condition, init: torch.Tensor, latent_basis: tuple[np.ndarray, torch.Tensor] | None,
                  desc: str, objective: str = "nll") -> dict[str, pd.DataFrame]:
        """`calibration.calibrate` on the task's targets from `init` with `objective`, cached by content
        (`_cached_calibration`)."""
        return _cached_calibration(self.setup.ctx, cond, init, latent_basis, self.targets("train")[cond.task],
                                   self.targets("val")[cond.task],
                                   replace(self.setup.cfg.calibration, objective=objective), desc)


def rank_methods(setup: SteeringSetup, fitter: MethodFitter, names: tuple[str, ...],
                 anchors: dict[Search, Condition] | None = None) -> dict[str, pd.DataFrame]:
    """The own order of latents (`SteeringMethod.rank`) of each ranking method in `names`: at each task, swept layer
    and position, or for an anchored method only where its anchor chose to steer (`anchors`)."""
    cfg, rankings = setup.cfg, {}
    for name in names:
        anchor_name = METHODS[name].anchored_on
        jobs = (list(itertools.product(cfg.tasks, setup.layers, cfg.positions)) if anchor_name is None else
                [(task, c.layer, c.position) for (task, method), c in (anchors or {}).items() if method == anchor_name])
        if not jobs:
            continue
        parts = [METHODS[name].rank(fitter, task, layer, position)
                 for task, layer, position in tqdm(jobs, desc=f"ranking latents for {name}", leave=False)]
        rankings[name] = pd.concat(parts, ignore_index=True)
    return rankings


def fit_methods(setup: SteeringSetup, tuned: dict[Search, Condition], fitter: MethodFitter) -> tuple[
        dict[tuple[str, str], tuple], pd.DataFrame, pd.DataFrame]:
    """Fit the vector of every fitting method (`SteeringMethod.fit`) for each task, at the configuration it is
    reported at: the vectors by (task, method), the fitting histories, and the latent weights before and after."""
    fitting = setup.cfg.fitted_methods
    vectors, histories, weights = {}, [], []
    for cond in reported_conditions(setup.cfg, tuned):
        if cond.method not in fitting or cond.layer is None:  # a task whose lender found no configuration
            continue
        fitted = METHODS[cond.method].fit(fitter, cond)
        vectors[(cond.task, cond.method)] = (fitted.vector, fitted.n_latents)
        histories.append(fitted.history)
        if fitted.weights is not None:
            weights.append(fitted.weights)
    empty = pd.DataFrame()
    return (vectors, pd.concat(histories, ignore_index=True) if histories else empty,
            pd.concat(weights, ignore_index=True) if weights else empty)


def _cached_calibration(ctx: RunContext, cond: Condition, init: torch.Tensor,
                        latent_basis: tuple[np.ndarray, torch.Tensor] | None, train: Targets, val: Targets,
                        cfg: CalibrationConfig, desc: str) -> dict[str, pd.DataFrame]:
    """`calibrate` as frames (`history`; `params` with `param` and `active`), cached by everything it depends on;
    `latent_basis` is (latents, their decoder rows), None for a dense vector."""
    key = {"model": ctx.model_key, "sae": ctx.sae_keys[cond.layer], "layer": cond.layer,
           "latents": None if latent_basis is None else latent_basis[0].tolist(), "init": content_hash(init.tolist()),
           "train": content_hash([train.prompt_ids, train.response_ids, train.teacher_prompt_ids]),
           "val": content_hash([val.prompt_ids, val.response_ids, val.teacher_prompt_ids]),
           "config": asdict(cfg), "code": sha256_file(calibrate.__code__.co_filename)[:16]}

    def compute() -> dict[str, pd.DataFrame]:
        basis = None if latent_basis is None else latent_basis[1]
        result = calibrate(ctx.model, cond.layer, init, basis, train, val, cfg, ctx.remote, desc)
        return {"history": result.history,
                "params": pd.DataFrame({"param": result.params.numpy(), "active": result.active.numpy()})}

    return cached_frames("calibration", key, compute)


def calibration_diagnosis(setup: SteeringSetup, tuned: dict[Search, Condition], fitter: MethodFitter,
                          calibration: pd.DataFrame, sweep: pd.DataFrame) -> pd.DataFrame:
    """Does the calibration objective track following? Per calibrated task, the val NLL of the accepted prompted
    responses (the objective, with a 95 % CI over targets) beside val accuracy, for SAIF (calibration's start), each
    calibrated method at its best round and diff-in-means at its own chosen configuration. If diff-in-means has the
    worse objective but the better accuracy, the objective, not the optimiser, is what limits calibration."""
    ctx, cfg = setup.ctx, setup.cfg
    if calibration.empty or not calibration["calibrated"].any():
        return pd.DataFrame()
    val_rows = sweep[sweep["split"] == "val"]
    rows = []
    for task, history in calibration[calibration["calibrated"]].groupby("task", sort=False):
        targets = fitter.targets("val")[task]
        nll = {"saif": history[history["round"] == 0].iloc[0]}
        nll |= {method: h[h["best"]].iloc[0] for method, h in history.groupby("method", sort=False)}
        dim = tuned.get((task, "diff_in_means"))
        if dim is not None:
            vector, _ = get_method("diff_in_means").vector(setup.source, dim)
            mean, row_nll, row_tokens = target_nll(ctx.model, dim.layer, vector, None, targets,
                                                   cfg.calibration.batch_size, ctx.remote)
            _, low, high = ratio_ci(row_nll, row_tokens, seed=cfg.seed)
            nll["diff_in_means"] = {"val_nll": mean, "val_nll_ci_low": low, "val_nll_ci_high": high}
        for cond in reported_conditions(cfg, tuned):
            if cond.task != task or cond.method not in nll:
                continue
            acc = rows_at(val_rows, task, cond.method, cond.layer, cond.alpha, cond.k, cond.position)
            objective = nll[cond.method]
            rows.append({"task": task, "method": cond.method, "layer": cond.layer, "k": cond.k, "alpha": cond.alpha,
                         "position": cond.position, "n_val_targets": len(targets),
                         **{c: objective[c] for c in ("val_nll", "val_nll_ci_low", "val_nll_ci_high")},
                         **(acc.iloc[0][["n", "strict_acc", "strict_ci_low", "strict_ci_high", "loose_acc",
                                         "loose_ci_low", "loose_ci_high"]].to_dict() if len(acc) else {})})
    return pd.DataFrame(rows)


def objective_verdicts(diagnosis: pd.DataFrame) -> list[str]:
    """One sentence per task: whether diff-in-means has the worse calibration objective but the better val accuracy
    than the best calibrated method (then the objective, not the optimiser, limits calibration), with the numbers."""
    lines = []
    for task, rows in diagnosis.groupby("task", sort=False):
        by_method = rows.set_index("method")
        calibrated = by_method[by_method.index.isin([m for m in METHODS if METHODS[m].fits])]
        if "diff_in_means" not in by_method.index or calibrated.empty or "loose_acc" not in by_method:
            continue
        dim, best = by_method.loc["diff_in_means"], calibrated.sort_values("val_nll").iloc[0]
        if pd.isna(dim["loose_acc"]) or pd.isna(best["loose_acc"]):
            continue
        limited = dim["val_nll"] > best["val_nll"] and dim["loose_acc"] > best["loose_acc"]
        lines.append(f"{task}: diff-in-means val NLL {dim['val_nll']:.3f} vs {best.name} {best['val_nll']:.3f}; val "
                     f"loose accuracy {dim['loose_acc']:.2f} vs {best['loose_acc']:.2f} (n={int(dim['n'])}) — "
                     + ("the objective, not the optimiser, is the limit: a worse NLL steers better"
                        if limited else "no sign that the objective misleads here"))
    return lines


SPANS = ("saif", "best")
"""The decomposition's spans: SAIF's top-k latents by its own rank, and the k that reconstruct diff-in-means best."""


def decompose(setup: SteeringSetup, tuned: dict[Search, Condition], fitter: MethodFitter
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per task at SAIF's chosen layer and position: the cosine of SAIF's vector with diff-in-means, the share of
    diff-in-means' squared norm inside the span of SAIF's top-k decoder directions and inside that of the k which
    reconstruct it best (`decomposition.best_latents`), for each k of `decomposition_ks` and SAIF's own k; and val
    accuracy when
    steering with diff-in-means projected on each span (rescaled to diff-in-means' chosen α, so only the direction
    changes), beside diff-in-means itself at that layer. Returns the table and the judged val responses."""
    cfg, source = setup.cfg, setup.source
    prompts = setup.prompts("val", None)
    rows, jobs = [], []
    for task in cfg.tasks:
        saif, dim = tuned.get((task, "saif")), tuned.get((task, "diff_in_means"))
        if saif is None or dim is None or not cfg.decomposition_ks:
            continue
        layer, position = saif.layer, saif.position
        direction = source.directions[DirectionKey(task, layer, position)].float()
        decoder = source.saes[layer].W_dec.detach().float().cpu()
        saif_order = fitter.candidates(task, layer, position, max(*cfg.decomposition_ks, saif.k))["latent"].to_numpy()
        keys = {"task": task, "layer": layer, "position": position, "alpha": dim.alpha,
                "cosine_saif_dim": cosine(source.latent_vector(saif)[0], direction), "saif_k": saif.k}
        vectors = [({"span": "diff_in_means", "k": np.nan, "n_latents": 0, "norm_share": 1.0}, direction)]
        for k in sorted({*cfg.decomposition_ks, saif.k}):
            spans = {"saif": saif_order[:k], "best": best_latents(direction, decoder, min(k, len(decoder)))}
            for span, latents in spans.items():
                if len(latents) < k:  # SAIF has fewer positive-score latents than k here
                    continue
                basis = unit_rows(decoder[torch.tensor(latents, dtype=torch.long)])
                vectors.append(({"span": span, "k": k, "n_latents": len(latents),
                                 "norm_share": span_share(direction, basis)}, project_on_span(direction, basis)))
        for info, vector in vectors:
            edit = AddVector(scale_direction(vector, dim.alpha, source.norms[layer]))
            cond = Condition(task, "diff_in_means", layer, None if np.isnan(info["k"]) else int(info["k"]), dim.alpha,
                             position)
            jobs.append(GenerationJob(cond, prompts, np.zeros(len(prompts), int), [edit] * len(prompts),
                                      info["n_latents"]))
            rows.append(keys | info)
    if not jobs:
        return pd.DataFrame(), pd.DataFrame()
    tables = evaluate_jobs(setup, jobs, "val")
    judged = pd.concat([t.assign(span=row["span"]) for t, row in zip(tables, rows)], ignore_index=True)
    accuracy = accuracy_table(judged, ["task", "span", "k"], cfg.seed)  # k NaN: diff-in-means itself
    table = pd.DataFrame(rows).merge(accuracy, on=["task", "span", "k"], how="left")
    return table, judged


@dataclass(frozen=True)
class SweepResult:
    """`sweep`: one row per evaluated condition and split; `results`: the test rows (the reported configuration of
    every task × method); `generations`: every prompt, condition and judged response; `norms`: the residual scale;
    `calibration` / `calibrated_weights`: the calibrating methods' rounds and SAIF's latent weights before and after;
    `latent_rankings`: the ranking methods' orders of latents."""

    sweep: pd.DataFrame
    results: pd.DataFrame
    generations: pd.DataFrame
    norms: pd.DataFrame
    calibration: pd.DataFrame
    calibrated_weights: pd.DataFrame
    latent_rankings: pd.DataFrame
    """The ranking methods' own orders of latents (`method` column), e.g. saif_output's by effect on the output."""
    decomposition: pd.DataFrame
    """Diff-in-means against spans of decoder directions at SAIF's layer (`decompose`)."""
    calibration_diagnosis: pd.DataFrame
    """The calibration objective beside val accuracy, diff-in-means included (`calibration_diagnosis`)."""


def run(ctx: RunContext, cfg: SweepConfig) -> SweepResult:
    """Tune the tuned methods on val, evaluate every method on test, and write the tables."""
    cfg = ctx.with_default_tasks(cfg)
    setup = build_setup(ctx, cfg)
    validate_setup(setup)
    fitter = MethodFitter(setup)
    rankings = rank_methods(setup, fitter, tuple(m for m in cfg.ranking_methods if m not in cfg.anchored_methods))
    setup.source = replace(setup.source, rankings=rankings)
    searches = [(task, method) for task in cfg.tasks for method in cfg.tuned_methods
                if method not in cfg.anchored_methods]
    tuned, judged = tune(setup, searches) if searches else ({}, [])
    if cfg.anchored_methods:  # searched where their anchor chose, so after it, ranked there first if they rank
        rankings |= rank_methods(setup, fitter, tuple(m for m in cfg.ranking_methods if m in cfg.anchored_methods),
                                 tuned)
        setup.source = replace(setup.source, rankings=rankings)
        anchored, anchored_judged = tune(setup, [(task, m) for task in cfg.tasks for m in cfg.anchored_methods],
                                         tuned)
        tuned, judged = tuned | anchored, judged + anchored_judged
    decomposition, decomposition_judged = decompose(setup, tuned, fitter)
    calibration, weights = pd.DataFrame(), pd.DataFrame()
    if cfg.fitted_methods:
        vectors, calibration, weights = fit_methods(setup, tuned, fitter)
        setup.source = replace(setup.source, fitted=vectors)
        # on val too, so that a variant can be chosen among SAIF's on val like the tuned ones
        fitted = [c for c in reported_conditions(cfg, tuned) if (c.task, c.method) in vectors]
        judged += evaluate_many(setup, fitted, "val")
    judged += evaluate_many(setup, reported_conditions(cfg, tuned), "test")
    generations = pd.concat(judged, ignore_index=True)
    sweep = accuracy_table(generations, CONDITION_KEYS + ["n_latents"], cfg.seed)
    diagnosis = calibration_diagnosis(setup, tuned, fitter, calibration, sweep)
    norms = pd.DataFrame({"layer": list(setup.source.norms), "mean_norm": list(setup.source.norms.values()),
                          "n_prompts": setup.n_norm_prompts})
    test = sweep[sweep["split"] == "test"].merge(paired_comparisons(generations, cfg.seed), on=["task", "method"],
                                                 how="left")
    ranked = pd.concat([r.assign(method=name) for name, r in rankings.items()], ignore_index=True) if rankings \
        else pd.DataFrame()
    result = SweepResult(sweep, test, generations, norms, calibration, weights, ranked, decomposition, diagnosis)
    out = ctx.run.stage(NAME)
    if cfg.fitted_methods:
        write_table(calibration, out / "calibration.csv")
        write_table(weights, out / "calibrated_weights.csv")
    if len(diagnosis):
        write_table(diagnosis, out / "calibration_diagnosis.csv")
    if len(fitter.target_table):
        write_table(fitter.target_table.drop(columns=["input_ids", "user_text"], errors="ignore"),
                    out / "calibration_targets.parquet")
    if len(ranked):
        write_table(ranked, out / "latent_rankings.csv")
    if len(decomposition):
        write_table(decomposition, out / "decomposition.csv")
        write_table(decomposition_judged, out / "decomposition_generations.parquet")
    ctx.run.write_config(NAME, cfg)
    write_table(result.norms, out / "residual_norms.csv")
    write_table(result.sweep, out / "sweep.parquet")
    write_table(result.results, out / "results.csv")
    write_table(result.generations, out / "generations.parquet")
    return result


def paired_comparisons(generations: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per task and method on test, each passage a unit: for every score in `SCORES`, the paired difference to each
    method of `BASELINES` run on the task (`<score>_vs_<baseline>`, with `_ci_low` / `_ci_high`; NaN against itself)
    and the share of prompting's gain over no instruction it recovers (`<score>_recovered`, with its CI; NaN where
    prompting does not beat no instruction, `stats.recovered_share_ci`)."""
    test = generations[generations["split"] == "test"]
    rows = []
    for task, group in test.groupby("task", sort=False):
        per_passage = {score: group.pivot_table(index="passage_id", columns="method", values=score, aggfunc="mean")
                       for score in SCORES}
        for method in group["method"].unique():
            row = {"task": task, "method": method}
            for score, table in per_passage.items():
                for baseline in BASELINES:
                    name = f"{score}_vs_{baseline}"
                    both = table[[method, baseline]].dropna() if baseline in table and baseline != method else None
                    row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = (
                        (np.nan,) * 3 if both is None else paired_diff_ci(both[method], both[baseline], seed))
                name = f"{score}_recovered"
                if {FLOOR, CEILING} <= set(table):
                    units = table[list(dict.fromkeys([method, FLOOR, CEILING]))].dropna()
                    row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = recovered_share_ci(
                        units[method], units[FLOOR], units[CEILING], seed)
                else:
                    row[name] = row[f"{name}_ci_low"] = row[f"{name}_ci_high"] = np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def nll_prefix(tokenizer) -> list[int]:
    """Token ids of a chat prompt with an empty user turn (the context fluency is scored in)."""
    return tokenizer(chat_prompt(tokenizer, ""), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- analysis of the sweep
def chosen_configs(results: pd.DataFrame, method: str = "saif") -> pd.DataFrame:
    """The test configuration (layer, k, α, position) of `method` per task, indexed by task."""
    return results[results["method"] == method].set_index("task")[["layer", "k", "alpha", "position"]]


def k_curve(sweep: pd.DataFrame, results: pd.DataFrame, first_position: str) -> pd.DataFrame:
    """SAIF's val rows over k at each task's chosen layer and α, extracted at `first_position` (where the staged
    search varies k)."""
    val = sweep[(sweep["split"] == "val") & (sweep["method"] == "saif") & sweep["k"].notna()]
    parts = [rows_at(val, task, "saif", c.layer, c.alpha, None, first_position)
             for task, c in chosen_configs(results).iterrows()]
    return pd.concat(parts, ignore_index=True) if parts else val.iloc[:0]


def alpha_curve(sweep: pd.DataFrame, k_start: int, first_position: str) -> pd.DataFrame:
    """SAIF's val rows over α at every layer, at `k_start` latents extracted at `first_position`."""
    val = sweep[(sweep["split"] == "val") & (sweep["method"] == "saif")]
    return val[(val["k"] == k_start) & (val["position"] == first_position)].reset_index(drop=True)


def layer_curve(sweep: pd.DataFrame, k_start: int, first_position: str) -> pd.DataFrame:
    """Per task, tuned method and layer, the val row with the best `selection_objective` over α (latent methods at
    `k_start`, extracted at `first_position`)."""
    val = sweep[(sweep["split"] == "val") & (sweep["position"] == first_position)]
    val = val[val["method"].map(lambda m: m in METHODS and METHODS[m].tuned)]
    val = val[val["k"].isna() | (val["k"] == k_start)]
    return (val.assign(objective=selection_objective(val)).sort_values("objective", ascending=False, kind="stable")
            .groupby(["task", "method", "layer"]).head(1).reset_index(drop=True))


def rows_at(rows: pd.DataFrame, task: str, method: str, layer: int, alpha: float, k: float | None,
            position: str | None = None) -> pd.DataFrame:
    """The rows of `rows` at one configuration; k is not matched when missing (methods without latents), nor the
    position when None."""
    same = rows[(rows["task"] == task) & (rows["method"] == method) & (rows["layer"] == layer)
                & (rows["alpha"] == alpha)]
    same = same[same["position"] == position] if position is not None else same
    return same[same["k"] == k] if pd.notna(k) else same


def pre_post_pairs(sweep: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """For every task and tuned method, its val rows at the chosen layer, k and α, one per extraction position (in the
    order of `results`)."""
    val = sweep[sweep["split"] == "val"]
    tuned = results[results["method"].map(lambda m: m in METHODS and METHODS[m].tuned)]
    parts = [rows_at(val, row.task, row.method, row.layer, row.alpha, row.k) for row in tuned.itertuples()]
    return pd.concat(parts, ignore_index=True) if parts else val.iloc[:0]
