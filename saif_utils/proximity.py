"""Semantic proximity of selected latents: logit lens of decoder directions, cosine with the model's own
representation of the instruction, and task × task overlap — each beside a random-latent control."""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from .discovery import jaccard
from .io import cached_json, content_hash
from .models import chat_prompt, read_residual, tokenize

FRENCH_WORDS = {"le", "la", "les", "des", "du", "une", "un", "et", "est", "sont", "pour", "que", "qui", "dans", "sur",
                "avec", "il", "elle", "ils", "elles", "nous", "vous", "ce", "cette", "au", "aux", "pas", "été", "ét",
                "français", "française", "francais", "traduction", "traduire"}


def is_french_related(token: str) -> bool:
    """True for tokens naming French ('French', 'fr', 'Fran…') or that are common French function words."""
    word = token.strip().lower()
    return bool(re.match(r"^(french|fr$|fran)", word)) or word in FRENCH_WORDS


@torch.inference_mode()
def logit_lens(hf_model, tokenizer, directions: torch.Tensor, top_n: int = 20) -> list[dict]:
    """Top and bottom `top_n` tokens of each direction `[k, d_model]` read through the final norm and unembedding."""
    norm = hf_model.model.norm
    logits = hf_model.lm_head(norm(directions.to(hf_model.lm_head.weight)[:, None, :]))[:, 0]
    top = torch.topk(logits, top_n, dim=-1).indices
    bottom = torch.topk(-logits, top_n, dim=-1).indices
    # Decode each distinct token once (thousands of directions share most of their top tokens).
    distinct = torch.unique(torch.cat([top, bottom])).tolist()
    text = dict(zip(distinct, tokenizer.batch_decode([[t] for t in distinct])))
    return [{"top_tokens": [text[t] for t in t_row], "bottom_tokens": [text[t] for t in b_row]}
            for t_row, b_row in zip(top.tolist(), bottom.tolist())]


def instruction_directions(model, instructions: dict[str, Sequence[str]], contents: Sequence[str],
                           layers: Sequence[int], batch_size: int = 16, remote: bool = False,
                           model_key: str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """The model's own representation of each task's instruction: mean residual at the last prompt token over the
    task's instruction texts (alone, chat-formatted) minus the mean over content-only prompts → `{layer: {task: [d]}}`.
    Cached by prompt content when `model_key` names the weights."""
    tok = model.tokenizer
    tasks = list(instructions)
    texts = [chat_prompt(tok, t) for task in tasks for t in instructions[task]] + [chat_prompt(tok, c) for c in contents]
    token_ids = tokenize(tok, texts)

    def compute() -> dict:
        resid = read_residual(model, token_ids, layers, batch_size=batch_size, remote=remote)
        return {"resid": {str(layer): acts.float().tolist() for layer, acts in resid.items()}}

    key = None if model_key is None else {"model": model_key, "ids": content_hash(token_ids), "layers": sorted(layers),
                                          "batch_size": batch_size}
    entry = cached_json("instruction_residuals", key, compute)
    resid = {layer: torch.tensor(entry["resid"][str(layer)]) for layer in layers}
    out = {}
    for layer, acts in resid.items():
        baseline = acts[-len(contents):].mean(0)
        start, out[layer] = 0, {}
        for task in tasks:
            n = len(instructions[task])
            out[layer][task] = acts[start:start + n].mean(0) - baseline
            start += n
    return out


def cosine(directions: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Cosine similarity of each row of `directions` with `target`."""
    return torch.nn.functional.cosine_similarity(directions.float().cpu(), target.float().cpu()[None, :], dim=-1).numpy()


def random_control(selected: pd.DataFrame, d_sae: dict[int, int], seed: int = 0) -> pd.DataFrame:
    """For every selection, the same number of latents drawn uniformly at random (excluding the selected ones)."""
    rng = np.random.default_rng(seed)
    rows = []
    for keys, group in selected.groupby(["task", "layer", "position", "contrast"]):
        pool = np.setdiff1d(np.arange(d_sae[keys[1]]), group["latent"].to_numpy())
        for rank, latent in enumerate(rng.choice(pool, size=len(group), replace=False), 1):
            rows.append(dict(zip(["task", "layer", "position", "contrast"], keys)) | {"rank": rank, "latent": int(latent)})
    return pd.DataFrame(rows)


def proximity_table(model, saes: dict[int, object], selected: pd.DataFrame, inst_dirs: dict[int, dict[str, torch.Tensor]],
                    top_n: int = 20, neuronpedia: dict[int, str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per selected latent and per random-control latent: logit-lens tokens, French-token flag, cosine with
    the task's instruction representation and (for released SAEs) a Neuronpedia URL."""
    control = random_control(selected, {layer: sae.cfg.d_sae for layer, sae in saes.items()}, seed)
    both = pd.concat([selected.assign(control=False), control.assign(control=True)], ignore_index=True)
    hf_model = model._module  # the wrapped transformers model: final norm and unembedding are applied directly
    parts = []
    for layer, group in both.groupby("layer"):
        W_dec = saes[layer].W_dec.detach()
        dirs = W_dec[group["latent"].to_numpy()]
        lens = logit_lens(hf_model, model.tokenizer, dirs, top_n)
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
