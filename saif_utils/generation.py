"""Greedy generation with an edit applied at one layer (nnsight), and its per-prompt cache."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from .architectures import blocks
from .interventions import SPANS, AddVector, Intervention, Span, per_prompt_edits, stack_edits
from .io import cached_json_items
from .models import check_model_layer, length_buckets, server_errors, trim_heap
from .progress import tqdm


@torch.inference_mode()
def generate_steered(model, token_ids: Sequence[Sequence[int]], layer: int, edit: Intervention | torch.Tensor | None,
                     max_new_tokens: int, span: Span = "both", batch_size: int = 8, remote: bool = False,
                     desc: str = "generating", min_new_tokens: int | None = None) -> list[list[int]]:
    """Greedy generation of up to `max_new_tokens` per prompt (stopping at end-of-turn, never before
    `min_new_tokens` — benchmarks use it to fix the amount of work) with `edit` applied to the
    output of decoder block `layer` at the prompt positions, at every generated token, or both. A bare tensor means
    `AddVector(tensor)`. Returns the new token ids per prompt, without the end-of-turn token.

    nnsight's `tracer.iter[:]` visits the forward pass of each step: step 0 is the whole (left-padded) prompt,
    each later step one new token under the KV cache — so "generated" really reaches every new token. The loop is
    open-ended because a batch whose rows all finish stops early; the result is read in a second invoke, which
    runs after the loop however it ends. (A hand-written loop that drops finished rows was slower here; see
    benchmarks/README.md.)
    """
    if span not in SPANS:
        raise ValueError(f"span={span!r}; allowed: {list(SPANS)}")
    check_model_layer(model, layer)
    if isinstance(edit, torch.Tensor):
        edit = AddVector(edit)
    stop_ids = {model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
    out: list[list[int] | None] = [None] * len(token_ids)
    batches = list(length_buckets(token_ids, batch_size, model.tokenizer.pad_token_id))
    # Even one batch gets a bar: it names the phase that is running (a sweep's layer, a split) in the live status.
    for batch in tqdm(batches, desc=desc, leave=False, disable=not batches):
        batch_edit = None if edit is None else edit.rows(batch.rows)
        # Only plain tensors and the intervention (shipped by value) enter the block: on NDIF it runs on the server.
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with warnings.catch_warnings(), server_errors(remote, f"generating ({desc})"):
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with model.generate(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                pad_token_id=model.tokenizer.pad_token_id, remote=remote) as tracer:
                with tracer.invoke(inputs):
                    if batch_edit is not None and span == "prompt":
                        resid = blocks(model)[layer].output  # the first forward: the whole prompt
                        resid[:] += batch_edit.delta(resid)
                    elif batch_edit is not None:
                        # Every step must touch the module: a step that waits on nothing would spin forever.
                        for step in tracer.iter[:]:
                            resid = blocks(model)[layer].output
                            if step > 0 or span == "both":
                                resid[:] += batch_edit.delta(resid)
                with tracer.invoke():
                    result = tracer.result.save()
        width = batch.input_ids.shape[1]
        for r, i in enumerate(batch.rows):
            new = result[r, width:].tolist()
            out[i] = new[: next((j for j, t in enumerate(new) if t in stop_ids), len(new))]
        del result  # not shipped again with the next batch's remote trace (see models.residual_batches)
        trim_heap()  # the batch's KV cache is freed: give its pages back before the next, longer batch
    return out


def cached_generate(model, model_key: str, token_ids: Sequence[Sequence[int]], layer: int | None,
                    edit: Intervention | Sequence[Intervention | None] | None, max_new_tokens: int, span: Span = "both",
                    batch_size: int = 8, remote: bool = False, desc: str = "generating") -> list[list[int]]:
    """`generate_steered` with one cache entry per prompt, keyed by (model, layer, intervention, span, prompt ids,
    decoding): a rerun after a crash, or with one more α, generates only what is new. Entries are written atomically
    and checked on read (a truncated or corrupt entry is regenerated).

    `edit` may also be a list with one edit (or None) per prompt: the missing prompts of every condition at a layer
    are then generated together in full batches, each row with its own vector or latent set (None adds exact zeros,
    which leaves the residual bit-identical)."""
    per_prompt, edits = per_prompt_edits(edit, len(token_ids))

    def key(ids: Sequence[int], row_edit: Intervention | None) -> dict:
        edit_key = None if row_edit is None else {"layer": layer, "span": span, **row_edit.fingerprint()}
        return {"model": model_key, "max_new_tokens": max_new_tokens, "decoding": "greedy", "edit": edit_key,
                "prompt": list(ids)}

    def parse(entry: dict) -> list[int] | None:
        ids = entry["ids"]
        return ids if isinstance(ids, list) and len(ids) <= max_new_tokens else None

    def compute(missing: list[int]) -> list[dict]:
        batch_edit = stack_edits([edits[i] for i in missing]) if per_prompt else edit
        fresh = generate_steered(model, [token_ids[i] for i in missing], 0 if layer is None else layer, batch_edit,
                                 max_new_tokens, span, batch_size, remote, desc)
        return [{"ids": ids} for ids in fresh]

    return cached_json_items("generations", [key(ids, e) for ids, e in zip(token_ids, edits)], compute, parse)
