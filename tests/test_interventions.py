import pytest
import torch

from saif_utils.generation import generate_steered
from saif_utils.interventions import AddVector
from saif_utils.models import chat_prompt, length_buckets, tokenize
from saif_utils.paths import REPO_ROOT
from saif_utils.profiles import PROFILES
from saif_utils.vectors import direction_from_latents, scale_direction

LAYER, N_NEW = 4, 10


@pytest.fixture(scope="module")
def setup(tiny_model):
    tok = tiny_model.tokenizer
    ids = tokenize(tok, [chat_prompt(tok, "The cat sleeps on the warm windowsill."), chat_prompt(tok, "Hi")])
    direction = torch.randn(tiny_model._module.config.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = scale_direction(direction, alpha=0.6, mean_norm=60.0)
    return ids, vector


def _hook_generate(hf_model, tok, ids, vector):
    """Reference: plain HF generate with a torch forward hook adding `vector` at every forward (prompt and tokens)."""
    (batch,) = length_buckets(ids, 8, tok.pad_token_id)

    def add(module, args, out):
        return (out[0] + vector,) + tuple(out[1:]) if isinstance(out, tuple) else out + vector

    handle = hf_model.model.layers[LAYER].register_forward_hook(add)
    try:
        with torch.inference_mode():
            out = hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                                    max_new_tokens=N_NEW, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    width = batch.input_ids.shape[1]
    trimmed = {}
    for r, i in enumerate(batch.rows):
        new = out[r, width:].tolist()
        trimmed[i] = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return trimmed, handle


def test_steering_reaches_every_generated_token(tiny_model, setup):
    ids, vector = setup
    steered = generate_steered(tiny_model, ids, LAYER, vector, N_NEW, span="both")
    reference, _ = _hook_generate(tiny_model._module, tiny_model.tokenizer, ids, vector)
    assert [len(s) for s in steered] == [N_NEW, N_NEW], "the steered prompts run to the token limit"
    assert steered == [reference[0], reference[1]], "nnsight steering must match a torch hook token for token"
    plain = generate_steered(tiny_model, ids, LAYER, None, N_NEW)
    prompt_only = generate_steered(tiny_model, ids, LAYER, vector, N_NEW, span="prompt")
    assert steered != plain, "the vector is large enough to change the continuation"
    assert steered != prompt_only, "steering only the prompt (the SAELens-tutorial bug) must differ from every token"


def test_steered_residuals_match_the_hook(tiny_model, setup):
    """Teacher-forced over prompt + generated tokens: the steered residual equals the hooked one."""
    ids, vector = setup
    steered = generate_steered(tiny_model, ids, LAYER, vector, N_NEW, span="both")
    full = [p + s for p, s in zip(ids, steered)]
    (batch,) = length_buckets(full, 8, tiny_model.tokenizer.pad_token_id)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.inference_mode(), tiny_model.trace(inputs):
        tiny_model.model.layers[LAYER].output[:] += vector
        nn_resid = tiny_model.model.layers[LAYER + 1].output.save()
    store = {}
    hf = tiny_model._module
    h1 = hf.model.layers[LAYER].register_forward_hook(lambda m, a, o: o + vector)
    h2 = hf.model.layers[LAYER + 1].register_forward_hook(lambda m, a, o: store.__setitem__("r", o))
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        hf(**inputs, position_ids=position_ids)
    h1.remove(), h2.remove()
    torch.testing.assert_close(nn_resid, store["r"], atol=1e-5, rtol=1e-5)


def test_vector_construction_and_bad_inputs(tiny_model):
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=32, k=4))
    with torch.no_grad():
        sae.W_dec.normal_()
    unit = direction_from_latents(sae, [1, 2], [1.0, 0.5])
    assert unit.norm().item() == pytest.approx(1.0, abs=1e-5)
    expected = sae.W_dec[1] + 0.5 * sae.W_dec[2]
    torch.testing.assert_close(unit, expected / expected.norm())
    assert scale_direction(unit, 0.5, 100.0).norm().item() == pytest.approx(50.0, rel=1e-5)
    with pytest.raises(ValueError, match="no latents selected"):
        direction_from_latents(sae, [], [])
    with pytest.raises(ValueError, match=r"latent indices \[40\] are outside 0 … 31"):
        direction_from_latents(sae, [40], [1.0])
    with pytest.raises(ValueError, match="alpha=nan must be a finite number"):
        scale_direction(unit, float("nan"), 1.0)
    with pytest.raises(ValueError, match="span='all'"):
        generate_steered(tiny_model, [[1, 2]], LAYER, unit, 2, span="all")


def _toy_sae(d_sae=64, k=8, seed=0):
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=d_sae, k=k))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(576, d_sae, generator=gen) / 24)
        sae.W_dec.copy_(torch.randn(d_sae, 576, generator=gen))
    return sae


