"""The calibration optimiser on the tiny model: its objective equals the library's teacher-forced log-probability, it
descends, it keeps the best validation round, it prunes, and it is deterministic."""
import numpy as np
import pytest
import torch

from saif_utils.calibration import (
    CalibrationConfig,
    Targets,
    block_outputs,
    calibrate,
    initial_weights,
    mean_nll,
    steered_nll,
    summed_gradient,
    target_nll,
)
from saif_utils.interventions import AddVector
from saif_utils.likelihood import continuation_logprob
from saif_utils.models import chat_prompt

LAYER = 3
PASSAGES = ["The old lighthouse stood at the end of the rocky pier.", "Honeybees dance to show where flowers are.",
            "The train to the mountains leaves at seven o'clock.", "My grandmother bakes bread every Sunday morning.",
            "Solar panels turn sunlight into electricity.", "The library opens at nine and closes at six.",
            "A fox crossed the snowy field at dawn.", "The river floods every spring after the thaw."]


@pytest.fixture(scope="module")
def targets(tiny_model):
    """The model's own answers to 'Translate to French' prompts, paired with the bare passages (6 train, 2 val)."""
    from saif_utils.generation import generate_steered

    tok = tiny_model.tokenizer
    ids = lambda texts: tok([chat_prompt(tok, t) for t in texts], add_special_tokens=False)["input_ids"]  # noqa: E731
    answers = generate_steered(tiny_model, ids([f"{p}\n\nTranslate this into French." for p in PASSAGES]), LAYER, None,
                               max_new_tokens=8)
    pairs = Targets(ids(PASSAGES), [list(a) for a in answers])
    return pairs.subset(range(6)), pairs.subset(range(6, 8))


@pytest.fixture(scope="module")
def basis():
    """Five fixed random unit directions standing in for SAE decoder rows."""
    directions = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    return directions / directions.norm(dim=1, keepdim=True)


def test_objective_equals_the_teacher_forced_logprob(tiny_model, targets):
    """mean_nll is the token-weighted mean of what continuation_logprob (the scoring path) computes under the edit."""
    train, _ = targets
    vector = torch.randn(576, generator=torch.Generator().manual_seed(1))
    per_row = continuation_logprob(tiny_model, train.prompt_ids, train.response_ids, LAYER, AddVector(vector))
    n_tokens = np.array([len(r) for r in train.response_ids])
    expected = -(per_row * n_tokens).sum() / n_tokens.sum()
    assert mean_nll(tiny_model, LAYER, vector, None, train, batch_size=4) == pytest.approx(expected, rel=1e-5)
    # Per target, in the order given (a batch sorts its rows by length): the same log-probs, summed per response.
    mean, row_nll, row_tokens = target_nll(tiny_model, LAYER, vector, None, train, batch_size=4)
    assert row_tokens.tolist() == n_tokens.tolist()
    assert row_nll == pytest.approx(-per_row * n_tokens, rel=1e-5)
    assert mean == pytest.approx(row_nll.sum() / row_tokens.sum(), rel=1e-6)


def test_an_evaluation_that_skips_the_blocks_below_the_layer_is_bitwise_the_same(tiny_model, targets, basis):
    """Reusing block LAYER's unedited output (what `calibrate` does for its fixed evaluation batches) skips blocks
    0 … LAYER and gives exactly the NLL of the full forward; an output of other targets is refused."""
    train, _ = targets
    weights = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    below = block_outputs(tiny_model, LAYER, train, batch_size=4)  # batches of 4 and 2
    full = target_nll(tiny_model, LAYER, weights, basis, train, batch_size=4)
    reused = target_nll(tiny_model, LAYER, weights, basis, train, batch_size=4, below=below)
    assert reused[0] == full[0]
    assert np.array_equal(reused[1], full[1]) and np.array_equal(reused[2], full[2])
    with pytest.raises(ValueError, match="block_outputs"):
        steered_nll(tiny_model, LAYER, weights, basis, train.subset(range(4)), below=below[1])


def test_a_gradient_in_chunks_equals_the_whole_batch_gradient(tiny_model, targets, basis):
    """Backpropagating a few targets at a time (to bound memory) sums to the gradient of one pass over all of them."""
    train, _ = targets
    weights = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    whole = steered_nll(tiny_model, LAYER, weights, basis, train, backward=True)
    for rows_per_pass in (1, 4, len(train)):  # 4 leaves a last chunk of 2
        grad, n_tokens, total = summed_gradient(tiny_model, LAYER, weights, basis, train, rows_per_pass)
        assert n_tokens == whole.n_tokens and total == pytest.approx(whole.total, rel=1e-5)
        assert torch.allclose(grad, whole.grad, rtol=1e-5, atol=1e-6 * float(whole.grad.abs().max()))
    # a training step that skips the blocks below the layer (calibrate's fixed minibatches) has the same gradient
    below = block_outputs(tiny_model, LAYER, train, batch_size=4)
    grad, _, _ = summed_gradient(tiny_model, LAYER, weights, basis, train, 4, below=below)
    assert torch.allclose(grad, whole.grad, rtol=1e-5, atol=1e-6 * float(whole.grad.abs().max()))


