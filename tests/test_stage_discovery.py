"""The discovery stage's config and variant selection."""
import pytest

from saif_utils.stages.discovery import DiscoveryConfig, select_variants


def test_config_and_task_selection_fail_fast():
    with pytest.raises(ValueError, match="read_at='middle'"):
        DiscoveryConfig(read_at="middle")
    with pytest.raises(ValueError, match="n_passages=0 must be ≥ 1"):
        DiscoveryConfig(n_passages=0)
    from saif_utils.data import load_tasks, load_variants

    tasks = load_tasks()
    variants = load_variants(tasks=tasks)
    chosen = select_variants(variants, tasks, ["translate_fr"])
    assert set(chosen["base_task"]) == {"translate_fr", "translate_es", "translate_de"}
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['translate_xx'\]"):
        select_variants(variants, tasks, ["translate_xx"])