def test_ablation_removes_exactly_the_latents_contribution(tiny_model, setup):
    """The nnsight ablation leaves exactly h − Σ_j a_j(h) W_dec[j] in the residual."""
    from saif_utils.interventions import AblateLatents

    ids, _ = setup
    sae, latents = _toy_sae(), (3, 7, 11)
    edit = AblateLatents(sae, latents, "toy")
    (batch,) = length_buckets(ids, 8, tiny_model.tokenizer.pad_token_id)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.inference_mode(), tiny_model.trace(inputs):
        resid = tiny_model.model.layers[LAYER].output
        resid[:] += edit.delta(resid)
        nn_resid = tiny_model.model.layers[LAYER].output.save()
    with torch.inference_mode(), tiny_model.trace(inputs):
        clean = tiny_model.model.layers[LAYER].output.save()
    removed = sae.encode(clean)[..., list(latents)]
    assert removed.abs().sum() > 0, "the toy latents must fire for the test to mean anything"
    expected = clean - removed @ sae.W_dec[list(latents)]
    torch.testing.assert_close(nn_resid, expected, atol=1e-4, rtol=1e-4)
    generated = generate_steered(tiny_model, ids, LAYER, edit, 6)
    assert all(0 < len(g) <= 6 for g in generated)


def test_generation_cache_reuses_and_repairs_entries(tiny_model, setup, tmp_path, monkeypatch):
    from saif_utils.generation import cached_generate

    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path))
    ids, vector = setup
    first = cached_generate(tiny_model, "tiny", ids, LAYER, AddVector(vector), 5)
    entries = sorted((tmp_path / "generations").glob("*.json"))
    assert len(entries) == 2
    assert first == generate_steered(tiny_model, ids, LAYER, vector, 5)
    entries[0].write_text('{"ids": [1, 2')  # a torn write
    stamp = entries[1].stat().st_mtime_ns
    assert cached_generate(tiny_model, "tiny", ids, LAYER, AddVector(vector), 5) == first
    assert entries[1].stat().st_mtime_ns == stamp, "an intact entry is reused, not regenerated"
    other = cached_generate(tiny_model, "tiny", ids, LAYER, AddVector(vector * 2), 5)
    assert len(list((tmp_path / "generations").glob("*.json"))) == 4 and other != first


def test_continuation_logprob_matches_a_plain_forward(tiny_model):
    from saif_utils.likelihood import continuation_logprob

    tok = tiny_model.tokenizer
    prefix = tokenize(tok, [chat_prompt(tok, "Name a colour."), chat_prompt(tok, "Hi")])
    cont = [tok("Blue is a colour.")["input_ids"], tok("Hello!")["input_ids"]]
    got = continuation_logprob(tiny_model, prefix, cont)
    for i in range(2):
        full = torch.tensor([prefix[i] + cont[i]])
        with torch.inference_mode():
            lp = tiny_model._module(full).logits[0, :-1].log_softmax(-1)
        n = len(cont[i])
        expected = lp[-n:].gather(-1, full[0, -n:, None]).mean().item()
        assert got[i] == pytest.approx(expected, abs=1e-4)


def test_random_baselines_avoid_the_selection():
    import numpy as np

    from saif_utils.vectors import mass_matched_latents, random_latents

    picked = random_latents(100, 10, exclude=range(50), seed=1)
    assert len(set(picked)) == 10 and (picked >= 50).all()
    assert (random_latents(100, 10, range(50), 1) == picked).all(), "seeded"
    with pytest.raises(ValueError, match="k=60 random latents"):
        random_latents(100, 60, range(50), 0)
    mass = np.arange(200, dtype=float)
    selected = [20, 100, 150]
    matched = mass_matched_latents(mass, selected, seed=0, window=5)
    assert not set(matched) & set(selected) and len(set(matched)) == 3
    assert np.abs(mass[matched] - mass[selected]).max() <= 6


def test_per_prompt_vectors_share_a_batch_and_match_separate_runs(tiny_model, setup, tmp_path, monkeypatch):
    from saif_utils.generation import cached_generate

    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path))
    ids, vector = setup
    # One call, prompt 0 steered by `vector`, prompt 1 by `-vector`, a third row (prompt 0 again) unsteered.
    rows = [ids[0], ids[1], ids[0]]
    together = generate_steered(tiny_model, rows, LAYER, AddVector(torch.stack([vector, -vector, 0 * vector])), N_NEW)
    assert together[0] == generate_steered(tiny_model, [ids[0]], LAYER, vector, N_NEW)[0]
    assert together[1] == generate_steered(tiny_model, [ids[1]], LAYER, -vector, N_NEW)[0]
    assert together[2] == generate_steered(tiny_model, [ids[0]], LAYER, None, N_NEW)[0]
    # Per-prompt edits through the cache: one entry per (prompt, vector); a shared-vector call then hits it.
    cached = cached_generate(tiny_model, "tiny", rows, LAYER, [AddVector(vector), AddVector(-vector), None], N_NEW)
    assert cached == together
    assert len(list((tmp_path / "generations").glob("*.json"))) == 3
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "generations").glob("*.json")}
    assert cached_generate(tiny_model, "tiny", [ids[0]], LAYER, AddVector(vector), N_NEW) == [together[0]]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "generations").glob("*.json")} == stamp


