import pytest
import torch

from saif_utils.models import (
    chat_prompt,
    dequantised_model_dir,
    gguf_path,
    length_buckets,
    load_hf,
    read_residual,
    read_residual_tokens,
    tokenize,
)

PROMPTS = ["Translate into French: The cat sleeps on the warm windowsill.", "Hi", "Résumez : 東京は日本の首都です。"]


@pytest.mark.slow
def test_gguf_cache_reload_gives_identical_logits(tiny_profile):
    from transformers import AutoModelForCausalLM

    spec = tiny_profile.model
    cached, tokenizer = load_hf(spec)
    src = gguf_path(spec)
    direct = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenize(tokenizer, [chat_prompt(tokenizer, PROMPTS[0])])[0]])
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, cached(ids).logits)
    assert (dequantised_model_dir(spec) / "saif_cache.json").is_file()


def test_chat_prompt_ends_in_generation_prompt(tiny_model):
    text = chat_prompt(tiny_model.tokenizer, "Hello")
    assert text.endswith("<|im_start|>assistant\n") and "Hello" in text


def test_length_buckets_left_pad_and_keep_every_row():
    seqs = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    batches = list(length_buckets(seqs, batch_size=2, pad_id=0))
    assert sorted(r for b in batches for r in b.rows) == [0, 1, 2, 3]
    for b in batches:
        for r, i in enumerate(b.rows):
            n = len(seqs[i])
            assert b.input_ids[r, -n:].tolist() == seqs[i] and b.attention_mask[r].sum() == n
            assert b.attention_mask[r, : b.input_ids.shape[1] - n].sum() == 0


def _hook_residual(hf_model, layer, input_ids, attention_mask):
    """Reference: the output of decoder block `layer` captured with a plain torch forward hook.

    Positions count real tokens only (as `generate` and nnsight do for left-padded batches).
    """
    store = {}
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    handle = hf_model.model.layers[layer].register_forward_hook(
        lambda mod, args, out: store.__setitem__("resid", out[0] if isinstance(out, tuple) else out))
    with torch.inference_mode():
        hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    handle.remove()
    return store["resid"]


def test_residual_matches_a_torch_hook(tiny_model):
    tok = tiny_model.tokenizer
    ids = tokenize(tok, [chat_prompt(tok, p) for p in PROMPTS])
    hf_model = tiny_model._module
    resid = read_residual(tiny_model, ids, [3, 6], positions="last", batch_size=8)
    per_token = read_residual_tokens(tiny_model, ids, [6], skip_first=1, batch_size=8)[6]
    # Same left-padded batch through a plain hook: must agree to 1e-5.
    (batch,) = length_buckets(ids, 8, tok.pad_token_id)
    for layer in (3, 6):
        ref = _hook_residual(hf_model, layer, batch.input_ids, batch.attention_mask)
        for r, i in enumerate(batch.rows):
            torch.testing.assert_close(resid[layer][i], ref[r, -1], atol=1e-5, rtol=1e-5)
    ref6 = _hook_residual(hf_model, 6, batch.input_ids, batch.attention_mask)
    by_row = {i: r for r, i in enumerate(batch.rows)}
    offset = 0
    for i, seq in enumerate(ids):
        n = len(seq) - 1
        torch.testing.assert_close(per_token[offset:offset + n], ref6[by_row[i], -n:], atol=1e-5, rtol=1e-5)
        # Unpadded, one sequence at a time: padding changes matmul shapes, so agreement is to float32 rounding only.
        alone = _hook_residual(hf_model, 6, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))[0]
        torch.testing.assert_close(per_token[offset:offset + n], alone[1:], atol=1e-4, rtol=1e-4)
        offset += n
    assert offset == per_token.shape[0]


def test_residual_positions_and_early_stop(tiny_model):
    tok = tiny_model.tokenizer
    ids = tokenize(tok, [chat_prompt(tok, p) for p in PROMPTS])
    first = read_residual(tiny_model, ids, [2], positions=[0, 0, 0])[2]
    last = read_residual(tiny_model, ids, [2], positions=[len(s) - 1 for s in ids])[2]
    torch.testing.assert_close(last, read_residual(tiny_model, ids, [2])[2])
    assert not torch.allclose(first, last)
    calls = []
    handle = tiny_model._module.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    read_residual(tiny_model, ids, [2])
    handle.remove()
    assert calls == [], "the forward pass must stop after the deepest requested layer"


def test_bad_positions_and_layers_fail_fast(tiny_model):
    import pytest

    ids = [[1, 2, 3]]
    with pytest.raises(ValueError, match="layer=30 is out of range"):
        read_residual(tiny_model, ids, [30])
    with pytest.raises(ValueError, match="position 5 outside sequence 0 of length 3"):
        read_residual(tiny_model, ids, [1], positions=[5])
    with pytest.raises(ValueError, match="token_ids is empty"):
        read_residual(tiny_model, [], [1])


