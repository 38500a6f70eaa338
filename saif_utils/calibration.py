"""Calibrated steering vectors: refine a vector's parameters so that the model, with no instruction in its prompt,
gives high likelihood to its own instruction-following responses.

The vector is `params @ basis`: for `saif_calibrated` the basis is the decoder rows of the k selected latents and the
parameters are their weights (the SAE's directions stay fixed); for `optimized_dense` the basis is the identity and
every residual coordinate is free (the upper bound on what any vector at that layer can do under this objective).
The model and the SAE stay frozen. Each round is one seeded pass of Adam over the train targets, in fixed
minibatches visited in a new order each round; rounds go on until the validation NLL has not improved for `patience`
rounds (by more than `min_improvement`; `max_rounds` only caps a run that never settles), and the round with the best
validation NLL is kept. The train split is evaluated only where it is reported: at the start and at the kept round
(between them, the objective the Adam steps saw comes free with their gradients).
Between rounds, latents whose weight fell below a fraction of the largest are pruned (fixed at zero).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from .architectures import blocks, final_norm, skip_blocks_through
from .interventions import AddVector
from .logits import coarse_kl, coarse_kl_and_logprob, scored_token_logprob
from .models import length_buckets, residual_batches, server_errors, trim_heap
from .progress import tqdm
from .stats import ratio_ci


@dataclass(frozen=True)
class Targets:
    """Teacher-forcing pairs: prompts without the instruction and the responses the model gave with it; optionally the
    prompts with the instruction (`teacher_prompt_ids`) and, read from them, the prompted model's next-token
    distribution along each response (`teacher`: per target its top-K token ids and log-probabilities [len, K])."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    teacher_prompt_ids: list[list[int]] | None = None
    teacher: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if len(self.prompt_ids) != len(self.response_ids):
            raise ValueError(f"{len(self.prompt_ids)} prompts but {len(self.response_ids)} responses")
        if any(len(r) == 0 for r in self.response_ids):
            raise ValueError("a calibration target has an empty response; drop it before calibrating")
        for name in ("teacher_prompt_ids", "teacher"):
            if getattr(self, name) is not None and len(getattr(self, name)) != len(self.prompt_ids):
                raise ValueError(f"{len(self.prompt_ids)} prompts but {len(getattr(self, name))} {name}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, rows: Sequence[int]) -> Targets:
        """The targets at `rows`."""
        pick = (lambda values: None if values is None else [values[i] for i in rows])  # noqa: E731
        return Targets(pick(self.prompt_ids), pick(self.response_ids), pick(self.teacher_prompt_ids),
                       pick(self.teacher))

    def sequences(self) -> list[list[int]]:
        """Each target's prompt followed by its response: what the model reads."""
        return [list(p) + list(r) for p, r in zip(self.prompt_ids, self.response_ids)]

    def batches(self, batch_size: int) -> Iterator[Targets]:
        """Consecutive subsets of `batch_size` targets (the last may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield self.subset(range(start, min(start + batch_size, len(self))))


OBJECTIVES = ("nll", "kl")


@dataclass(frozen=True)
class CalibrationConfig:
    """How the parameters are refined."""

    max_rounds: int = 30
    """Cap on rounds (one Adam pass over the train targets each) for a run whose validation NLL never settles; the
    history says whether a run stopped by `patience` (converged) or by this cap."""
    patience: int = 2
    """Stop after this many rounds without a validation objective better by `min_improvement`."""
    min_improvement: float = 0.002
    """Relative fall in the validation objective below the best so far that counts as progress: a run creeping down
    by less (0.1 % a round on a plateau) has settled, and patience alone would let it run to the cap."""
    lr: float = 0.1
    """Adam step per coordinate, relative to the initial parameters' RMS (the same relative step for k weights and
    for a d_model vector)."""
    batch_size: int = 16
    """Targets per Adam step."""
    grad_rows: int = 4
    """Targets per backward pass: a step's gradient is summed over chunks of this many, so autograd keeps one chunk's
    activations (the default profile: ≈ 0.12 GB per target) — the same gradient to float rounding."""
    prune_fraction: float = 0.05
    """After a round, latents with |weight| below this fraction of the largest are fixed at zero (latent basis only)."""
    seed: int = 0
    """Seed of the batch order."""
    objective: str = "nll"
    """What the steered model is fitted to: 'nll', the likelihood of the prompted responses; 'kl', the KL divergence
    from the prompted model's next-token distributions along the same responses (`teacher_top_k` tokens each)."""
    teacher_top_k: int = 256
    """Tokens of the prompted model's distribution kept per position for the 'kl' objective (the rest is one bucket)."""

    def __post_init__(self) -> None:
        if self.max_rounds < 1 or self.patience < 1 or self.batch_size < 1 or self.grad_rows < 1:
            raise ValueError("max_rounds, patience, batch_size and grad_rows must be ≥ 1")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}; allowed: {list(OBJECTIVES)}")
        if not (self.lr > 0 and 0 <= self.prune_fraction < 1 and 0 <= self.min_improvement < 1):
            raise ValueError(f"lr={self.lr} must be > 0, prune_fraction={self.prune_fraction} and "
                             f"min_improvement={self.min_improvement} in [0, 1)")