def test_logprob_cache_reuses_entries_and_keeps_empty_continuations(tiny_model, tmp_path, monkeypatch):
    import numpy as np

    from saif_utils.likelihood import cached_logprob, continuation_logprob

    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path))
    tok = tiny_model.tokenizer
    prefix = tokenize(tok, [chat_prompt(tok, "Name a colour."), chat_prompt(tok, "Hi")])
    cont = [tok("Blue is a colour.")["input_ids"], []]
    first = cached_logprob(tiny_model, "tiny", prefix, cont)
    np.testing.assert_allclose(first, continuation_logprob(tiny_model, prefix, cont))
    assert np.isnan(first[1]), "an empty continuation has no log-probability"
    entries = list((tmp_path / "logprobs").glob("*.json"))
    stamp = {p: p.stat().st_mtime_ns for p in entries}
    np.testing.assert_array_equal(cached_logprob(tiny_model, "tiny", prefix, cont), first)
    assert {p: p.stat().st_mtime_ns for p in entries} == stamp, "both entries (the NaN one too) are reused"


def test_per_prompt_ablations_share_a_batch_and_match_separate_runs(tiny_model, setup):
    """Notebook 04 generates and scores its three conditions together: each row removes its own latent set."""
    from saif_utils.interventions import AblateLatents, stack_edits
    from saif_utils.likelihood import continuation_logprob

    ids, _ = setup
    sae = _toy_sae()
    selected, random = AblateLatents(sae, (3, 7, 11), "toy"), AblateLatents(sae, (5, 9, 20), "toy")
    rows = [ids[0], ids[1], ids[0]]
    stacked = stack_edits([selected, random, None])
    together = generate_steered(tiny_model, rows, LAYER, stacked, 8)
    alone = [generate_steered(tiny_model, [p], LAYER, e, 8)[0] for p, e in zip(rows, [selected, random, None])]
    assert together == alone
    assert together[0] != together[2], "the ablation must change the continuation for the test to mean anything"
    scored = continuation_logprob(tiny_model, rows, together, LAYER, stacked)
    for i, e in enumerate([selected, random, None]):
        assert scored[i] == pytest.approx(continuation_logprob(tiny_model, [rows[i]], [together[i]], LAYER, e)[0],
                                          abs=1e-4)
    with pytest.raises(TypeError, match="per-prompt edits must all be AddVector"):
        stack_edits([selected, AddVector(torch.ones(576))])


def test_scored_token_logprob_matches_the_models_log_softmax_with_its_logit_soft_cap():
    """Chunked LM head + gather − logsumexp equals the model's own full-vocabulary log-softmax, Gemma-2's final logit
    soft-cap included (a random two-layer Gemma-2 with a cap small enough to bite)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from saif_utils.logits import scored_token_logprob

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, final_logit_softcapping=0.5)
    gemma = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.inference_mode():
        out = gemma(ids, output_hidden_states=True)
        expected = out.logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].flatten()
        hidden = out.hidden_states[-1][:, :-1].reshape(-1, 64)  # the final norm's output
        got = scored_token_logprob(gemma, hidden, ids[:, 1:].flatten(), chunk=5)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        gemma.config.final_logit_softcapping = None
        assert (scored_token_logprob(gemma, hidden, ids[:, 1:].flatten()) - expected).abs().max() > 0.01, "the cap never bit"


@pytest.mark.parametrize("kind", ["topk", "topk-rescaled", "jumprelu", "standard", "shipped"])
def test_sae_weights_encode_and_reconstruct_as_sae_lens_does(kind):
    """The plain-tensor SAE that edits carry (to NDIF by value) computes sae-lens's encode and forward exactly."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    from saif_utils.interventions import SAEWeights
    from saif_utils.saes import load_local_sae

    torch.manual_seed(0)
    if kind == "shipped":
        sae = load_local_sae(REPO_ROOT / PROFILES["default"].shipped_sae_dir / "layer_15")
    else:
        cfg = dict(d_in=576, d_sae=256)
        sae = {"topk": lambda: TopKSAE(TopKSAEConfig(k=16, **cfg)),
               "topk-rescaled": lambda: TopKSAE(TopKSAEConfig(k=16, rescale_acts_by_decoder_norm=True, **cfg)),
               "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**cfg)),
               "standard": lambda: StandardSAE(StandardSAEConfig(**cfg))}[kind]()
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.1)
            sae.W_dec.mul_(torch.rand(256, 1) * 3)  # decoder rows of unequal norm: the rescaling must matter
            if kind == "jumprelu":
                sae.threshold.uniform_(0, 0.2)
    x = torch.randn(3, 5, 576) * 4
    weights = SAEWeights.of(sae)
    with torch.no_grad():
        expected = sae.encode(x)
        torch.testing.assert_close(weights.encode(x), expected, atol=1e-5, rtol=1e-5)
        assert (expected > 0).sum() > 0
        torch.testing.assert_close(weights.reconstruct(x), sae(x), atol=1e-4, rtol=1e-4)
        idx = torch.tensor([1, 4, 9])
        expected_part = sae.decode(expected * torch.isin(torch.arange(expected.shape[-1]), idx)) - sae.b_dec
        torch.testing.assert_close(weights.decode_latents(expected[..., idx], idx), expected_part, atol=1e-4, rtol=1e-4)
        # Columns only (what an ablation reads): bit-identical to the full code's columns, zeros included.
        full = weights.encode(x)
        cols = torch.cat([torch.nonzero(full[0, 0] > 0)[:3, 0], torch.tensor([0, 7, 255])])  # active and (mostly) not
        assert torch.equal(weights.encode_columns(x, cols), full[..., cols])


