"""SAE loading: load the profile's released SAEs, or reuse (or train) ours, and measure their quality on held-out
text — explained variance, mean L0, dead latents, and next-token cross-entropy with the reconstruction spliced in."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from ..context import RunDir
from ..io import sha256_file, write_json, write_table
from ..models import load_model
from ..profiles import Profile
from ..saes import profile_saes, sae_metrics_table

NAME = "01_sae_loading"


@dataclass(frozen=True)
class SAELoadingConfig:
    """Knobs of the SAE loading stage."""

    profile_key: ClassVar[str] = "sae_loading"
    retrain_sae: bool = False
    """Retrain the profile's SAEs even when shipped or cached ones match the recipe."""
    n_ce_tokens: int = 8000
    """Held-out tokens scored for the spliced cross-entropy."""

    def __post_init__(self) -> None:
        if self.n_ce_tokens < 1:
            raise ValueError(f"n_ce_tokens={self.n_ce_tokens} must be ≥ 1")


@dataclass(frozen=True)
class SAELoadingResult:
    """Each layer's SAE entry (`sae`, `path`, `source`, `record`), its quality metrics and per-latent firing rates."""

    saes: dict[int, dict]
    metrics: pd.DataFrame
    firing: pd.DataFrame


def run(profile: Profile, run_dir: RunDir, cfg: SAELoadingConfig) -> SAELoadingResult:
    """Load (or train) the SAEs, measure them and record where each one lives (`saes.json`: later stages read it)."""
    model = load_model(profile)
    saes = profile_saes(model, profile, retrain=cfg.retrain_sae)
    metrics, firing = sae_metrics_table(model, profile, saes, n_ce_tokens=cfg.n_ce_tokens)
    out = run_dir.stage(NAME)
    write_table(metrics, out / "sae_metrics.csv")
    write_table(firing, out / "latent_firing.parquet")
    write_json({str(layer): _manifest_entry(entry) for layer, entry in saes.items()}, out / "saes.json")
    return SAELoadingResult(saes, metrics, firing)


def _manifest_entry(entry: dict) -> dict:
    """Where an SAE lives, how it was obtained, the hash of its weights and its training recipe."""
    weights = Path(entry["path"]) / "sae_weights.safetensors"
    return {"path": entry["path"], "source": entry["source"],
            "sha256": sha256_file(weights) if entry["source"] != "released" else None,
            "training": entry["record"].get("recipe")}
