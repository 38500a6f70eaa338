"""What a direction in the residual stream means to the model: the tokens it promotes (logit lens), its cosine with
the model's own representation of an instruction, and whether a token is French-related."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .architectures import final_norm, lm_head
from .io import cached_json, content_hash
from .models import chat_prompt, read_residual, server_errors, token_texts, tokenize

if TYPE_CHECKING:
    from .context import RunContext

FRENCH_WORDS = {"le", "la", "les", "des", "du", "une", "un", "et", "est", "sont", "pour", "que", "qui", "dans", "sur",
                "avec", "il", "elle", "ils", "elles", "nous", "vous", "ce", "cette", "au", "aux", "pas", "été", "ét",
                "français", "française", "francais", "traduction", "traduire"}


def is_french_related(token: str) -> bool:
    """True for tokens naming French ('French', 'fr', 'Fran…') or that are common French function words."""
    word = token.strip().lower()
    return bool(re.match(r"^(french|fr$|fran)", word)) or word in FRENCH_WORDS


@torch.inference_mode()
def logit_lens(model, directions: torch.Tensor, top_n: int = 20, remote: bool = False) -> list[dict]:
    """Top and bottom `top_n` tokens of each direction `[k, d_model]` read through the final norm and unembedding.

    Runs as an nnsight trace (on NDIF with `remote`, where the weights are): the two modules are applied ad hoc to the
    directions and only the token ids come back. The traced one-token input is never read."""
    with server_errors(remote, "reading latents through the logit lens"), \
            model.trace(torch.tensor([[model.tokenizer.eos_token_id]]), remote=remote) as tracer:
        head = lm_head(model)
        logits = head(final_norm(model)(directions.to(head.weight)[:, None, :]))[:, 0]
        top = torch.topk(logits, top_n, dim=-1).indices.cpu().save()
        bottom = torch.topk(-logits, top_n, dim=-1).indices.cpu().save()
        tracer.stop()
    text = token_texts(model.tokenizer, torch.cat([top, bottom]).flatten().tolist())
    return [{"top_tokens": [text[t] for t in t_row], "bottom_tokens": [text[t] for t in b_row]}
            for t_row, b_row in zip(top.tolist(), bottom.tolist())]


def instruction_directions(ctx: RunContext, instructions: dict[str, Sequence[str]], contents: Sequence[str]
                           ) -> dict[int, dict[str, torch.Tensor]]:
    """The model's own representation of each task's instruction at every SAE layer: mean residual at the last prompt
    token over the task's instruction texts (alone, chat-formatted) minus the mean over content-only prompts →
    `{layer: {task: [d]}}`, cached by the model and the prompts."""
    layers = sorted(ctx.saes)
    tok = ctx.tokenizer
    tasks = list(instructions)
    texts = [chat_prompt(tok, t) for task in tasks for t in instructions[task]] + [chat_prompt(tok, c) for c in contents]
    token_ids = tokenize(tok, texts)

    def compute() -> dict:
        resid = read_residual(ctx.model, token_ids, layers, batch_size=ctx.batch_size, remote=ctx.remote)
        return {"resid": {str(layer): acts.float().tolist() for layer, acts in resid.items()}}

    key = {"model": ctx.model_key, "ids": content_hash(token_ids), "layers": layers, "batch_size": ctx.batch_size}
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