@contextlib.contextmanager
def frozen_weights(module: torch.nn.Module) -> Iterator[None]:
    """No gradient for the module's own weights inside the block: the graph then keeps only what the steering
    parameters' gradient needs (locally; a remote model's weights live on the server)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class SteeredNLL(NamedTuple):
    """What `steered_nll` measured on a batch of targets."""

    total: float
    """Summed objective (NLL or KL) over every response token."""
    n_tokens: int
    grad: torch.Tensor | None
    """d total / d params (with `backward`)."""
    row_nll: np.ndarray | None
    """Each target's summed NLL, in the order given (the units a confidence interval resamples); None for a 'kl'
    backward pass, which does not need it."""
    row_tokens: np.ndarray
    nll_total: float | None
    """Summed NLL of every response token (`total` for 'nll'; None where `row_nll` is)."""


def block_outputs(model, layer: int, targets: Targets, batch_size: int) -> list[torch.Tensor]:
    """Decoder block `layer`'s output `[B, S, d]`, unedited, for each batch of `targets.batches(batch_size)`, batched as
    `steered_nll` batches it: what `target_nll` takes as `below`."""
    outputs = []
    for part in targets.batches(batch_size):
        (_, resid), = residual_batches(model, part.sequences(), [layer], batch_size=len(part))
        outputs.append(resid[layer])
    return outputs


def response_mask(batch, response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, width − 1] bool: the logit columns of each batch row that predict its response tokens (left padding: a
    row's response fills its last len(response) columns, and logit column j predicts token j + 1)."""
    width = batch.input_ids.shape[1]
    predicts = torch.zeros(len(batch.rows), width - 1, dtype=torch.bool)
    for r, i in enumerate(batch.rows):
        predicts[r, width - 1 - len(response_ids[i]):] = True
    return predicts


