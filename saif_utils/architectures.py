"""Where a causal language model keeps what SAIF reads and edits — its decoder blocks, final norm and unembedding — as
data: one `Architecture` per module layout, found on the loaded model by the first layout whose blocks it has.

This module imports nothing but the standard library: on NDIF it is shipped by value with the traces that use it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """Dotted attribute paths of one module layout, from the model's root (a transformers model or its nnsight
    wrapper)."""

    name: str
    """Short label (error messages and profile files)."""
    blocks: str
    """The list of decoder blocks; block L's output is the residual stream at layer L (`blocks.L.hook_resid_post`)."""
    final_norm: str
    """The norm applied to the last block's output before the unembedding."""
    lm_head: str
    """The unembedding (hidden → vocabulary logits)."""


ARCHITECTURES: list[Architecture] = [
    # Llama, Gemma-2, Mistral, Qwen2, SmolLM2, …
    Architecture("llama", blocks="model.layers", final_norm="model.norm", lm_head="lm_head"),
    Architecture("gpt2", blocks="transformer.h", final_norm="transformer.ln_f", lm_head="lm_head"),
    Architecture("gpt_neox", blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", lm_head="lm_head"),
]
"""Known layouts, tried in order; a plugin module adds its model's with `register_architecture`."""


def register_architecture(arch: Architecture) -> Architecture:
    """Make `arch` known (tried before the built-in layouts), e.g. from a plugin module; returns it."""
    if any(known.name == arch.name for known in ARCHITECTURES):
        raise ValueError(f"an architecture named {arch.name!r} is already registered")
    ARCHITECTURES.insert(0, arch)
    return arch


def _get(root, path: str):
    """The attribute at a dotted `path` below `root`, or None when a step is missing."""
    obj = root
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return None
        if obj is None:
            return None
    return obj


def architecture_of(model) -> Architecture:
    """The first known layout whose blocks, final norm and unembedding `model` all has, or an error naming the paths
    looked for."""
    known = tuple(ARCHITECTURES)
    for arch in known:
        if all(_get(model, path) is not None for path in (arch.blocks, arch.final_norm, arch.lm_head)):
            return arch
    looked = ", ".join(f"{a.blocks} ({a.name})" for a in known)
    raise ValueError(f"{type(model).__name__}: no known layout fits it (blocks looked for at {looked}, each with its "
                     f"final norm and unembedding); register an "
                     f"Architecture with this model's block, final-norm and unembedding paths from a plugin module "
                     f"(saif_utils.architectures.register_architecture)")


def blocks(model):
    """The model's decoder blocks (index L: the block whose output is the residual stream at layer L)."""
    return _get(model, architecture_of(model).blocks)


def skip_blocks_through(model, layer: int, below, output) -> None:
    """Inside a trace: skip decoder blocks 0 … `layer`, block `layer` handing on `output`. `below` stands in for the
    blocks under it (any tensor of the block's output shape: only the next block, skipped too, reads it)."""
    for block in blocks(model)[:layer]:
        block.skip(below)
    blocks(model)[layer].skip(output)


def final_norm(model):
    """The norm between the last block and the unembedding."""
    return _get(model, architecture_of(model).final_norm)


def lm_head(model):
    """The unembedding module."""
    return _get(model, architecture_of(model).lm_head)
