import pytest
import torch

from saif_utils.models import chat_prompt, length_buckets, tokenize
from saif_utils.steering import direction_from_latents, generate_steered, scale_direction

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
                                    max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    width = batch.input_ids.shape[1]
    return {i: out[r, width:].tolist() for r, i in enumerate(batch.rows)}, handle


def test_steering_reaches_every_generated_token(tiny_model, setup):
    ids, vector = setup
    steered = generate_steered(tiny_model, ids, LAYER, vector, N_NEW, span="both")
    reference, _ = _hook_generate(tiny_model._module, tiny_model.tokenizer, ids, vector)
    assert [len(s) for s in steered] == [N_NEW, N_NEW]
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