def with_teacher(model, targets: Targets, top_k: int, batch_size: int, remote: bool = False) -> Targets:
    """`targets` with `teacher` filled: the prompted model's top-`top_k` next-token log-probabilities at each response
    token, read with the instruction in the prompt (`teacher_prompt_ids`) and no edit."""
    from .logits import LOGIT_CHUNK, vocab_logprobs

    if targets.teacher_prompt_ids is None:
        raise ValueError("the 'kl' objective needs the prompts with the instruction (Targets.teacher_prompt_ids)")
    sequences = [list(p) + list(r) for p, r in zip(targets.teacher_prompt_ids, targets.response_ids)]
    top_k = min(top_k, len(model.tokenizer))  # the logits are at least as wide as the tokenizer's vocabulary
    teacher: list = [None] * len(targets)
    for batch in length_buckets(sequences, batch_size, model.tokenizer.pad_token_id):
        predicts = response_mask(batch, targets.response_ids)
        with torch.no_grad(), server_errors(remote, "reading the prompted model's distributions"), \
                model.trace(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                            remote=remote) as tracer:
            normed = final_norm(model).output
            hidden = normed[:, :-1][predicts.to(normed.device)]
            tops = [vocab_logprobs(model, hidden[start:start + LOGIT_CHUNK]).topk(top_k, dim=-1)
                    for start in range(0, hidden.shape[0], LOGIT_CHUNK)]
            logp = torch.cat([t.values for t in tops]).cpu().save()
            idx = torch.cat([t.indices for t in tops]).cpu().save()
            tracer.stop()
        trim_heap()
        for i, part_idx, part_logp in zip(batch.rows, idx.split(predicts.sum(1).tolist()),
                                          logp.split(predicts.sum(1).tolist())):
            teacher[i] = (part_idx.clone(), part_logp.clone())
    return Targets(targets.prompt_ids, targets.response_ids, targets.teacher_prompt_ids, teacher)


def steered_nll(model, layer: int, params: torch.Tensor, basis: torch.Tensor | None, targets: Targets,
                backward: bool = False, remote: bool = False, below: torch.Tensor | None = None,
                objective: str = "nll") -> SteeredNLL:
    """Summed negative log-likelihood of the responses (teacher-forced) with the vector `params @ basis` (`basis` None:
    `params` is the vector) added to decoder block `layer`'s output at every position, as steered generation adds it;
    the number of response tokens; with `backward` the gradient of the sum with respect to `params`; and per target.

    The vector is built and differentiated inside the trace, so on NDIF the server computes the gradient and only it
    travels back; `autograd.grad` (not `backward`) leaves the model's own weights without a `.grad`.

    `below`, block `layer`'s unedited output over these targets (`block_outputs` with one batch), skips blocks
    0 … `layer`: the vector enters after them, so they would recompute it exactly, and the NLL is bitwise the same
    without their cost.

    With `objective` 'kl' the summed quantity is instead KL(prompted ‖ steered) at each response token
    (`logits.coarse_kl` against `targets.teacher`, see `with_teacher`); without `backward` the NLL comes from the
    same LM-head pass."""
    full = targets.sequences()
    batch = next(iter(length_buckets(full, len(full), model.tokenizer.pad_token_id)))
    if below is not None and below.shape[:2] != batch.input_ids.shape:
        raise ValueError(f"below has shape {tuple(below.shape)}, but these targets batch to "
                         f"{tuple(batch.input_ids.shape)}: pass block_outputs of these targets, batched as here")
    if objective == "kl" and targets.teacher is None:
        raise ValueError("the 'kl' objective needs the prompted model's distributions: Targets from with_teacher")
    predicts = response_mask(batch, targets.response_ids)
    next_ids = batch.input_ids[:, 1:][predicts]
    if objective == "kl":  # in the order the predictions flatten: batch row by row
        teacher_idx = torch.cat([targets.teacher[i][0] for i in batch.rows])
        teacher_logp = torch.cat([targets.teacher[i][1] for i in batch.rows])
    grad = token_nll = None  # set before the trace: nnsight hands back only what the trace `save`s
    # Without `backward` no graph at all: the model's weights require grad outside `frozen_weights` (the round-0
    # evaluation), and the graph of a 16-target batch through every block held ≈ 2 GB of activations.
    grad_mode = torch.enable_grad() if backward else torch.no_grad()
    with grad_mode, server_errors(remote, "calibrating a steering vector"), \
            model.trace(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, remote=remote) as tracer:
        leaf = params.detach().clone().requires_grad_(backward)
        vector = leaf @ basis if basis is not None else leaf
        if below is None:
            resid = blocks(model)[layer].output
            resid[:] = resid + AddVector(vector).delta(resid)
        else:
            stand_in = below.to(blocks(model)[0].input.device)  # the device the blocks run on (a no-op on CPU)
            skip_blocks_through(model, layer, stand_in, stand_in + AddVector(vector).delta(stand_in))
        normed = final_norm(model).output
        hidden = normed[:, :-1][predicts.to(normed.device)]
        if objective == "kl" and backward:
            token_objective = coarse_kl(model, hidden, teacher_idx.to(hidden.device), teacher_logp.to(hidden.device))
        elif objective == "kl":
            token_objective, token_logprob = coarse_kl_and_logprob(
                model, hidden, teacher_idx.to(hidden.device), teacher_logp.to(hidden.device),
                next_ids.to(hidden.device))
            token_nll = (-token_logprob).cpu().save()
        else:
            token_objective = -scored_token_logprob(model, hidden, next_ids.to(hidden.device))
        summed = token_objective.sum()  # bit-identical to summing first and negating after: negation is exact
        if backward:
            grad = torch.autograd.grad(summed, leaf)[0].cpu().save()
        total = summed.detach().cpu().save()
        per_token = token_objective.detach().cpu().save()
        tracer.stop()  # the model's LM head would build [batch, seq, vocab] logits; ours ran in chunks
    trim_heap()  # the stopped trace left the model's frames in a reference cycle (see `trim_heap`); not measured here
    # `predicts` is row-major: each batch row's predictions are contiguous; batch row r holds target batch.rows[r].
    row_tokens = np.zeros(len(full), dtype=np.int64)
    row_tokens[batch.rows] = predicts.sum(1).numpy()

    def row_sums(values: torch.Tensor) -> np.ndarray:
        sums = np.zeros(len(full))
        sums[batch.rows] = [part.double().sum().item() for part in values.split(predicts.sum(1).tolist())]
        return sums

    if objective == "nll":
        row_nll, nll_total = row_sums(per_token), float(total)
    else:  # the float32 sum the 'nll' path takes, over the same per-token values
        row_nll, nll_total = (None, None) if token_nll is None else (row_sums(token_nll), float(token_nll.sum()))
    return SteeredNLL(float(total), int(predicts.sum()), grad, row_nll, row_tokens, nll_total)


