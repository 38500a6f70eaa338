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
from ..profiles import Profile, with_family
from ..saes import heldout_token_ids, profile_saes, sae_metrics_table

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
    """Each layer's SAE entry (`sae`, `path`, `source`, `record`), per-latent firing rates of the family in use, and
    quality metrics with a row per (family, layer): every SAE family of the profile on the same held-out tokens,
    the family in use first."""

    saes: dict[int, dict]
    metrics: pd.DataFrame
    firing: pd.DataFrame


def run(profile: Profile, run_dir: RunDir, cfg: SAELoadingConfig) -> SAELoadingResult:
    """Load (or train) the SAEs, measure them and record where each one lives (`saes.json`: later stages read it)."""
    model = load_model(profile)
    saes = profile_saes(model, profile, retrain=cfg.retrain_sae)
    eval_ids = heldout_token_ids(model.tokenizer, profile)
    families = {profile.sae_family or "": saes}  # the family in use first, then the profile's others
    for family in profile.sae_families:
        if family.name != profile.sae_family:
            families[family.name] = profile_saes(model, with_family(profile, family.name))
    metrics, firing = sae_metrics_table(model, profile, families, eval_ids, n_ce_tokens=cfg.n_ce_tokens)
    firing = firing[firing["family"] == (profile.sae_family or "")].drop(columns="family").reset_index(drop=True)
    out = run_dir.stage(NAME)
    write_table(metrics, out / "sae_metrics.csv")
    write_table(firing, out / "latent_firing.parquet")
    run_dir.write_config(NAME, cfg)
    write_json({str(layer): _manifest_entry(entry) for layer, entry in saes.items()}, out / "saes.json")
    return SAELoadingResult(saes, metrics, firing)


def _manifest_entry(entry: dict) -> dict:
    """Where an SAE lives, how it was obtained, the hash of its weights and its training recipe."""
    weights = Path(entry["path"]) / "sae_weights.safetensors"
    return {"path": entry["path"], "source": entry["source"],
            "sha256": sha256_file(weights) if entry["source"] != "released" else None,
            "training": entry["record"].get("recipe")}


def learning_curves(saes: dict[int, dict]) -> pd.DataFrame:
    """The training records' held-out learning curves, one row per (layer, point); empty for SAEs without one."""
    rows = [{"layer": layer, "n_tokens": entry["record"]["learning_curve"]["n_tokens"]} | point
            for layer, entry in saes.items() if "learning_curve" in entry["record"]
            for point in entry["record"]["learning_curve"]["points"]]
    return pd.DataFrame(rows)
