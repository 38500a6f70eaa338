"""What every stage needs: a run folder that knows where each stage's artefacts live, and a run context that holds
the profile, the loaded model, the SAEs and the keys that name them in caches."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data import DataSources
from .paths import OUTPUTS_DIR
from .profiles import Profile, get_profile, profile_name, stage_config
from .selection import DirectionKey, load_directions

STAGES = ("01_sae_loading", "02_feature_discovery", "03_semantic_proximity", "04_causal_ablation",
          "05_steering_sweeps", "06_report", "07_playground")
"""The study's stages in run order; each writes into `<run folder>/<stage>/`."""


@dataclass(frozen=True)
class RunDir:
    """One run's output folder (`outputs/<profile>` by default) and readers for what its stages wrote."""

    root: Path

    @classmethod
    def for_profile(cls, profile: str, output_dir: str | Path | None = None) -> RunDir:
        """`output_dir`, or `outputs/<profile name>` when it is None (`profile` a registered name or a profile file)."""
        return cls(Path(output_dir) if output_dir else OUTPUTS_DIR / profile_name(profile))

    def stage(self, name: str) -> Path:
        """A stage's folder (created), named as in `STAGES`."""
        if name not in STAGES:
            raise ValueError(f"stage={name!r}; allowed: {list(STAGES)}")
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _existing(self, stage: str, name: str) -> Path:
        path = self.root / stage / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run notebooks/{stage}.ipynb for this output_dir first")
        return path

    def sae_manifest(self) -> dict[int, dict]:
        """The SAE loading stage's record of each layer's SAE (`saes.json`)."""
        entries = json.loads(self._existing("01_sae_loading", "saes.json").read_text())
        return {int(layer): entry for layer, entry in entries.items()}

    def saes(self, device: str = "cpu") -> dict[int, object]:
        """The run's SAEs by layer, as the SAE loading stage recorded them."""
        from .saes import load_recorded_sae

        return {layer: load_recorded_sae(entry, device) for layer, entry in self.sae_manifest().items()}

    def table(self, stage: str, name: str) -> pd.DataFrame:
        """A table (CSV or parquet) a stage wrote, or an error naming the notebook to run first."""
        path = self._existing(stage, name)
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)

    def selected_latents(self, contrast: str | None = "content") -> pd.DataFrame:
        """The discovery stage's selected latents, for one contrast (None: every contrast)."""
        selected = self.table("02_feature_discovery", "selected_latents.csv")
        return selected if contrast is None else selected[selected["contrast"] == contrast]

    def directions(self) -> dict[DirectionKey, torch.Tensor]:
        """The discovery stage's diff-in-means directions."""
        return load_directions(self._existing("02_feature_discovery", "diff_in_means.safetensors"))

    def write_config(self, stage: str, cfg) -> Path:
        """Record the configuration a stage ran with (`<stage>/config.json`, beside its tables)."""
        from dataclasses import asdict

        from .io import write_json

        return write_json(asdict(cfg), self.stage(stage) / "config.json")

    def config(self, stage: str) -> dict:
        """The configuration a stage recorded when it wrote its tables (`write_config`)."""
        return json.loads(self._existing(stage, "config.json").read_text())

    def steering_results(self) -> pd.DataFrame | None:
        """The steering stage's test results, or None when that stage has not run."""
        path = self.root / "05_steering_sweeps" / "results.csv"
        return pd.read_csv(path) if path.is_file() else None


@dataclass
class RunContext:
    """The profile and what was loaded for it: model, SAEs, and the keys naming them in caches."""

    profile: Profile
    run: RunDir | None
    """The run folder stages write into; None for an in-memory session (`api.load`)."""
    model: object
    model_key: str
    saes: dict[int, object]
    sae_keys: dict[int, str]
    data: DataSources = field(default_factory=DataSources)

    @property
    def remote(self) -> bool:
        """True when every trace runs on NDIF."""
        return self.profile.remote

    @property
    def batch_size(self) -> int:
        """Prompts per forward pass when reading activations."""
        return self.profile.batch_size

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self.model.tokenizer

    def with_default_tasks(self, cfg):
        """A stage config with `tasks` filled from the run's tasks file (`data.default_tasks`) when it is None (the
        stages that set `steers_default_tasks`: ablation and steering)."""
        from dataclasses import replace

        from .data import default_tasks

        return cfg if cfg.tasks is not None else replace(cfg, tasks=default_tasks(self.data.tasks()))

    def stage_config(self, cls: type, params: Mapping[str, Any] | None = None, **overrides: Any):
        """`profiles.stage_config` for this run's profile, with default tasks read from its tasks file."""
        cfg = stage_config(cls, self.profile, params, **overrides)
        return self.with_default_tasks(cfg) if getattr(cls, "steers_default_tasks", False) else cfg

    def generate(self, token_ids: Sequence[Sequence[int]], layer: int | None, edit, max_new_tokens: int,
                 batch_size: int = 8, desc: str = "generating") -> list[list[int]]:
        """Greedy answers with `edit` (one, or one per prompt) at `layer` on prompt and generated tokens, cached per
        prompt (`generation.cached_generate`)."""
        from .generation import cached_generate

        return cached_generate(self.model, self.model_key, token_ids, layer, edit, max_new_tokens, "both", batch_size,
                               self.remote, desc)

    def logprob(self, prefix_ids: Sequence[Sequence[int]], cont_ids: Sequence[Sequence[int]], layer: int | None = None,
                edit=None, batch_size: int = 8, desc: str = "log-probs") -> np.ndarray:
        """Mean token log-probability of each continuation after its prefix, with `edit` at `layer`, cached per item
        (`likelihood.cached_logprob`)."""
        from .likelihood import cached_logprob

        return cached_logprob(self.model, self.model_key, prefix_ids, cont_ids, layer, edit, batch_size, self.remote,
                              desc)


def open_run(profile: str | Profile, output_dir: str | Path | None = None, remote: bool = False,
             data: DataSources | None = None) -> RunContext:
    """Load a profile's model and the SAEs its SAE loading stage recorded in the run folder."""
    from .models import load_model, model_fingerprint
    from .saes import sae_fingerprint

    if isinstance(profile, str):
        profile = get_profile(profile, remote=remote)
    run = RunDir.for_profile(profile.name, output_dir)
    data = data or DataSources()
    data.check()  # before the SAEs and the model: bad data fails without a load
    saes = run.saes(profile.device)  # before the model: a missing SAE manifest fails without a model load
    return RunContext(profile, run, load_model(profile), model_fingerprint(profile), saes,
                      {layer: sae_fingerprint(sae) for layer, sae in saes.items()}, data)
