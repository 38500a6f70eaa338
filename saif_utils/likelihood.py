"""Teacher-forced log-probabilities of continuations, optionally under an edit, and their per-item cache."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .architectures import blocks, final_norm, skip_blocks_through
from .interventions import Intervention, per_prompt_edits, stack_edits
from .io import cached_json_items
from .logits import scored_token_logprob
from .models import (
    check_model_layer,
    common_prefix_length,
    distinct_rows,
    length_buckets,
    server_errors,
    shared_prefix_batches,
    trim_heap,
)
from .progress import tqdm


@torch.inference_mode()
def continuation_logprob(model, prefix_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]],
                         layer: int | None = None, edit: Intervention | None = None, batch_size: int = 8,
                         remote: bool = False, desc: str = "log-probs", share_rows: bool = True) -> np.ndarray:
    """Mean log-probability per token of each continuation given its prefix (teacher-forced), optionally with
    `edit` (shared, or per row as `cached_logprob` stacks it) applied at every position of decoder block `layer`;
    a progress bar named `desc` counts the batches. With `share_rows`, rows of a batch that score the same sequence
    run blocks 0 … `layer` once (`shared_block_output`; the same values).

    Without an edit, the tokens every prefix shares (fluency scores every response after one empty user turn) run
    once and their KV cache serves every batch."""
    if len(prefix_ids) != len(cont_ids):
        raise ValueError(f"{len(prefix_ids)} prefixes but {len(cont_ids)} continuations")
    if edit is not None:
        check_model_layer(model, layer)
    full = [list(p) + list(c) for p, c in zip(prefix_ids, cont_ids)]
    out = np.full(len(full), np.nan)
    # The last prefix token stays outside the shared part: its logits predict the first continuation token.
    n_shared = min(common_prefix_length(prefix_ids), *(len(p) - 1 for p in prefix_ids)) if full else 0
    if edit is None and not remote and n_shared > 0:
        batches = ((rows, ids, {"attention_mask": mask, "cache": cache}, n_shared)
                   for rows, ids, mask, cache in shared_prefix_batches(model, full, n_shared, batch_size))
    else:
        batches = ((b.rows, b.input_ids, {"attention_mask": b.attention_mask, "use_cache": False}, None)
                   for b in length_buckets(full, batch_size, model.tokenizer.pad_token_id))
    for rows, ids, inputs, shared in tqdm(batches, total=-(-len(full) // batch_size), desc=desc, leave=False):
        # Scored positions: for row r, the columns whose next token is a continuation token (right-padded suffixes
        # start after the shared prefix, left-padded rows end at the last column).
        firsts = [len(prefix_ids[i]) - 1 - shared if shared is not None else ids.shape[1] - 1 - len(cont_ids[i])
                  for i in rows]
        lengths = [len(cont_ids[i]) for i in rows]
        pos_rows = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
        pos_cols = torch.cat([torch.arange(first, first + n) for first, n in zip(firsts, lengths)])
        if len(pos_rows) == 0:
            continue
        targets = ids[pos_rows, pos_cols + 1]
        # Rows that score one sequence under several edits (an ablation's conditions) share blocks 0 … layer.
        shared = edit is not None and share_rows and not remote
        below = shared_block_output(model, ids, inputs["attention_mask"], layer) if shared else None
        with server_errors(remote, "scoring continuations"), model.trace(ids, **inputs, remote=remote) as tracer:
            if below is not None:
                skip_blocks_through(model, layer, below, below + edit.rows(rows).delta(below))
            elif edit is not None:
                resid = blocks(model)[layer].output
                resid[:] += edit.rows(rows).delta(resid)
            hidden = final_norm(model).output
            token_lp = scored_token_logprob(model, hidden[pos_rows.to(hidden.device), pos_cols.to(hidden.device)],
                                            targets.to(hidden.device)).cpu().save()
            tracer.stop()  # the model's own LM head would compute [batch, seq, vocab] logits nobody reads
        offsets = np.cumsum([0] + lengths)
        for r, i in enumerate(rows):
            if len(cont_ids[i]):
                out[i] = float(token_lp[offsets[r]:offsets[r + 1]].mean())
        del token_lp  # not shipped again with the next batch's remote trace (see models.residual_batches)
        trim_heap()
    return out


def shared_block_output(model, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor | None:
    """Block `layer`'s output `[B, S, d]` over a left-padded batch without the KV cache, computed once per distinct
    row and repeated over the rows that share it (the same values bit for bit on the CPU); None when no row repeats."""
    repeats = distinct_rows(ids)
    if repeats is None:
        return None
    distinct, rows = repeats
    with model.trace(ids[distinct], attention_mask=mask[distinct], use_cache=False) as tracer:
        below = blocks(model)[layer].output.save()
        tracer.stop()
    return below[rows]


def cached_logprob(model, model_key: str, prefix_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]],
                   layer: int | None = None, edit: Intervention | Sequence[Intervention | None] | None = None,
                   batch_size: int = 8, remote: bool = False, desc: str = "log-probs") -> np.ndarray:
    """`continuation_logprob` with one cache entry per (model, intervention, prefix, continuation): warm reruns of
    ablation and steering score likelihood and fluency without a forward pass. `edit` may be one per prompt, as in
    `cached_generate`, so several conditions share batches."""
    per_prompt, edits = per_prompt_edits(edit, len(prefix_ids))
    keys = [{"model": model_key, "edit": None if e is None else {"layer": layer, **e.fingerprint()},
             "prefix": list(p), "cont": list(c)} for p, c, e in zip(prefix_ids, cont_ids, edits)]

    def compute(missing: list[int]) -> list[dict]:
        batch_edit = stack_edits([edits[i] for i in missing]) if per_prompt else edit
        fresh = continuation_logprob(model, [prefix_ids[i] for i in missing], [cont_ids[i] for i in missing],
                                     layer, batch_edit, batch_size, remote, desc)
        return [{"logprob": None if np.isnan(v) else float(v)} for v in fresh]

    # An empty continuation has no log-probability (stored as null); a 1-tuple keeps it apart from a missing entry.
    values = cached_json_items("logprobs", keys, compute, lambda entry: (entry["logprob"],))
    return np.array([np.nan if v is None else v for (v,) in values], dtype=float)
