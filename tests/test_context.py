"""The run folder and run context: where stages' artefacts live, and clear errors when one is missing."""
import pytest
import torch

from saif_utils.context import STAGES, RunDir
from saif_utils.selection import DirectionKey, load_directions, save_directions


def test_run_dir_paths_and_missing_stages(tmp_path):
    run = RunDir.for_profile("tiny", tmp_path / "run")
    assert run.stage("04_causal_ablation") == tmp_path / "run" / "04_causal_ablation"
    assert (tmp_path / "run" / "04_causal_ablation").is_dir()
    with pytest.raises(ValueError, match=r"stage='04_ablation'; allowed: \['01_sae_loading'"):
        run.stage("04_ablation")
    with pytest.raises(FileNotFoundError, match=r"saes.json is missing: run notebooks/01_sae_loading.ipynb"):
        run.saes()
    with pytest.raises(FileNotFoundError, match=r"selected_latents.csv is missing: run notebooks/02_feature"):
        run.selected_latents()
    assert run.steering_results() is None
    assert RunDir.for_profile("tiny").root.parts[-2:] == ("outputs", "tiny") and len(STAGES) == 7


def test_direction_keys_round_trip_through_the_directions_file(tmp_path):
    directions = {DirectionKey("keyword:ocean", 29, "pre"): torch.arange(3.0),
                  DirectionKey("translate_fr", 10, "post"): torch.ones(3)}
    save_directions(directions, tmp_path / "d.safetensors")
    loaded = load_directions(tmp_path / "d.safetensors")
    assert set(loaded) == set(directions) and str(DirectionKey("json", 15, "post")) == "json|15|post"
    assert all(torch.equal(loaded[key], value) for key, value in directions.items())
