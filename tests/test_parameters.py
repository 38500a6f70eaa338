"""Papermill reruns take every parameter a notebook declares, refuse credentials and misspelt names before any kernel
starts, and each stage records the configuration it ran with, which the report reads."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import copy_run

from saif_utils.pipeline import check_parameters, notebook_parameters, numbered_notebooks, run_pipeline
from saif_utils.pipeline import main as pipeline_main


def test_every_notebook_parameter_is_accepted():
    """Walk every notebook's parameters cell: no declared name is mistaken for a credential or refused as unknown."""
    notebooks = numbered_notebooks()
    declared = {nb.stem: list(notebook_parameters(nb)) for nb in notebooks}
    assert "max_new_tokens" in declared["05_steering_sweeps"] and "n_ce_tokens" in declared["01_sae_loading"]
    for nb in notebooks:
        check_parameters({name: 1 for name in declared[nb.stem]}, [nb])
    assert all({"plugins", "tasks_path"} <= set(names) for names in declared.values()), declared


@pytest.mark.parametrize("name", ["api_key", "NDIF_API_KEY", "hf_token", "auth_token", "token", "secret", "password",
                                  "db_password", "openai_apikey", "credentials"])
def test_credential_names_are_refused(name):
    with pytest.raises(ValueError, match="secrets are never notebook parameters"):
        check_parameters({name: "x"})


def test_a_misspelt_parameter_is_refused_before_any_kernel_naming_the_close_match(tmp_path, capsys):
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        pipeline_main(["--profile", "tiny", "--output-dir", str(output_dir), "--only", "05", "-p", "n_tset", "10"])
    err = capsys.readouterr().err
    assert "-p n_tset" in err and "did you mean 'n_test'" in err, err
    assert not output_dir.exists(), "a notebook ran before the name was refused"
    # A parameter of a notebook that is not in the run is refused too: 05's k_start means nothing to 01.
    with pytest.raises(ValueError, match="no notebook of this run"):
        check_parameters({"k_start": 3}, numbered_notebooks()[:1])


def test_a_rerun_with_new_parameters_is_recorded_and_reported(tiny_run, tmp_path):
    """`-p max_new_tokens 4 -p k_start 1` reach notebook 05, which records them in config.json; the report's layer
    claim reads the k that 05 actually searched at, not the profile's."""
    src, _, _ = tiny_run
    run_dir = copy_run(src, tmp_path / "run", ("01_sae_loading", "02_feature_discovery"))
    run_pipeline("tiny", run_dir, only=["05", "06"], extra={"max_new_tokens": 4, "k_start": 1, "n_test": 2,
                                                            "methods": ["no_instruction", "saif"]})
    ran_with = json.loads((run_dir / "05_steering_sweeps" / "config.json").read_text())
    assert ran_with["max_new_tokens"] == 4 and ran_with["k_start"] == 1
    generations = pd.read_parquet(run_dir / "05_steering_sweeps" / "generations.parquet")
    assert generations["n_new_tokens"].max() <= 4
    claims = pd.read_csv(run_dir / "06_report" / "claims.csv").set_index("paper's claim")
    layer_claim = claims.loc["The final layer steers best"]
    assert "(k=1," in layer_claim["measured here"] and layer_claim["status"] != "not tested", layer_claim