class TargetScores(NamedTuple):
    """What `target_scores` measured over all targets."""

    nll: float
    """Mean NLL per response token."""
    row_nll: np.ndarray
    """Each target's summed NLL (the units a confidence interval resamples)."""
    row_tokens: np.ndarray
    objective: float
    """Mean objective per response token (the NLL itself for 'nll')."""


def target_scores(model, layer: int, params: torch.Tensor, basis: torch.Tensor | None, targets: Targets,
                  batch_size: int, remote: bool = False, below: Sequence[torch.Tensor] | None = None,
                  objective: str = "nll") -> TargetScores:
    """The NLL and `objective` of all targets (no gradient, one pass) with the vector `params @ basis`. `below`:
    `block_outputs(model, layer, targets, batch_size)`, which then skips the blocks up to `layer` (see `steered_nll`)."""
    parts = []
    with torch.no_grad():
        for b, part_targets in enumerate(targets.batches(batch_size)):
            parts.append(steered_nll(model, layer, params, basis, part_targets, remote=remote,
                                     below=None if below is None else below[b], objective=objective))
    n_tokens = sum(part.n_tokens for part in parts)
    return TargetScores(sum(part.nll_total for part in parts) / n_tokens,
                        np.concatenate([part.row_nll for part in parts]),
                        np.concatenate([part.row_tokens for part in parts]),
                        sum(part.total for part in parts) / n_tokens)


