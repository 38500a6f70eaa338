"""SAIF as a library, in memory, with no run folder: load a model and SAEs, find instruction latents, build a steering
vector, generate with it, judge the responses. The notebooks' stages are built on these same functions; see
docs/api.md for a worked example.

    from saif_utils import api
    lab = api.load("tiny")                                   # a profile name, a profile file, or your own objects
    found = api.find_latents(lab, tasks=["translate_fr"])    # scored latents, selections, diff-in-means directions
    vector = api.steering_vector(lab, found, "translate_fr", layer=6, k=5, alpha=0.5)
    texts = api.generate(lab, ["The cat sleeps on the mat."], layer=6, vector=vector)
    api.judge(lab, "translate_fr", ["The cat sleeps on the mat."], texts)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from .context import RunContext
from .data import DataSources
from .methods import Condition, VectorSource, get_method
from .profiles import ModelSpec, Profile, get_profile
from .stages.discovery import DiscoveryConfig, DiscoveryResult, discover

__all__ = ["load", "find_latents", "residual_norms", "steering_vector", "generate", "judge"]


def load(profile: str | Path | Profile = "default", *, remote: bool = False, model=None, tokenizer=None,
         saes: Mapping[int, object] | None = None, data: DataSources | None = None) -> RunContext:
    """A loaded model with its SAEs by layer, ready for the other functions.

    Either a profile — a registered name, a `.toml`/`.yaml` profile file or a `Profile` — whose model is loaded and
    whose SAEs are read (shipped, local, released) or trained as notebook 01 does; or objects you already hold:
    `model` (a transformers causal LM with its `tokenizer`, or one already wrapped by nnsight) and `saes` (sae-lens SAEs
    by layer), each checked against the model's width and the layer its hook reads. `remote=True` runs every trace on
    NDIF (NDIF_API_KEY and NDIF_HOST from the environment) with the same calls.
    """
    from .models import load_model, model_fingerprint
    from .saes import check_sae, profile_saes, sae_fingerprint

    data = data or DataSources()
    data.check()
    if model is None:
        prof = profile if isinstance(profile, Profile) else get_profile(str(profile), remote=remote)
        model = load_model(prof)
        if saes is None:
            saes = {layer: entry["sae"] for layer, entry in profile_saes(model, prof).items()}
        key = model_fingerprint(prof)
    else:
        model, key = _wrap_model(model, tokenizer)
        prof = _profile_of(model, saes or {}, remote)
    if not saes:
        raise ValueError("no SAEs: pass saes={layer: sae} or a profile whose SAEs can be loaded")
    for layer, sae in saes.items():
        check_sae(sae, layer, prof.model.d_model)
    return RunContext(prof, None, model, key, dict(saes), {layer: sae_fingerprint(s) for layer, s in saes.items()},
                      data)


def _wrap_model(model, tokenizer) -> tuple[object, str]:
    """An nnsight wrapper around a transformers model (as is when already wrapped) and a content key of its weights."""
    from nnsight import TransformersModel
    from nnsight.intervention.envoy import Envoy

    from .saes import sae_fingerprint

    if not isinstance(model, Envoy):
        if tokenizer is None:
            raise ValueError("a transformers model needs its tokenizer: api.load(model=model, tokenizer=tokenizer)")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # batched generation pads on the left
        model = TransformersModel(model.eval(), tokenizer=tokenizer, task="text-generation")
    return model, sae_fingerprint(model._module)  # the same weights hash as an SAE's: any module's state dict


def _profile_of(model, saes: Mapping[int, object], remote: bool) -> Profile:
    """A profile describing a model passed in as an object (its name, depth and width read from the model)."""
    from .architectures import blocks

    config = model._module.config
    name = Path(str(getattr(config, "_name_or_path", "") or type(model._module).__name__)).name
    spec = ModelSpec(name=name, hf_id=str(getattr(config, "_name_or_path", name)), n_layers=len(blocks(model)),
                     d_model=int(config.hidden_size), dtype=str(next(model._module.parameters()).dtype).split(".")[-1])
    return Profile(name=name, description=f"{name}, passed in as an object", model=spec,
                   sae_layers=tuple(sorted(saes)) or (0,), remote=remote,
                   device=str(next(model._module.parameters()).device))


def find_latents(lab: RunContext, tasks: Sequence[str] | None = None, variants: pd.DataFrame | None = None,
                 passages: pd.DataFrame | None = None, config: DiscoveryConfig | None = None,
                 **overrides) -> DiscoveryResult:
    """Score every latent of every SAE for instruction following (with vs without each instruction variant, on the
    train passages) and select the top ones: `.latent_scores`, `.selected_latents`, `.directions`, … .

    `variants` (columns task, variant_id, language, kind, text, base_task, keyword — `data.load_variants`) and
    `passages` (passage_id, text, split) default to the lab's data sources; `overrides` are `DiscoveryConfig` fields.
    """
    config = config or DiscoveryConfig()
    config = replace(config, **overrides, **({"tasks": tuple(tasks)} if tasks is not None else {}))
    return discover(lab, config, variants, passages)


def residual_norms(lab: RunContext, layers: Sequence[int], passages: pd.DataFrame | None = None) -> dict[int, float]:
    """Mean residual norm at each layer over the content-only prompts of the train passages: what α multiplies."""
    from .activations import mean_residual_norm
    from .data import evaluation_prompts

    passages = lab.data.passages() if passages is None else passages
    train = passages[passages["split"] == "train"] if "split" in passages else passages
    prompts = evaluation_prompts(lab.tokenizer, train.assign(split="train"))
    return mean_residual_norm(lab.model, list(prompts["input_ids"]), list(layers), lab.batch_size, lab.remote,
                              model_key=lab.model_key)


def steering_vector(lab: RunContext, found: DiscoveryResult, task: str, layer: int, k: int = 15, alpha: float = 0.5,
                    position: str = "post", method: str = "saif", norms: Mapping[int, float] | None = None,
                    seed: int = 0) -> torch.Tensor:
    """The vector a registered steering method adds at `layer` for `task`: for SAIF, α‖h̄‖·unit(Σ_j w_j W_dec[j])
    over the task's top-k latents in `found` (content contrast, extracted at `position`). `norms` defaults to
    `residual_norms` at that layer."""
    norms = dict(norms) if norms is not None else residual_norms(lab, [layer])
    selected = found.selected_latents[found.selected_latents["contrast"] == "content"]
    source = VectorSource(lab.saes, selected, found.directions, norms, seed)
    vector, _ = get_method(method).vector(source, Condition(task, method, layer, k, alpha, position))
    return vector


def generate(lab: RunContext, contents: Sequence[str], layer: int | None = None, vector: torch.Tensor | None = None,
             instruction: str | None = None, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to chat prompts of `contents` (with `instruction` after each, if given), with `vector` added to
    the residual at `layer` on every prompt and generated token; cached by content."""
    from .data import join_content
    from .interventions import AddVector
    from .models import chat_prompt, tokenize

    if (layer is None) != (vector is None):
        raise ValueError("give layer and vector together (or neither, for unsteered answers)")
    tok = lab.tokenizer
    ids = tokenize(tok, [chat_prompt(tok, join_content(text, instruction, "post")) for text in contents])
    out = lab.generate(ids, layer, None if vector is None else AddVector(vector), max_new_tokens)
    return [tok.decode(new, skip_special_tokens=True).strip() for new in out]


def judge(lab: RunContext, task: str, sources: Sequence[str], responses: Sequence[str]) -> pd.DataFrame:
    """Each response judged by `task`'s checker (as the lab's tasks file names it) and the degeneracy detector:
    `strict` / `loose` (the checker passes and the response is not degenerate), the checker's own verdicts and why a
    response counts as degenerate."""
    from .evaluation import judge as judge_table

    if len(sources) != len(responses):
        raise ValueError(f"{len(sources)} sources for {len(responses)} responses; give one source per response")
    table = pd.DataFrame({"task": task, "source": list(sources), "response": list(responses)})
    return judge_table(table, lab.data.tasks())