def test_an_evaluation_records_no_autograd_graph_even_with_trainable_weights(tiny_model, targets, basis):
    """Outside `frozen_weights` the model's weights require grad (the round-0 evaluation runs there): an evaluation
    must still save no activations for a backward pass (on the default profile that graph held ≈ 2 GB)."""
    train, _ = targets
    weights = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    assert any(p.requires_grad for p in tiny_model._module.parameters())

    def saved_tensors(backward: bool) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            steered_nll(tiny_model, LAYER, weights, basis, train, backward=backward)
        return len(saved)

    assert saved_tensors(backward=False) == 0
    assert saved_tensors(backward=True) > 0  # the hook does see this path's graph when there is one


def test_initial_weights_reproduce_the_saif_vector(basis):
    weights = initial_weights(basis[[0, 2, 4]], [3.0, 2.0, 1.0], target_norm=7.0)
    vector = weights @ basis[[0, 2, 4]]
    assert float(vector.norm()) == pytest.approx(7.0, rel=1e-5)
    assert torch.allclose(weights / weights[0], torch.tensor([1.0, 2 / 3, 1 / 3]))


def test_calibration_descends_keeps_the_best_round_prunes_and_repeats(tiny_model, targets, basis):
    train, val = targets
    init = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    cfg = CalibrationConfig(max_rounds=3, patience=3, lr=0.3, batch_size=3, prune_fraction=0.2)
    result = calibrate(tiny_model, LAYER, init, basis, train, val, cfg)
    history = result.history
    assert list(history["round"]) == [0, 1, 2, 3]
    assert list(history["n_steps"]) == [0, 2, 4, 6], "6 train targets in minibatches of 3: two steps a round"
    best = history[history["best"]].iloc[0]
    assert best["round"] > 0 and best["val_nll"] == history["val_nll"].min() <= history["val_nll"].iloc[0]
    # the train split is evaluated at the start and at the kept round only; the steps' own objective every round
    assert history["train_nll"].notna().tolist() == [r in (0, best["round"]) for r in history["round"]]
    assert best["train_nll"] < history["train_nll"].iloc[0], "the kept round did not lower the train NLL"
    assert history["train_running_objective"].iloc[1:].notna().all()
    assert history["train_running_objective"].iloc[-1] < history["train_nll"].iloc[0]
    rows = history.dropna(subset=["train_nll"])
    for split, split_rows in (("train", rows), ("val", history)):  # 95 % CIs over targets bracket every NLL
        assert (split_rows[f"{split}_nll_ci_low"] < split_rows[f"{split}_nll"]).all()
        assert (split_rows[f"{split}_nll"] < split_rows[f"{split}_nll_ci_high"]).all()
    # the returned weights are the best round's: their val and train NLL are the ones recorded for it
    assert mean_nll(tiny_model, LAYER, result.params, basis, val, 4) == pytest.approx(best["val_nll"], rel=1e-5)
    assert mean_nll(tiny_model, LAYER, result.params, basis, train, 4) == pytest.approx(best["train_nll"], rel=1e-5)
    # pruning acted: the weights below 0.2 × the largest are fixed at zero, and the history counts what is left
    assert not result.active.all() and (result.params[~result.active] == 0).all()
    assert (result.params[result.active] != 0).all()
    assert history["n_active"].iloc[0] == len(init) and history["n_active"].iloc[-1] == int(result.active.sum()) < len(init)
    assert history["n_active"].is_monotonic_decreasing
    assert all(p.grad is None for p in tiny_model._module.parameters()), "the model's weights must not learn"
    again = calibrate(tiny_model, LAYER, init, basis, train, val, cfg)
    assert torch.equal(result.params, again.params) and history.equals(again.history)


def test_calibration_runs_until_the_val_nll_stops_improving(tiny_model, targets, basis):
    """With a round cap far away, the run stops `patience` rounds after its best val NLL and says it converged; a run
    cut by the cap says it did not."""
    train, val = targets
    init = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    cfg = CalibrationConfig(max_rounds=40, patience=1, lr=2.0, batch_size=3, prune_fraction=0.0, min_improvement=0.0)
    history = calibrate(tiny_model, LAYER, init, basis, train, val, cfg).history
    best_round = int(history.loc[history["best"], "round"].iloc[0])
    assert history["round"].iloc[-1] == best_round + 1 < 40 and history["converged"].all()
    assert (history["val_nll"].iloc[best_round + 1:] >= history["val_nll"].iloc[best_round]).all()
    capped = calibrate(tiny_model, LAYER, init, basis, train, val, CalibrationConfig(max_rounds=1, patience=5, lr=0.3))
    assert list(capped.history["round"]) == [0, 1] and not capped.history["converged"].any()