def target_nll(model, layer: int, params: torch.Tensor, basis: torch.Tensor | None, targets: Targets, batch_size: int,
               remote: bool = False, below: Sequence[torch.Tensor] | None = None
               ) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean NLL per response token over all targets (no gradient) with the vector `params @ basis`, and each target's
    sum and response length (for a confidence interval over targets); `below` as in `target_scores`."""
    return target_scores(model, layer, params, basis, targets, batch_size, remote, below)[:3]


def summed_gradient(model, layer: int, params: torch.Tensor, basis: torch.Tensor | None, targets: Targets,
                    rows_per_pass: int, remote: bool = False, below: Sequence[torch.Tensor] | None = None,
                    objective: str = "nll") -> tuple[torch.Tensor, int, float]:
    """d(summed objective of `targets`)/d params, backpropagated `rows_per_pass` targets at a time (the objective is a
    sum over targets, so the chunks' gradients add up to the whole batch's), the number of response tokens and the
    summed objective itself. `below`: `block_outputs(model, layer, targets, rows_per_pass)`, which then skips the
    blocks up to `layer`."""
    grad, n_tokens, total = torch.zeros_like(params), 0, 0.0
    for c, chunk in enumerate(targets.batches(rows_per_pass)):
        part = steered_nll(model, layer, params, basis, chunk, backward=True, remote=remote,
                           below=None if below is None else below[c], objective=objective)
        grad, n_tokens, total = grad + part.grad, n_tokens + part.n_tokens, total + part.total
    return grad, n_tokens, total


def mean_nll(model, layer: int, params: torch.Tensor, basis: torch.Tensor | None, targets: Targets, batch_size: int,
             remote: bool = False) -> float:
    """Mean NLL per response token over all targets (no gradient) with the vector `params @ basis`."""
    return target_nll(model, layer, params, basis, targets, batch_size, remote)[0]


@dataclass(frozen=True)
class Calibration:
    """The refined parameters (those of the best validation round), the round history and the kept-latent mask."""

    params: torch.Tensor
    history: pd.DataFrame
    """One row per round (0 = the initial vector): val_nll (with a 95 % CI over targets), val_objective (what is
    minimised: the NLL itself, or the KL), n_active, n_steps (Adam steps so far), best, converged (the run stopped
    because val stopped improving, not at the round cap); train_nll (with its CI) and train_objective at round 0 and
    at the kept round only (NaN between); and from round 1, train_running_objective, the mean objective of the
    round's minibatches as each Adam step saw it (before its update)."""
    active: torch.Tensor


