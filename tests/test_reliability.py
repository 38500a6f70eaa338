"""Reliability and security on the tiny profile: byte-identical reruns, resume after SIGKILL without recomputing
finished work, failure reports, and secrets that never reach a file or a log."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saif_utils.paths import REPO_ROOT
from saif_utils.pipeline import check_parameters, deterministic_files, differing_cache_entries, run_pipeline


def _alive(process) -> bool:
    """True while a process runs (a zombie, killed but not yet reaped by its new parent, counts as gone)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _copy_stages(src: Path, dest: Path, stages: tuple[str, ...]) -> Path:
    for stage in stages:
        shutil.copytree(src / stage, dest / stage)
    return dest


def test_a_second_run_with_empty_caches_is_byte_identical(tiny_run, saif_cache, tmp_path):
    second = tmp_path / "second"  # this test's cache is empty but for the dequantised model (verified by hash on use)
    run_pipeline("tiny", second)  # SAEs retrained, activations, residuals and generations recomputed
    first = tiny_run[0]
    names = deterministic_files(first)
    # every table of 01–05: metrics, scores, selections, proximity, both stages' generations, calibrations
    for expected in ("01_sae_loading/sae_metrics.csv", "03_semantic_proximity/proximity.parquet",
                     "04_causal_ablation/generations.parquet", "05_steering_sweeps/generations.parquet",
                     "05_steering_sweeps/calibration.csv", "05_steering_sweeps/calibrated_weights.csv"):
        assert expected in names, (expected, names)
    assert deterministic_files(second) == names, "the two runs wrote different sets of tables"
    differing = [name for name in names if (first / name).read_bytes() != (second / name).read_bytes()]
    assert not differing, (f"{differing} differ between two runs with the same parameters; cache entries that differ "
                           f"(the earliest stage's is where it started): "
                           f"{differing_cache_entries(tiny_run[2], Path(saif_cache))}")


def test_sigkill_mid_sweep_then_resume_recomputes_nothing_finished(tiny_run, saif_cache, tmp_path):
    import psutil

    cache = Path(saif_cache)
    output_dir = _copy_stages(tiny_run[0], tmp_path / "outputs", ("01_sae_loading", "02_feature_discovery"))
    env = dict(os.environ) | {"SAIF_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "saif_utils.pipeline", "--profile", "tiny", "--output-dir",
                             str(output_dir), "--only", "05"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    generations = cache / "generations"
    deadline = time.monotonic() + 300
    while len(list(generations.glob("*.json"))) < 4:
        assert proc.poll() is None, "notebook 05 finished before it could be killed"
        assert time.monotonic() < deadline, "no generation was cached within 300 s"
        time.sleep(0.05)
    # Jupyter starts each kernel in a session (and process group) of its own, so signalling the runner's group would
    # miss it: kill the runner and every process it started, each by its own pid, and wait until all are gone.
    runner = psutil.Process(proc.pid)
    victims = [runner, *runner.children(recursive=True)]
    assert any("ipykernel" in " ".join(p.cmdline()) for p in victims[1:]), "the notebook's kernel was not found"
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while alive := [v for v in victims if _alive(v)]:
        assert time.monotonic() < deadline, f"processes survived SIGKILL: {alive}"
        time.sleep(0.1)
    before = {p: p.stat().st_mtime_ns for p in generations.glob("*.json")}
    assert not (output_dir / "05_steering_sweeps" / "results.csv").exists()

    run_pipeline("tiny", output_dir, only=["05"])
    after = {p: p.stat().st_mtime_ns for p in generations.glob("*.json")}
    assert all(after[p] == stamp for p, stamp in before.items()), "an entry finished before the kill was recomputed"
    assert len(after) > len(before), "the rerun generated what the killed run had not"
    assert all(isinstance(json.loads(p.read_text())["ids"], list) for p in after), "every cache entry is whole"
    leftovers = [p for root in (cache, output_dir) for p in root.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, f"partial files left behind: {leftovers}"
    assert (output_dir / "05_steering_sweeps" / "results.csv").is_file()


def test_a_failing_notebook_reports_where_and_keeps_earlier_stages(tiny_run, tmp_path, capsys):
    output_dir = _copy_stages(tiny_run[0], tmp_path / "outputs", ("01_sae_loading",))
    kept = sorted(p.name for p in (output_dir / "01_sae_loading").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline("tiny", output_dir, only=["02"], extra={"n_passages": "many"})  # a parameter of the wrong type
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    partial = output_dir / "02_feature_discovery" / "02_feature_discovery.ipynb"
    assert "FAILED 02_feature_discovery at cell" in err and "n_passages='many'" in err and "expected int" in err
    assert re.search(r"\n  in: \S.*stage_config|\n  in: \S.*config", err), f"the failing source line is missing: {err}"
    assert f"partially executed notebook: {partial}" in err and partial.is_file()
    assert sorted(p.name for p in (output_dir / "01_sae_loading").iterdir()) == kept


def test_secrets_come_from_the_environment_and_never_reach_a_file_or_log(tiny_run, tmp_path, monkeypatch, capfd):
    secret = "ndif-dummy-key-3f9c2e7a51"
    monkeypatch.setenv("NDIF_API_KEY", secret)
    output_dir = _copy_stages(tiny_run[0], tmp_path / "outputs", ("01_sae_loading", "02_feature_discovery"))
    run_pipeline("tiny", output_dir, only=["03"])
    logs = capfd.readouterr()
    leaked = [p for p in output_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, f"the key was written to {leaked}"
    assert secret not in logs.out and secret not in logs.err
    for name in ("ndif_api_key", "NDIF_API_KEY", "judge_token"):
        with pytest.raises(ValueError, match="secrets are never notebook parameters"):
            check_parameters({name: secret})
    with pytest.raises(ValueError, match="look like credentials"):
        run_pipeline("tiny", output_dir, only=["03"], extra={"ndif_api_key": secret})


def test_the_runner_keeps_jupyter_state_in_the_cache_and_restores_the_environment(saif_cache, tmp_path, capsys):
    """A run (even a failing one) leaves `os.environ` as it was (the autouse guard checks) and writes no Jupyter or
    IPython state into the repository."""
    before = set(REPO_ROOT.iterdir())
    with pytest.raises(SystemExit):  # no SAE manifest in this output folder: notebook 02 stops in its setup cell
        run_pipeline("tiny", tmp_path / "outputs", only=["02"])
    assert "saes.json is missing: run notebooks/01_sae_loading.ipynb" in capsys.readouterr().err
    assert (Path(saif_cache) / "jupyter" / "runtime").is_dir()
    assert set(REPO_ROOT.iterdir()) == before, "the run wrote into the repository root"
