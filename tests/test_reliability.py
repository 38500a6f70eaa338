"""Reliability and security on the tiny profile: byte-identical reruns, resume after SIGKILL without recomputing
finished work, failure reports, and secrets that never reach a file or a log."""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import copy_run

from saif_utils.paths import REPO_ROOT
from saif_utils.pipeline import check_parameters, deterministic_files, differing_cache_entries, run_pipeline


def _alive(process) -> bool:
    """True while a process runs (a zombie, killed but not yet reaped by its new parent, counts as gone)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
    output_dir = copy_run(tiny_run[0], tmp_path / "outputs", ("01_sae_loading", "02_feature_discovery"))
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
    output_dir = copy_run(tiny_run[0], tmp_path / "outputs", ("01_sae_loading",))
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


class _StandInNDIF(http.server.ThreadingHTTPServer):
    """A loopback HTTP server in NDIF's place: `/status` lists `model_key` as deployed, so a remote run passes its
    checks and sends its first trace; that request (nnsight opens a websocket carrying the key in a header) is
    recorded and refused, so the run fails there."""

    def __init__(self, model_key: str):
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/status"):
                    body = json.dumps({"deployments": {f"stand-in:ModelActor:{model_key}": {}}}).encode()
                    self.send_response(200)
                else:
                    requests.append((self.path, dict(self.headers)))
                    body = b"a stand-in, not NDIF"
                    self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_secrets_come_from_the_environment_and_never_reach_a_file_or_log(tiny_run, saif_cache, tmp_path, monkeypatch,
                                                                         capfd):
    """A remote run of notebook 03 reads the key, sends it to the server (a loopback stand-in that records it) and
    fails on the refused trace; the key is then in no file of the run folder, its executed notebook, the cache,
    HOME or nnsight's config, nor in the log. Secrets are never notebook parameters."""
    from nnsight import CONFIG

    from saif_utils.models import remote_handle
    from saif_utils.profiles import PROFILES

    secret = "ndif-dummy-key-3f9c2e7a51"
    home, nnsight_config = tmp_path / "home", tmp_path / "nnsight" / "config.yaml"
    home.mkdir()
    monkeypatch.setenv("NDIF_API_KEY", secret)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NNSIGHT_CONFIG", str(nnsight_config))
    output_dir = copy_run(tiny_run[0], tmp_path / "outputs", ("01_sae_loading", "02_feature_discovery"))
    monkeypatch.setattr(CONFIG.API, "APIKEY", CONFIG.API.APIKEY)  # restored after remote_handle sets it here
    monkeypatch.setattr(CONFIG.API, "HOST", CONFIG.API.HOST)
    server = _StandInNDIF(remote_handle(PROFILES["tiny"].model).to_model_key())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(SystemExit):
            run_pipeline("tiny", output_dir, remote=True, only=["03"])
    finally:
        server.shutdown()
        server.server_close()
    logs = capfd.readouterr()
    assert "FAILED 03_semantic_proximity" in logs.err, logs.err[-2000:]
    sent = [headers.get("ndif-api-key") for _, headers in server.requests]
    assert secret in sent, f"the run never sent the key, so this scan proves nothing: {server.requests}"
    leaked = [p for root in (output_dir, Path(saif_cache), home, nnsight_config.parent) if root.exists()
              for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()]
    assert not leaked, f"the key was written to {leaked}"
    assert (output_dir / "03_semantic_proximity" / "03_semantic_proximity.ipynb").is_file(), "no executed notebook"
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