def test_length_buckets_are_balanced():
    seqs = [[1] * (i % 7 + 1) for i in range(80)]
    sizes = [len(b.rows) for b in length_buckets(seqs, batch_size=64, pad_id=0)]
    assert sizes == [40, 40]


def test_shared_prefix_reading_matches_plain_reading(tiny_model):
    """Grouped prompts reuse their common prefix's KV cache; the residuals must equal a plain forward's."""
    tok = tiny_model.tokenizer
    content = "The lighthouse keeper counted ships through the long winter night."
    texts = [content, content + "\n\nTranslate this into French.", content + "\n\nSum it up briefly, please.",
             "Write JSON.\n\n" + content, "Use bullet points.\n\n" + content]
    ids = tokenize(tok, [chat_prompt(tok, t) for t in texts])
    groups = ["post", "post", "post", "pre", "pre"]
    # Positions: the last token, an early token (inside the common prefix: the group's prefix shrinks to it).
    positions = [-1, -1, 5, -1, -2]
    plain = read_residual(tiny_model, ids, [2, 6], positions, batch_size=2)
    shared = read_residual(tiny_model, ids, [2, 6], positions, batch_size=2, groups=groups)
    for layer in (2, 6):
        torch.testing.assert_close(shared[layer], plain[layer], atol=1e-4, rtol=1e-4)
    import pytest

    with pytest.raises(ValueError, match="group keys"):
        read_residual(tiny_model, ids, [2], groups=["a"])


@pytest.mark.slow
def test_a_corrupted_dequantised_cache_is_detected_and_rebuilt(tiny_model, tiny_profile, tmp_path, monkeypatch):
    import json
    import shutil

    from saif_utils.io import cache_root, sha256_file

    built = dequantised_model_dir(tiny_profile.model)
    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path))
    copy = cache_root() / "models" / built.name
    shutil.copytree(built, copy)
    weights = copy / "model.safetensors"
    recorded = json.loads((copy / "saif_cache.json").read_text())["weights"]["model.safetensors"]
    with open(weights, "r+b") as fh:  # flip bytes in the middle of a tensor: same size, wrong content
        fh.seek(weights.stat().st_size // 2)
        fh.write(b"\x00" * 64)
    assert sha256_file(weights) != recorded
    assert dequantised_model_dir(tiny_profile.model) == copy
    assert sha256_file(weights) == recorded, "the corrupted cache was rebuilt from the GGUF"


def _unreachable_tensors() -> list:
    """The tensors a full collection finds unreachable now (kept for inspection, then released)."""
    import gc

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_trim_heap_frees_the_tensors_a_stopped_trace_leaves_in_reference_cycles(tiny_model, monkeypatch):
    import gc

    from saif_utils import models

    monkeypatch.setattr(models._collect_trace_cycles, "every_s", 0.0)  # collect at every trim
    ids = [tokenize(tiny_model.tokenizer, [chat_prompt(tiny_model.tokenizer, p)])[0] for p in PROMPTS]
    gc.collect()
    gc.disable()  # only the collections the code itself runs
    try:
        batches = models.residual_batches(tiny_model, ids, [1], batch_size=len(ids))
        next(batches)  # one stopped trace, then `trim_heap` before the batch is yielded
        left = _unreachable_tensors()
    finally:
        gc.enable()
    assert left == [], f"{len(left)} tensors of a stopped trace were left for the cyclic collector"


def test_trim_heap_freezes_what_its_first_collection_keeps_and_still_frees_later_traces(tiny_model, monkeypatch):
    """The first collection freezes the long-lived objects (later full collections skip them), not the garbage it
    frees; the garbage of a trace stopped after that is still freed."""
    import gc

    from saif_utils import models

    monkeypatch.setattr(models, "_collect_trace_cycles", models._CycleCollector(every_s=0.0))
    ids = [tokenize(tiny_model.tokenizer, [chat_prompt(tiny_model.tokenizer, p)])[0] for p in PROMPTS[:2]]
    gc.unfreeze()  # as in a fresh kernel
    gc.disable()  # only the collections the code itself runs
    try:
        batches = models.residual_batches(tiny_model, ids, [1], batch_size=1)
        next(batches)  # a stopped trace, then the first trim: collect and freeze
        assert gc.get_freeze_count() > 10_000, "the first collection freezes the imported libraries and the model"
        next(batches)  # a trace stopped after the freeze, then a trim
        gc.unfreeze()  # what was frozen is inspected too: a trace's garbage frozen before it was collected is a leak
        left = _unreachable_tensors()
    finally:
        gc.enable()
    assert left == [], f"{len(left)} tensors of stopped traces were left for the cyclic collector or frozen"
