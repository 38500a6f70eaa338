import pandas as pd
import pytest

from saif_utils.stages.playground import opening_setting

RESULTS = pd.DataFrame([
    {"task": "json", "method": "saif", "layer": 10, "k": 5, "alpha": 0.3, "position": "post", "strict_acc": 0.1, "loose_acc": 0.2},
    {"task": "summarize", "method": "saif", "layer": 15, "k": 30, "alpha": 0.3, "position": "pre", "strict_acc": 0.4, "loose_acc": 0.5},
    {"task": "summarize", "method": "prompting", "layer": None, "k": None, "alpha": None, "position": None,
     "strict_acc": 0.9, "loose_acc": 0.9},
])


def test_opening_setting_starts_from_the_best_steered_task_and_keeps_given_values():
    tasks, layers = ("json", "summarize"), [10, 15]
    assert opening_setting(RESULTS, tasks, layers) == {"task": "summarize", "layer": 15, "k": 30, "alpha": 0.3,
                                                       "position": "pre"}
    assert opening_setting(RESULTS, tasks, layers, alpha=0.9)["alpha"] == 0.9
    other = opening_setting(RESULTS, tasks, layers, task="json")
    assert other == {"task": "json", "layer": 15, "k": 15, "alpha": 0.5, "position": "post"}
    assert opening_setting(None, tasks, layers)["task"] == "json"
    with pytest.raises(ValueError, match=r"task='poem' has no selected latents.*allowed: \['json', 'summarize'\]"):
        opening_setting(RESULTS, tasks, layers, task="poem")
    with pytest.raises(ValueError, match=r"layer=3 has no SAE; allowed: \[10, 15\]"):
        opening_setting(RESULTS, tasks, layers, layer=3)