@pytest.mark.parametrize("span", ["both", "prompt", "generated"])
def test_rows_sharing_a_prompt_run_its_lower_blocks_once_with_the_same_tokens(tiny_model, setup, span):
    """Generation runs blocks 0 … layer once per distinct prompt of a batch and hands their output and KV cache to
    every row of it: the tokens equal a generation that runs every row through every block."""
    from saif_utils.generation import shared_prompt_pass
    from saif_utils.interventions import AblateLatents, stack_edits

    ids, vector = setup
    rows = [ids[0], ids[1], ids[0], ids[0], ids[1]]
    vectors = AddVector(torch.stack([vector, -vector, 0.5 * vector, 0 * vector, 0.7 * vector]))
    ablations = stack_edits([AblateLatents(_toy_sae(), (3, 7, 11), "toy"), None, None,
                             AblateLatents(_toy_sae(), (5, 9), "toy"), AblateLatents(_toy_sae(), (3,), "toy")])
    (batch,) = length_buckets(rows, 8, tiny_model.tokenizer.pad_token_id)
    shared = shared_prompt_pass(tiny_model, batch, LAYER)
    assert shared is not None and shared.below.shape[0] == len(rows) and len(shared.filled) == LAYER + 1
    for edit in (vectors, ablations):
        fast = generate_steered(tiny_model, rows, LAYER, edit, N_NEW, span=span)
        slow = generate_steered(tiny_model, rows, LAYER, edit, N_NEW, span=span, share_prompts=False)
        assert fast == slow
        assert len({tuple(t) for t in fast}) >= 3, "the rows' edits must change their continuations"
    (distinct,) = length_buckets(ids, 8, tiny_model.tokenizer.pad_token_id)
    assert shared_prompt_pass(tiny_model, distinct, LAYER) is None, "no prompt is shared: nothing to run once"


def test_rows_scoring_one_sequence_under_several_edits_share_their_lower_blocks(tiny_model, setup):
    """Teacher-forced scoring runs blocks 0 … layer once per distinct sequence of a batch: the log-probabilities
    equal, bit for bit, those of a pass that runs every row through every block."""
    import numpy as np

    from saif_utils.interventions import AblateLatents, stack_edits
    from saif_utils.likelihood import continuation_logprob, shared_block_output

    ids, vector = setup
    cont = tiny_model.tokenizer("Bonjour, le chat dort.")["input_ids"]
    rows, conts = [ids[0], ids[1], ids[0], ids[0]], [cont, cont[:3], cont, cont]
    sae = _toy_sae()
    for edit in (stack_edits([AblateLatents(sae, (3, 7, 11), "toy"), None, None, AblateLatents(sae, (5,), "toy")]),
                 AddVector(torch.stack([vector, -vector, 0 * vector, 0.5 * vector]))):
        fast = continuation_logprob(tiny_model, rows, conts, LAYER, edit)
        slow = continuation_logprob(tiny_model, rows, conts, LAYER, edit, share_rows=False)
        np.testing.assert_array_equal(fast, slow)
        assert len(set(fast[[0, 2, 3]].tolist())) == 3, "each edit must change the score for the test to mean anything"
    (batch,) = length_buckets([p + c for p, c in zip(rows, conts)], 8, tiny_model.tokenizer.pad_token_id)
    below = shared_block_output(tiny_model, batch.input_ids, batch.attention_mask, LAYER)
    assert below is not None and below.shape[0] == len(rows)
