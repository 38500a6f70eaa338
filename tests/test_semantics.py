import pandas as pd
import torch

from saif_utils.semantics import is_french_related, logit_lens
from saif_utils.stages.proximity import overlap_matrix, random_control


def test_french_token_matcher():
    assert all(map(is_french_related, ["French", " french", "fr", " Français", "Fran", " les", " est"]))
    assert not any(map(is_french_related, [" the", "Spanish", " free", " frog"]))


def test_logit_lens_reads_an_unembedding_row_back(tiny_model):
    hf = tiny_model._module
    tok = tiny_model.tokenizer
    token_id = tok(" French", add_special_tokens=False)["input_ids"][0]
    direction = hf.lm_head.weight[token_id] / hf.model.norm.weight  # undo the final norm's gain
    (lens,) = logit_lens(tiny_model, direction[None, :], top_n=5)
    assert lens["top_tokens"][0] == " French" and len(lens["bottom_tokens"]) == 5
    # Inside the trace it is the plain final norm + unembedding, token for token.
    dirs = torch.randn(6, hf.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    direct = hf.lm_head(hf.model.norm(dirs[:, None, :]))[:, 0]
    expected = [tok.batch_decode([[t] for t in row]) for row in direct.topk(7).indices.tolist()]
    assert [x["top_tokens"] for x in logit_lens(tiny_model, dirs, top_n=7)] == expected


def test_overlap_and_random_control():
    sel = pd.DataFrame({"task": ["a"] * 3 + ["b"] * 3, "layer": 1, "position": "post", "contrast": "content",
                        "rank": [1, 2, 3] * 2, "latent": [1, 2, 3, 2, 3, 4]})
    m = overlap_matrix(sel, k=3)
    assert m.set_index(["task_a", "task_b"])["jaccard"].to_dict() == {("a", "a"): 1.0, ("a", "b"): 0.5,
                                                                     ("b", "a"): 0.5, ("b", "b"): 1.0}
    ctrl = random_control(sel, {1: 50}, seed=0)
    assert len(ctrl) == 6
    for task, group in ctrl.groupby("task"):
        assert not set(group["latent"]) & set(sel[sel["task"] == task]["latent"])
    assert ctrl.equals(random_control(sel, {1: 50}, seed=0)), "the same seed draws the same latents"
    assert not ctrl.equals(random_control(sel, {1: 50}, seed=1)), "the seed is a parameter of the draw"
