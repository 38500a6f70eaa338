"""Reliability and security on the tiny profile: byte-identical reruns, resume after SIGKILL without recomputing
finished work, failure reports, and secrets that never reach a file or a log."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saif_utils.pipeline import REPO_ROOT, check_parameters, run_pipeline

DETERMINISTIC_FILES = ("02_feature_discovery/latent_scores.parquet", "02_feature_discovery/selected_latents.csv",
                       "05_steering_sweeps/sweep.parquet", "05_steering_sweeps/results.csv")


def _fresh_cache(tmp_path: Path, session_cache: str) -> Path:
    """An empty cache directory that shares only the dequantised model (verified by hash on use, not under test)."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for entry in (Path(session_cache) / "models").iterdir():
        (cache / "models" / entry.name).symlink_to(entry)
    return cache


def _copy_stages(src: Path, dest: Path, stages: tuple[str, ...]) -> Path:
    for stage in stages:
        shutil.copytree(src / stage, dest / stage)
    return dest


def test_a_second_run_with_empty_caches_is_byte_identical(tiny_run, saif_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SAIF_CACHE_DIR", str(_fresh_cache(tmp_path, saif_cache)))
    second = tmp_path / "second"
    run_pipeline("tiny", second)  # SAEs retrained, activations, residuals and generations recomputed
    for name in DETERMINISTIC_FILES:
        first_bytes, second_bytes = (tiny_run[0] / name).read_bytes(), (second / name).read_bytes()
        assert first_bytes == second_bytes, f"{name} differs between two runs with the same parameters"


def test_sigkill_mid_sweep_then_resume_recomputes_nothing_finished(tiny_run, saif_cache, tmp_path, monkeypatch):
    cache = _fresh_cache(tmp_path, saif_cache)
    output_dir = _copy_stages(tiny_run[0], tmp_path / "outputs", ("01_sae_loading", "02_feature_discovery"))
    env = dict(os.environ) | {"SAIF_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "saif_utils.pipeline", "--profile", "tiny", "--output-dir",
                             str(output_dir), "--only", "05"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log,
                            start_new_session=True)  # its own process group: the kernel dies with it
    generations = cache / "generations"
    deadline = time.monotonic() + 300
    while len(list(generations.glob("*.json"))) < 4:
        assert proc.poll() is None, "notebook 05 finished before it could be killed"
        assert time.monotonic() < deadline, "no generation was cached within 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # the kernel's process group receives the signal too; let it go
    before = {p: p.stat().st_mtime_ns for p in generations.glob("*.json")}
    assert not (output_dir / "05_steering_sweeps" / "results.csv").exists()

    monkeypatch.setenv("SAIF_CACHE_DIR", str(cache))
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
