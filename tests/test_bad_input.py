"""Bad input is refused before heavy work, with a message that says what to change: the runner's arguments, data
paths and files, SAE folders and manifests, a stale shipped SAE, NDIF_HOST, and the results and determinism tools."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from saif_utils.data import DataError, DataSources, load_tasks, load_variants
from saif_utils.io import sha256_file
from saif_utils.paths import REPO_ROOT
from saif_utils.pipeline import main as pipeline_main
from saif_utils.pipeline import run_pipeline
from saif_utils.saes import load_local_sae, load_recorded_sae, save_sae

sys.path.insert(0, str(REPO_ROOT / "tools"))


def _small_sae(tmp_path, name="sae"):
    """A small TopK SAE saved in sae-lens format → its folder."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=32, k=4))
    sae.cfg.metadata.hook_name = "blocks.3.hook_resid_post"
    return save_sae(sae, tmp_path / name)


def _jsonl(path, *rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("only", [["8"], ["05", "zz"], []])
def test_only_matching_no_notebook_is_refused_before_any_kernel(only, tmp_path, capsys):
    with pytest.raises(ValueError, match="matches no notebook; available: .*'05_steering_sweeps'"):
        run_pipeline("tiny", tmp_path / "run", only=only)
    assert not (tmp_path / "run").exists(), "nothing may be written before the arguments are checked"
    with pytest.raises(SystemExit) as exit_info:  # the command line: usage error, no traceback
        pipeline_main(["--profile", "tiny", "--output-dir", str(tmp_path / "run"), "--only", *only])
    assert exit_info.value.code == 2 and "matches no notebook" in capsys.readouterr().err


def test_data_paths_that_hold_nothing_are_refused_naming_the_parameter(tmp_path):
    (tmp_path / "empty").mkdir()
    for field, value, problem in [("instructions_path", tmp_path / "missing", "no such file or folder"),
                                  ("instructions_path", tmp_path / "empty", "no .jsonl files in this folder"),
                                  ("content_path", tmp_path / "nope.jsonl", "no such file or folder"),
                                  ("content_path", tmp_path / "empty", "no .jsonl files in this folder")]:
        with pytest.raises(DataError, match=f"{field}=.*: .*{problem}"):
            DataSources(**{field: value}).check()
    DataSources().check()  # the committed data passes


def test_open_run_checks_the_data_before_loading_saes_or_the_model(tmp_path):
    from saif_utils.context import open_run

    # the run folder has no SAE manifest either: the data error comes first, so nothing was loaded
    with pytest.raises(DataError, match="content_path=.*no such file or folder"):
        open_run("tiny", tmp_path / "run", data=DataSources(content_path=tmp_path / "missing.jsonl"))


def test_tasks_file_errors(tmp_path):
    task = {"task": "summarize", "description": "Summarise the passage."}
    cases = [
        ([task, task], "task 'summarize' is defined twice"),
        ([task | {"siblings": ["translate_fr"]}], "names sibling 'translate_fr', which is not defined"),
        ([task | {"colour": "blue"}], r"unknown field\(s\) \['colour'\]"),
    ]
    for rows, message in cases:
        with pytest.raises(DataError, match=message):
            load_tasks(_jsonl(tmp_path / "tasks.jsonl", *rows))
    tasks = load_tasks(_jsonl(tmp_path / "tasks.jsonl", {"task": "keyword", "description": "Use a word."}))
    variant = {"variant_id": "keyword-en-00", "task": "keyword", "text": "Use the word {keyword}.", "language": "en",
               "kind": "paraphrase"}
    with pytest.raises(DataError, match=r"v\.jsonl:1: text has a \{keyword\} placeholder but task 'keyword' has no"):
        load_variants(_jsonl(tmp_path / "v.jsonl", variant), tasks)


def test_sae_folders_that_are_not_loadable_are_refused_naming_the_file(tmp_path):
    folder = _small_sae(tmp_path)
    assert load_local_sae(folder).cfg.d_sae == 32
    no_weights = _small_sae(tmp_path, "no-weights")
    (no_weights / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no sae-lens SAE at .*no-weights: \['sae_weights.safetensors'\]"):
        load_local_sae(no_weights)
    no_cfg = _small_sae(tmp_path, "no-cfg")
    (no_cfg / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['cfg.json'\] missing"):
        load_local_sae(no_cfg)
    corrupt = _small_sae(tmp_path, "corrupt")
    weights = corrupt / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    with pytest.raises(ValueError, match="sae_weights.safetensors cannot be read .*corrupt or truncated"):
        load_local_sae(corrupt)
    other = _small_sae(tmp_path, "gated")
    cfg = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps(cfg | {"architecture": "gated"}))
    with pytest.raises(ValueError, match=r"architecture 'gated' is not supported; allowed: \['standard', 'topk'"):
        load_local_sae(other)


def test_an_sae_changed_since_its_manifest_was_written_is_refused(tmp_path):
    folder = _small_sae(tmp_path)
    weights = folder / "sae_weights.safetensors"
    entry = {"path": str(folder), "source": "trained", "sha256": sha256_file(weights)}
    assert load_recorded_sae(entry).cfg.d_sae == 32
    other = load_local_sae(folder)
    with torch.no_grad():
        other.W_dec.mul_(2)
    save_sae(other, folder)  # same folder, other weights
    with pytest.raises(ValueError, match="changed since notebook 01 recorded it in saes.json .*rerun "
                                         "notebooks/01_sae_loading.ipynb"):
        load_recorded_sae(entry)


def test_a_stale_shipped_sae_recipe_fails_instead_of_retraining(tiny_model, tiny_profile, tmp_path):
    from saif_utils.saes import TRAINING_RECORD, profile_saes

    shipped = tmp_path / "shipped"
    for layer in tiny_profile.sae_layers:
        (shipped / f"layer_{layer}").mkdir(parents=True)
        (shipped / f"layer_{layer}" / TRAINING_RECORD).write_text(json.dumps({"recipe_hash": "an older recipe"}))
    profile = dataclasses.replace(tiny_profile, shipped_sae_dir=str(shipped))
    with pytest.raises(ValueError, match=r"shipped SAEs of 'tiny' at layers \[3, 6\] .*another recipe.*retrain_sae=true"):
        profile_saes(tiny_model, profile)


@pytest.mark.parametrize("host", ["127.0.0.1:8001", "localhost", "ftp://example.org", "http://"])
def test_a_malformed_ndif_host_says_how_to_write_it(host, monkeypatch):
    from saif_utils.models import remote_model

    monkeypatch.setenv("NDIF_API_KEY", "dummy")
    monkeypatch.setenv("NDIF_HOST", host)
    from saif_utils.profiles import PROFILES

    with pytest.raises(ValueError, match=r"NDIF_HOST=.* is not an http\(s\) URL: .*e\.g\. http://127\.0\.0\.1:8001"):
        remote_model(PROFILES["tiny"].model)


def test_results_page_refuses_a_missing_or_partial_run(tmp_path, capsys):
    import results_page

    before = (REPO_ROOT / "docs" / "results.md").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        results_page.main([str(tmp_path / "no-run")])
    assert exit_info.value.code == 2 and "does not exist: run `make reproduce" in capsys.readouterr().err
    partial = tmp_path / "partial"
    (partial / "01_sae_loading").mkdir(parents=True)
    (partial / "01_sae_loading" / "sae_metrics.csv").write_text("layer\n1\n")
    with pytest.raises(SystemExit):
        results_page.main([str(partial)])
    err = capsys.readouterr().err
    assert "is not a finished run; it lacks ['02_feature_discovery/summary.csv'" in err and "06_report/claims.csv" in err
    assert (REPO_ROOT / "docs" / "results.md").read_bytes() == before


def test_check_determinism_refuses_bad_arguments_before_running(tmp_path, capsys):
    import check_determinism

    with pytest.raises(SystemExit) as exit_info:
        check_determinism.main(["--profile", "defualt"])
    assert exit_info.value.code == 2 and "unknown profile='defualt'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_determinism.main(["--profile", "tiny", "--keep", str(tmp_path)])
    assert "already exists; name a folder that does not" in capsys.readouterr().err
