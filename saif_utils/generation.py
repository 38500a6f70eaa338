"""Greedy generation with an edit applied at one layer (nnsight), and its per-prompt cache."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .architectures import blocks, skip_blocks_through
from .interventions import SPANS, AddVector, Intervention, Span, per_prompt_edits, stack_edits
from .io import cached_json_items
from .models import Batch, check_model_layer, distinct_rows, length_buckets, server_errors, trim_heap
from .progress import tqdm


@torch.inference_mode()
def generate_steered(model, token_ids: Sequence[Sequence[int]], layer: int, edit: Intervention | torch.Tensor | None,
                     max_new_tokens: int, span: Span = "both", batch_size: int = 8, remote: bool = False,
                     desc: str = "generating", min_new_tokens: int | None = None, share_prompts: bool = True
                     ) -> list[list[int]]:
    """Greedy generation of up to `max_new_tokens` per prompt (stopping at end-of-turn, never before
    `min_new_tokens` — benchmarks use it to fix the amount of work) with `edit` applied to the
    output of decoder block `layer` at the prompt positions, at every generated token, or both. A bare tensor means
    `AddVector(tensor)`. Returns the new token ids per prompt, without the end-of-turn token. With `share_prompts`,
    the blocks up to `layer` run once per distinct prompt of a batch (`shared_prompt_pass`; same tokens).

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
        # Rows that share a prompt (one passage under several vectors) share what the blocks up to the edited one
        # compute on it: that runs once per distinct prompt. On NDIF the server recomputes it (its KV cache stays there).
        shared = None if batch_edit is None or remote or not share_prompts else shared_prompt_pass(model, batch, layer)
        cache = {} if shared is None else {"cache": shared.cache}
        # Only plain tensors and the intervention (shipped by value) enter the block: on NDIF it runs on the server.
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        with warnings.catch_warnings(), server_errors(remote, f"generating ({desc})"):
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with model.generate(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                pad_token_id=model.tokenizer.pad_token_id, remote=remote, **cache) as tracer:
                with tracer.invoke(inputs):
                    if batch_edit is not None and span == "prompt":  # the first forward only: the whole prompt
                        if shared is not None:
                            shared.replay(model, layer, batch_edit)
                        else:
                            resid = blocks(model)[layer].output
                            resid[:] += batch_edit.delta(resid)
                    elif batch_edit is not None:
                        # Every step must touch the module: a step that waits on nothing would spin forever.
                        for step in tracer.iter[:]:
                            if step == 0 and shared is not None:
                                shared.replay(model, layer, batch_edit if span == "both" else None)
                            else:
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


@dataclass(frozen=True, eq=False)
class SharedPromptPass:
    """What blocks 0 … `layer` compute on a generation batch's prompts, computed once per distinct prompt and repeated
    over the rows that share it, and the empty KV cache the batch's generation starts from."""

    below: torch.Tensor
    """Block `layer`'s unedited output `[B, S, d]`, row for row."""
    filled: list
    """Per block 0 … `layer`: its KV-cache layer over the prompt, row for row."""
    cache: object
    """The `DynamicCache` to generate with: `replay` hands it `filled`."""

    def replay(self, model, layer: int, edit: Intervention | None) -> None:
        """Inside the batch's generation trace, at its first forward: skip blocks 0 … `layer`, handing on block
        `layer`'s output with `edit` applied, and give the cache what they would have written."""
        skip_blocks_through(model, layer, self.below,
                            self.below if edit is None else self.below + edit.delta(self.below))
        # The model is now inside that forward, past the masks and positions it derived from the (empty) cache.
        self.cache.layers[:len(self.filled)] = self.filled


@torch.inference_mode()
def shared_prompt_pass(model, batch: Batch, layer: int) -> SharedPromptPass | None:
    """`SharedPromptPass` of a left-padded batch, or None when no two rows share a prompt. The distinct prompts run
    as rows of the batch's width at the positions generation derives from the attention mask, which gives the
    batch's own values bit for bit on the CPU (tested against generating every row through every block)."""
    from transformers import DynamicCache

    repeats = distinct_rows(batch.input_ids)
    if repeats is None:
        return None
    distinct, rows = repeats
    ids, mask = batch.input_ids[distinct], batch.attention_mask[distinct]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    config = model._module.config
    prompt_cache = DynamicCache(config=config)
    with model.trace(ids, attention_mask=mask, position_ids=positions, cache=prompt_cache) as tracer:
        below = blocks(model)[layer].output.save()
        tracer.stop()  # nothing above the edited block is shared
    filled = prompt_cache.layers[:layer + 1]
    for cache_layer in filled:  # repeated over the rows in place: the generation's cache grows from these tensors
        cache_layer.keys, cache_layer.values = cache_layer.keys[rows], cache_layer.values[rows]
    return SharedPromptPass(below[rows], filled, DynamicCache(config=config))


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