def test_calibration_on_a_plateau_stops_though_the_val_nll_still_creeps_down(tiny_model, targets, basis):
    """Only a fall of `min_improvement` (relative) below the last mark counts as progress: with a mark no round can
    beat, the run stops after `patience` rounds, and still keeps its best round."""
    train, val = targets
    init = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    cfg = CalibrationConfig(max_rounds=40, patience=2, lr=0.3, batch_size=3, prune_fraction=0.0, min_improvement=0.9)
    result = calibrate(tiny_model, LAYER, init, basis, train, val, cfg)
    history = result.history
    assert list(history["round"]) == [0, 1, 2] and history["converged"].all()
    best = history[history["best"]].iloc[0]
    assert best["round"] > 0 and best["val_nll"] < history["val_nll"].iloc[0]
    assert mean_nll(tiny_model, LAYER, result.params, basis, val, 4) == pytest.approx(best["val_nll"], rel=1e-5)


def test_kl_objective_is_zero_against_itself_and_descends(tiny_model, targets, basis):
    """With the teacher read from the same prompts and no vector, the KL is 0 at every response token (the teacher's
    distributions line up with the steered model's predictions); a vector moves it above 0; a KL calibration from
    the instructed prompts lowers its own val objective."""
    from saif_utils.calibration import with_teacher

    train, val = targets
    own = with_teacher(tiny_model, Targets(train.prompt_ids, train.response_ids, train.prompt_ids), 64, 4)
    assert [len(t[0]) for t in own.teacher] == [len(r) for r in own.response_ids]
    zero = steered_nll(tiny_model, LAYER, torch.zeros(5), basis, own, objective="kl")
    assert abs(zero.total) < 1e-3 * zero.n_tokens
    pushed = steered_nll(tiny_model, LAYER, torch.tensor([40.0, 0, 0, 0, 0]), basis, own, objective="kl")
    assert pushed.total > 0.05 * pushed.n_tokens
    with pytest.raises(ValueError, match="needs the prompted model's distributions"):
        steered_nll(tiny_model, LAYER, torch.zeros(5), basis, train, objective="kl")
    with pytest.raises(ValueError, match="needs the prompts with the instruction"):
        with_teacher(tiny_model, train, 64, 4)

    tok = tiny_model.tokenizer
    instructed = tok([chat_prompt(tok, f"{p}\n\nTranslate this into French.") for p in PASSAGES],
                     add_special_tokens=False)["input_ids"]
    kl_train = Targets(train.prompt_ids, train.response_ids, instructed[:6])
    kl_val = Targets(val.prompt_ids, val.response_ids, instructed[6:8])
    cfg = CalibrationConfig(max_rounds=3, patience=3, lr=0.3, batch_size=3, objective="kl", teacher_top_k=64)
    history = calibrate(tiny_model, LAYER, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5]), basis, kl_train, kl_val,
                        cfg).history
    best = history[history["best"]].iloc[0]
    assert best["val_objective"] == history["val_objective"].min()
    assert best["train_objective"] < history["train_objective"].iloc[0]
    assert (history["val_objective"] != history["val_nll"]).all(), "the history keeps the NLL beside the KL"
    # the NLL read in the KL's pass is the NLL itself: a fresh NLL-only evaluation of the kept weights agrees
    kept = calibrate(tiny_model, LAYER, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5]), basis, kl_train, kl_val, cfg).params
    assert best["val_nll"] == mean_nll(tiny_model, LAYER, kept, basis, kl_val, 3)


def test_dense_calibration_moves_every_coordinate(tiny_model, targets):
    train, val = targets
    init = torch.randn(576, generator=torch.Generator().manual_seed(2))
    result = calibrate(tiny_model, LAYER, init, None, train, val, CalibrationConfig(max_rounds=1, patience=1, lr=0.3))
    assert result.history["val_nll"].iloc[1] < result.history["val_nll"].iloc[0]
    assert result.active.all() and result.params.shape == init.shape


def test_bad_input_fails_fast(tiny_model, targets, basis):
    train, _ = targets
    with pytest.raises(ValueError, match="needs train and val targets"):
        calibrate(tiny_model, LAYER, torch.ones(5), basis, train, Targets([], []), CalibrationConfig())
    with pytest.raises(ValueError, match="empty response"):
        Targets([[1, 2]], [[]])
    with pytest.raises(ValueError, match="must be ≥ 1"):
        CalibrationConfig(max_rounds=0)
    with pytest.raises(ValueError, match="grad_rows must be ≥ 1"):
        CalibrationConfig(grad_rows=0)
    with pytest.raises(ValueError, match=r"objective='likelihood'; allowed: \['nll', 'kl'\]"):
        CalibrationConfig(objective="likelihood")
