"""Shared fixtures. Every test gets its own empty cache folder (the dequantised model, built once per session, is
shared through a link) and must leave `os.environ` as it found it; the tiny-profile run is made once per session in
a cache and output folder of its own."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SLOW_FIXTURES = {"tiny_run", "local_ndif", "chromium"}
"""A test that uses one of these is slow: the shared papermill run of every notebook, the local NDIF server, the
browser. Others are marked `slow` where they stand (the GGUF dequantisation cache, the SAE training corpus)."""


def pytest_collection_modifyitems(config, items) -> None:
    """Mark `slow` every test that needs a slow fixture, so that `make test-fast` (`-m "not slow"`) leaves it out."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _cache_with_models(root: Path, models: Path) -> Path:
    """An empty cache folder whose `models/` is the session's dequantised models."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models, target_is_directory=True)
    return root


def require(available: bool, what: str) -> None:
    """Skip a real-component test whose prerequisite is missing here, but fail it under CI (`CI` set), where every
    guard must run: `make test-deps` installs what can be installed."""
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"{what}, and CI is set: in CI this test must run (`make test-deps` installs what it needs)")
        pytest.skip(what)


def copy_run(src: Path, dest: Path, stages: tuple[str, ...]) -> Path:
    """A copy of `stages` of the run folder `src` in `dest` that shares nothing with it: the SAE folders its
    `saes.json` names are copied too, and the copy's manifest points at them."""
    import json
    import shutil

    for stage in stages:
        shutil.copytree(src / stage, dest / stage)
    manifest = dest / "01_sae_loading" / "saes.json"
    if manifest.is_file():
        entries = json.loads(manifest.read_text())
        for layer, entry in entries.items():
            if entry["source"] != "released":
                entry["path"] = str(shutil.copytree(entry["path"], dest / "saes" / f"layer_{layer}"))
        manifest.write_text(json.dumps(entries, indent=1))
    return dest


@pytest.fixture(scope="session")
def session_models(tmp_path_factory) -> Path:
    """Where the dequantised model is built once for the whole session."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def saif_cache(tmp_path_factory, session_models, monkeypatch) -> str:
    """A fresh cache folder for this test; Jupyter state lands there too (the runner keeps it under the cache)."""
    cache = _cache_with_models(tmp_path_factory.mktemp("saif-cache"), session_models)
    monkeypatch.setenv("SAIF_CACHE_DIR", str(cache))
    return str(cache)


# Variables the project and its runner read or set; a library that sets its own flags on import (OpenMP's KMP_*) is
# not the test's doing.
PROJECT_VARIABLES = ("SAIF_", "JUPYTER_", "IPYTHONDIR", "WANDB_", "TOKENIZERS_", "NDIF_", "TQDM_", "HF_")


@pytest.fixture(autouse=True)
def environ_unchanged():
    """Fail a test that changes or removes an environment variable, or adds one the project uses (monkeypatch's own
    changes are undone before this check)."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = sorted(k for k in before if before[k] != after.get(k) and k != "PYTEST_CURRENT_TEST")
    added = sorted(k for k in after.keys() - before.keys() if k.startswith(PROJECT_VARIABLES))
    assert not changed and not added, f"the test left environment variables changed: {changed + added}"


@pytest.fixture(scope="session")
def tiny_profile():
    from saif_utils.profiles import get_profile

    return get_profile("tiny")


@pytest.fixture(scope="session")
def tiny_model(session_models, tiny_profile):
    """The tiny profile's model, loaded once (its dequantised weights go to the session's model folder)."""
    from saif_utils.models import load_model
    from saif_utils.pipeline import scoped_environ

    cache = _cache_with_models(session_models.parent / "tiny-model-cache", session_models)
    with scoped_environ({"SAIF_CACHE_DIR": str(cache)}):
        return load_model(tiny_profile)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, session_models):
    """Every numbered notebook run once on the tiny profile through the `make reproduce` runner
    → (output_dir, timings, cache folder)."""
    from saif_utils.pipeline import run_pipeline, scoped_environ

    cache = _cache_with_models(tmp_path_factory.mktemp("tiny-run-cache"), session_models)
    output_dir = tmp_path_factory.mktemp("outputs") / "tiny"
    with scoped_environ({"SAIF_CACHE_DIR": str(cache)}):
        timings = run_pipeline("tiny", output_dir)
    return output_dir, timings, cache
