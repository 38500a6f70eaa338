"""Shared fixtures: one hermetic cache directory and one loaded tiny-profile model per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def saif_cache(tmp_path_factory):
    """Point every cache (dequantised model, activations, SAEs) at a fresh session folder unless the caller set one."""
    if "SAIF_CACHE_DIR" not in os.environ:
        os.environ["SAIF_CACHE_DIR"] = str(tmp_path_factory.mktemp("saif-cache"))
    return os.environ["SAIF_CACHE_DIR"]


@pytest.fixture(scope="session")
def tiny_profile():
    from saif_utils.profiles import get_profile

    return get_profile("tiny")


@pytest.fixture(scope="session")
def tiny_model(saif_cache, tiny_profile):
    from saif_utils.models import load_model

    return load_model(tiny_profile)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, saif_cache):
    """Every numbered notebook run once on the tiny profile through the `make reproduce` runner → (output_dir, timings)."""
    from saif_utils.pipeline import run_pipeline

    output_dir = tmp_path_factory.mktemp("outputs") / "tiny"
    timings = run_pipeline("tiny", output_dir)
    return output_dir, timings
