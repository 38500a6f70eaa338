"""What discovery hands to interventions: the selected-latent table and the diff-in-means directions."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pandas as pd
import torch

from .io import atomic_path
from .latent_stats import build_pairs


class DirectionKey(NamedTuple):
    """Names one diff-in-means direction: a (sub-)task at a layer, extracted from one instruction placement."""

    task: str
    layer: int
    position: str

    def __str__(self) -> str:
        return f"{self.task}|{self.layer}|{self.position}"

    @classmethod
    def parse(cls, text: str) -> DirectionKey:
        """The key written by `str(key)` (the tensor names in a directions file)."""
        task, layer, position = text.rsplit("|", 2)
        return cls(task, int(layer), position)


def top_selected(selected: pd.DataFrame, task: str, layer: int, position: str, k: int) -> pd.DataFrame:
    """The top-k rows (rank, latent, weight, …) of selected_latents.csv for one task, layer and position."""
    rows = selected[(selected["task"] == task) & (selected["layer"] == layer) & (selected["position"] == position)]
    return rows.nsmallest(k, "rank")


def check_selection(selected: pd.DataFrame, tasks: Sequence[str], saes: dict, layers: Sequence[int]) -> None:
    """Fail before any generation if a task has no latents in selected_latents.csv or a layer has no SAE."""
    unknown = sorted(set(tasks) - set(selected["task"]))
    if unknown:
        raise ValueError(f"tasks {unknown} have no selected latents in the discovery stage's output; "
                         f"allowed: {sorted(selected['task'].unique())} (or rerun discovery with these tasks)")
    missing = sorted(set(layers) - set(saes))
    if missing:
        raise ValueError(f"layers {missing} have no SAE; allowed: {sorted(saes)}")


def diff_in_means(prompts: pd.DataFrame, resid: dict[int, torch.Tensor], positions: Sequence[str]
                  ) -> dict[DirectionKey, torch.Tensor]:
    """Mean positive minus mean paired content-only negative residual for every target (sub-)task, layer and
    position `[d_model]` (the diff-in-means steering baseline)."""
    out = {}
    for task in sorted(prompts.loc[prompts["label"] == "positive", "task"].unique()):
        for layer, acts in resid.items():
            for position in positions:
                pairs = build_pairs(prompts, acts.float(), task, position, "content")
                out[DirectionKey(task, layer, position)] = (pairs.pos.mean(0) - pairs.neg.mean(0)).contiguous()
    return out


def save_directions(directions: dict[DirectionKey, torch.Tensor], dest) -> None:
    """Write direction vectors atomically as safetensors, each named `str(key)`."""
    from safetensors.torch import save_file

    with atomic_path(dest) as tmp:
        save_file({str(key): vector for key, vector in directions.items()}, str(tmp))


def load_directions(path) -> dict[DirectionKey, torch.Tensor]:
    """Direction vectors written by `save_directions`."""
    from safetensors.torch import load_file

    return {DirectionKey.parse(name): vector for name, vector in load_file(str(path)).items()}
