"""Papermill runs of the numbered notebooks on the tiny profile, through the same runner as `make reproduce`."""
import math

import pandas as pd
import pytest

from saif_utils.pipeline import numbered_notebooks, run_pipeline


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, saif_cache):
    output_dir = tmp_path_factory.mktemp("outputs") / "tiny"
    timings = run_pipeline("tiny", output_dir, only=["01"])
    return output_dir, timings


def test_every_notebook_has_a_parameters_cell_and_no_outputs():
    import nbformat

    assert numbered_notebooks(), "no numbered notebooks found"
    for path in numbered_notebooks():
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        for name in ("profile", "output_dir", "remote"):
            assert f"{name} =" in tagged[0].source, f"{path.name}: parameter {name!r} missing"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"


def test_01_writes_sae_metrics_for_every_layer(tiny_run, tiny_profile):
    output_dir, timings = tiny_run
    stage = output_dir / "01_sae_loading"
    metrics = pd.read_csv(stage / "sae_metrics.csv")
    expected = ["layer", "d_sae", "k", "n_tokens", "explained_variance", "l0", "dead_frac", "ce_clean", "ce_spliced", "kl"]
    assert list(metrics.columns[: len(expected)]) == expected
    assert sorted(metrics["layer"]) == list(tiny_profile.sae_layers)
    cfg = tiny_profile.sae_train
    assert (metrics["d_sae"] == cfg.d_sae).all() and (metrics["k"] == cfg.k).all()
    assert (metrics["l0"] <= cfg.k + 1e-6).all() and (metrics["l0"] > 0).all()
    # Even a seconds-long training run must learn something real about the residual stream.
    assert (metrics["explained_variance"] > 0.3).all(), metrics[["layer", "explained_variance"]]
    assert metrics["dead_frac"].between(0, 1).all()
    assert (metrics["ce_spliced"] > metrics["ce_clean"]).all() and (metrics["kl"] > 0).all()
    assert all(math.isfinite(v) for v in metrics[["ce_clean", "ce_spliced", "kl"]].to_numpy().ravel())
    assert (stage / "01_sae_loading.ipynb").is_file() and (stage / "latent_firing.png").is_file()
    assert (stage / "saes.json").is_file() and (output_dir / "timings.csv").is_file()
    assert list(timings["stage"]) == ["01_sae_loading"]


def test_01_saes_reload_from_the_run_manifest(tiny_run, tiny_profile):
    from saif_utils.saes import load_run_saes

    saes = load_run_saes(tiny_run[0] / "01_sae_loading")
    assert sorted(saes) == list(tiny_profile.sae_layers)
    assert all(sae.cfg.d_in == tiny_profile.model.d_model for sae in saes.values())