def calibrate(model, layer: int, init: torch.Tensor, basis: torch.Tensor | None, train: Targets, val: Targets,
              cfg: CalibrationConfig, remote: bool = False, desc: str = "calibrating") -> Calibration:
    """Refine `init` (k latent weights over the rows of `basis` `[k, d]`, or with `basis` None a `[d]` vector) to
    minimise `cfg.objective` on `train` (the steered NLL, or the KL from the prompted model); keep the round with the
    lowest objective on `val`, stop after `cfg.patience` rounds without improvement. The history holds the NLL of
    both splits whatever the objective, and the objective itself (`train_objective`, `val_objective`)."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"calibration needs train and val targets (got {len(train)} and {len(val)})")
    if cfg.objective == "kl":  # the prompted model's distributions, read once
        train, val = (with_teacher(model, targets, cfg.teacher_top_k, cfg.batch_size, remote)
                      for targets in (train, val))
    params = init.detach().float().clone().requires_grad_(True)
    active = torch.ones_like(params, dtype=torch.bool) if basis is not None else None
    rms = float(params.detach().pow(2).mean().sqrt())
    optimiser = torch.optim.Adam([params], lr=cfg.lr * rms)
    order = torch.Generator().manual_seed(cfg.seed)
    # Fixed minibatches (a seeded draw, then only their order changes between rounds): every evaluation and every
    # backward chunk then reads the same targets, and the vector enters after block `layer`, so what the blocks up to
    # it compute is read once here and reused (bitwise the same NLL; the default's evaluations cost 0.2–0.5× as much,
    # and a training step skips those blocks too). On NDIF the server recomputes rather than receive these
    # activations with every request.
    train = train.subset(torch.randperm(len(train), generator=order).tolist())
    minibatches = [train.subset(range(start, min(start + cfg.batch_size, len(train))))
                   for start in range(0, len(train), cfg.batch_size)]
    splits = {"train": train, "val": val}
    below = {split: None if remote else block_outputs(model, layer, targets, cfg.batch_size)
             for split, targets in splits.items()}
    chunks_below = [None if remote else block_outputs(model, layer, batch, cfg.grad_rows) for batch in minibatches]

    def evaluate(at: torch.Tensor, split: str) -> dict:
        scores = target_scores(model, layer, at, basis, splits[split], cfg.batch_size, remote, below[split],
                               cfg.objective)
        _, low, high = ratio_ci(scores.row_nll, scores.row_tokens, seed=cfg.seed)
        return {f"{split}_nll": scores.nll, f"{split}_nll_ci_low": low, f"{split}_nll_ci_high": high,
                f"{split}_objective": scores.objective}

    def n_active() -> int:
        return int(active.sum()) if active is not None else params.numel()

    history = [{"round": 0, "n_steps": 0, "n_active": n_active()} | evaluate(params, "train") | evaluate(params, "val")]
    best_params, best_val, best_active, since_best = params.detach().clone(), history[0]["val_objective"], active, 0
    progress_mark = best_val  # the objective a round must beat by `min_improvement` to reset the patience count
    n_steps, converged = 0, False
    with frozen_weights(model._module):
        for round_no in tqdm(range(1, cfg.max_rounds + 1), desc=desc, leave=False):
            seen, seen_tokens = 0.0, 0
            for b in torch.randperm(len(minibatches), generator=order).tolist():
                grad, n_tokens, total = summed_gradient(model, layer, params, basis, minibatches[b], cfg.grad_rows,
                                                        remote, chunks_below[b], cfg.objective)
                seen, seen_tokens = seen + total, seen_tokens + n_tokens
                params.grad = grad / n_tokens  # the step follows the batch's mean per-token NLL
                optimiser.step()
                n_steps += 1
                if active is not None:
                    with torch.no_grad():
                        params[~active] = 0.0
            history.append({"round": round_no, "n_steps": n_steps, "n_active": n_active(),
                            "train_running_objective": seen / seen_tokens} | evaluate(params, "val"))
            val_objective = history[-1]["val_objective"]
            if val_objective < best_val:
                best_params, best_val = params.detach().clone(), val_objective
                best_active = active.clone() if active is not None else None
            if val_objective < progress_mark - cfg.min_improvement * abs(progress_mark):
                progress_mark, since_best = val_objective, 0
            else:
                since_best += 1
            if active is not None and cfg.prune_fraction > 0:
                with torch.no_grad():
                    active &= params.abs() >= cfg.prune_fraction * params.abs().max()
                    params[~active] = 0.0
            if since_best >= cfg.patience:
                converged = True
                break
    table = pd.DataFrame(history)
    table["best"] = table["val_objective"] == best_val
    kept_round = table.index[table["best"]][0]
    if kept_round > 0:  # the train split at the kept parameters: the same numbers as evaluating it in that round
        for column, value in evaluate(best_params, "train").items():
            table.loc[kept_round, column] = value
    table["converged"] = converged
    kept = best_active if best_active is not None else torch.ones_like(best_params, dtype=torch.bool)
    return Calibration(best_params, table, kept)


def initial_weights(basis: torch.Tensor, weights: Sequence[float], target_norm: float) -> torch.Tensor:
    """Latent weights proportional to `weights` whose decoder sum over `basis` (the latents' rows of W_dec, `[k, d]`)
    has norm `target_norm` — the SAIF vector α‖h̄‖·unit(Σ_j w_j W_dec[j]) written as weights, where calibration starts."""
    raw = torch.as_tensor(np.asarray(weights, dtype=np.float32))
    return raw * (target_norm / float((raw @ basis).norm()))
