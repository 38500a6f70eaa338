"""The playground: one content text, answered unsteered, with the instruction written in the prompt, and steered —
side by side with the checkers' verdicts — plus the steering latents' logit-lens tokens."""
from __future__ import annotations

import pandas as pd

from ..context import RunContext
from ..data import join_content
from ..evaluation import judge
from ..interventions import AddVector
from ..io import write_table
from ..methods import METHODS, Condition
from ..models import chat_prompt, tokenize
from ..semantics import logit_lens
from .steering import SteeringSetup, SweepConfig, build_setup

NAME = "07_playground"
def steering_methods() -> tuple[str, ...]:
    """Methods the playground steers with: those that add a vector to the bare content without fitting it or ranking
    latents first (plugins' methods included, once loaded)."""
    return tuple(name for name, method in METHODS.items()
                 if method.steers and not method.instructed and not method.fits and not method.ranks)


def compare_responses(setup: SteeringSetup, content: str, task: str, method: str, layer: int, k: int, alpha: float,
                      position: str = "post", max_new_tokens: int = 48) -> pd.DataFrame:
    """One row per answer — unsteered, prompted, steered — with the response, strict/loose verdicts and loop flag."""
    if method not in steering_methods():
        raise ValueError(f"method={method!r}; allowed: {list(steering_methods())}")
    if not content.strip():
        raise ValueError("content is empty; type a passage to answer")
    ctx = setup.ctx
    tok = ctx.tokenizer
    plain, prompted = tokenize(tok, [chat_prompt(tok, content),
                                     chat_prompt(tok, join_content(content, setup.instructions[task], "post"))])
    vector, n_latents = METHODS[method].vector(setup.source, Condition(task, method, layer, k, alpha, position))
    unsteered = ctx.generate([plain, prompted], None, None, max_new_tokens, desc="unsteered")
    steered = ctx.generate([plain], layer, AddVector(vector), max_new_tokens, desc="steered")
    labels = ["no instruction", f"prompted: {setup.instructions[task]!r}",
              f"{method} (L{layer}, k={n_latents or '—'}, α={alpha:g}, {position})"]
    responses = pd.DataFrame({"answer": labels, "task": task, "source": content,
                              "response": [tok.decode(ids, skip_special_tokens=True).strip()
                                           for ids in [*unsteered, *steered]]})
    return judge(responses, ctx.data.tasks())[["answer", "response", "strict", "loose", "degenerate"]]


def latent_tokens(setup: SteeringSetup, task: str, layer: int, position: str, k: int, top_n: int = 8) -> pd.DataFrame:
    """The top-k selected latents of a task (rank, latent, weight) with the tokens their decoder directions promote."""
    top = setup.source.latents(task, layer, position, k)
    if top.empty:
        return top
    directions = setup.source.saes[layer].W_dec.detach()[top["latent"].to_numpy(copy=True)]
    lens = logit_lens(setup.ctx.model, directions, top_n, setup.ctx.remote)
    return top[["rank", "latent", "weight"]].assign(top_tokens=[" | ".join(x["top_tokens"]) for x in lens])


def opening_setting(results: pd.DataFrame | None, tasks: tuple[str, ...], layers: list[int], **given) -> dict:
    """The playground's opening (task, layer, k, alpha, position): each value given (not None) is kept; the rest come
    from the SAIF configuration the steering stage chose for the task it steered best (highest test strict accuracy; ties →
    task name) when that is the task shown, else from the deepest layer, k = 15, α = 0.5, post."""
    setting = {"task": tasks[0], "layer": max(layers), "k": 15, "alpha": 0.5, "position": "post"}
    saif = None if results is None else results[(results["method"] == "saif") & results["task"].isin(tasks)]
    if saif is not None and not saif.empty:
        best = saif.sort_values(["strict_acc", "loose_acc", "task"], ascending=[False, False, True]).iloc[0]
        if given.get("task") in (None, best["task"]):
            setting = {"task": best["task"], "layer": int(best["layer"]), "k": int(best["k"]),
                       "alpha": float(best["alpha"]), "position": best["position"]}
    setting |= {name: value for name, value in given.items() if value is not None}
    if setting["task"] not in tasks:
        raise ValueError(f"task={setting['task']!r} has no selected latents in the discovery stage's output; allowed: {list(tasks)}")
    if setting["layer"] not in layers:
        raise ValueError(f"layer={setting['layer']} has no SAE; allowed: {sorted(layers)}")
    return setting


def open_playground(ctx: RunContext, **given) -> tuple[SteeringSetup, dict]:
    """The steering setup over every task with selected latents (no passages: the user types the content) and the
    opening setting (`opening_setting`; k capped at the number of selected latents)."""
    selected = ctx.run.selected_latents()
    tasks = tuple(sorted(selected["task"].unique()))
    opening = opening_setting(ctx.run.steering_results(), tasks, sorted(ctx.saes), **given)
    opening["k"] = min(opening["k"], int(selected["rank"].max()))
    return build_setup(ctx, ctx.stage_config(SweepConfig, tasks=tasks), splits=()), opening


def save_comparison(ctx: RunContext, comparison: pd.DataFrame) -> None:
    """Record the comparison the notebook ran with its opening setting (headless runs keep one)."""
    write_table(comparison, ctx.run.stage(NAME) / "default_comparison.csv")
