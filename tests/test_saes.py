import numpy as np
import pytest
import torch

from saif_utils.profiles import PROFILES
from saif_utils.saes import (
    check_sae,
    load_local_sae,
    reconstruction_metrics,
    sae_layer,
    save_sae,
    validate_release,
)


def _random_topk_sae(d_in=576, d_sae=64, k=8, layer=6):
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    return sae


def test_save_load_round_trip(tmp_path):
    sae = _random_topk_sae()
    x = torch.randn(32, 576)
    save_sae(sae, tmp_path / "sae", record={"note": "round trip"})
    loaded = load_local_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and sae_layer(loaded) == 6
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    assert (tmp_path / "sae" / "training.json").is_file()


def test_fp16_shipping_keeps_the_sae_close(tmp_path):
    sae = _random_topk_sae()
    save_sae(sae, tmp_path / "half", dtype=torch.float16)
    assert sae.W_enc.dtype == torch.float32, "saving in fp16 must not change the in-memory SAE"
    loaded = load_local_sae(tmp_path / "half")
    assert loaded.W_enc.dtype == torch.float32
    torch.testing.assert_close(loaded.W_dec, sae.W_dec, atol=1e-3, rtol=1e-3)


def test_unknown_release_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown SAE release 'gemma-scope-2b-pt-res-canonica'.*gemma-scope-2b-pt-res-canonical"):
        validate_release("gemma-scope-2b-pt-res-canonica", "layer_25/width_16k/canonical")
    with pytest.raises(ValueError, match=r"unknown sae_id 'layer_25/width_16k/canonicl'.*layer_25/width_16k/canonical"):
        validate_release("gemma-scope-2b-pt-res-canonical", "layer_25/width_16k/canonicl")


@pytest.mark.parametrize("name", [n for n, p in PROFILES.items() if not p.trains_saes])
def test_real_scale_profiles_resolve_in_the_sae_lens_registry(name):
    profile = PROFILES[name]
    for layer in profile.sae_layers:
        validate_release(profile.sae_release, profile.sae_id(layer))
    assert profile.model.n_layers - 1 in profile.sae_layers, "the final layer must be studied"


def test_check_sae_rejects_width_and_layer_mismatches():
    sae = _random_topk_sae(d_in=576, layer=6)
    check_sae(sae, 6, 576)
    with pytest.raises(ValueError, match=r"SAE d_in=576 \(layer 6\) does not match the model's d_model=2304"):
        check_sae(sae, 6, 2304)
    with pytest.raises(ValueError, match=r"reads layer 6, but layer=10 was requested"):
        check_sae(sae, 10, 576)


def _signed_identity_sae(decoder_scale: float):
    """A TopK SAE on 4 dimensions whose 8 latents are relu(x) and relu(−x): decoding them with `decoder_scale`
    reconstructs exactly `decoder_scale · x`."""
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=4, d_sae=8, k=8))
    eye = torch.eye(4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(decoder_scale * torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("decoder_scale, offset, expected", [
    (1.0, 0.0, 1.0),    # perfect reconstruction
    (0.5, 0.0, 0.75),   # half of every vector: 1 − 0.5²
    (0.0, 0.0, 0.0),    # nothing reconstructed, centred data
    (0.0, 0.5, -1.0),   # nothing reconstructed, mean (0.5, 0.5, 0.5, 0.5): the error includes the mean's energy
])
def test_explained_variance_on_known_reconstructions(decoder_scale, offset, expected):
    # The rows ±e_1 … ±e_4 (+ offset): variance around the mean sums to 8; the offset adds 8 · |offset|² = 8 of energy.
    acts = np.concatenate([np.eye(4), -np.eye(4)]).astype(np.float32) + offset
    m = reconstruction_metrics(_signed_identity_sae(decoder_scale), acts, batch_size=3)
    assert m["explained_variance"] == pytest.approx(expected, abs=1e-6)
    assert m["n_tokens"] == 8
    if offset == 0:  # each row has one non-zero coordinate, so exactly one of the 8 latents fires on it
        assert m["l0"] == 1.0 and m["dead_frac"] == 0.0 and m["firing_freq"].tolist() == [0.125] * 8
    # Split into texts of 3, 1 and 4 tokens, the per-text sums add up to the set's and give the same ratio.
    per_text = reconstruction_metrics(_signed_identity_sae(decoder_scale), acts, batch_size=3, lengths=[3, 1, 4])["per_text"]
    assert per_text["n"].tolist() == [3, 1, 4]
    assert per_text["deviation"].tolist() == pytest.approx([3, 1, 4])  # every row lies at distance 1 from the mean
    assert 1 - per_text["sq_err"].sum() / per_text["deviation"].sum() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="lengths sum to 7 tokens but acts has 8 rows"):
        reconstruction_metrics(_signed_identity_sae(decoder_scale), acts, lengths=[3, 4])


@pytest.mark.parametrize("family", [f.name for f in PROFILES["default"].sae_families])
def test_shipped_saes_match_their_family_recipe(tiny_model, family):
    """An edit to a family's SAE recipe, the corpus or the model silently invalidates data/saes: fail here."""
    from saif_utils.profiles import with_family
    from saif_utils.saes import recipe_matches, sae_corpus, shipped_sae_path, training_recipe

    profile = with_family(PROFILES["default"], family)
    corpus = sae_corpus(tiny_model.tokenizer, profile.sae_train)
    for layer in profile.sae_layers:
        path = shipped_sae_path(profile, layer)
        assert (path / "sae_weights.safetensors").is_file(), path
        assert recipe_matches(path, training_recipe(profile, layer, corpus.manifest)), (
            f"{path} was not trained with the {family} family's recipe; retrain it (make ship-saes) or restore the recipe")


@pytest.mark.slow
def test_v2_corpus_keeps_long_texts_and_reads_the_extra_prompts(tiny_model):
    """v2 cuts long texts into windows instead of truncating them and adds the extra instruction prompts."""
    from saif_utils.corpus import build_token_corpus

    v1 = build_token_corpus(tiny_model.tokenizer, 60_000, 20_000, 64, version="v1")
    v2 = build_token_corpus(tiny_model.tokenizer, 60_000, 20_000, 64, version="v2")
    assert max(map(len, v1.train_ids)) == max(map(len, v2.train_ids)) == 64
    assert v2.manifest["train"]["n_texts"] > v2.manifest["train"]["n_docs"], "no document was cut into windows"
    assert v1.manifest["train"]["n_texts"] == v1.manifest["train"]["n_docs"]
    assert {s["path"] for s in v2.manifest["sources"]} > {s["path"] for s in v1.manifest["sources"]}
    # Documents never straddle the splits, but boilerplate windows (a chat template's system turn) recur across
    # documents, so the splits can share identical texts; heldout_token_ids removes those (test below).
    with pytest.raises(ValueError, match="unknown SAE corpus version"):
        build_token_corpus(tiny_model.tokenizer, 1000, 100, 64, version="v3")


@pytest.mark.slow
def test_token_corpus_is_read_back_until_its_tokenizer_sources_or_arguments_change(tiny_model, monkeypatch, tmp_path):
    """A rerun reads the cached corpus back (the same ids and manifest, nothing rebuilt), also from a copy of a source
    file elsewhere; another tokenizer, an edited source file or another argument builds it anew."""
    import copy
    import shutil

    from saif_utils import corpus

    tok = tiny_model.tokenizer
    built = corpus.token_corpus(tok, 20_000, 5_000, 64)

    def rebuild(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(corpus, "build_token_corpus", rebuild)
    read = corpus.token_corpus(tok, 20_000, 5_000, 64)
    assert (read.train_ids, read.eval_ids, read.manifest) == (built.train_ids, built.eval_ids, built.manifest)

    moved = tmp_path / "data" / "sae_corpus" / corpus.INSTRUCTION_PROMPTS.name
    moved.parent.mkdir(parents=True)
    shutil.copy(corpus.INSTRUCTION_PROMPTS, moved)
    monkeypatch.setattr(corpus, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(corpus, "INSTRUCTION_PROMPTS", moved)
    assert corpus.token_corpus(tok, 20_000, 5_000, 64).train_ids == built.train_ids

    other_template, other_truncation = copy.deepcopy(tok), copy.deepcopy(tok)
    other_template.chat_template = tok.chat_template.replace("You are", "You were")
    other_truncation.truncation_side = "left"
    changes = {"context size": lambda: corpus.token_corpus(tok, 20_000, 5_000, 32),
               "seed": lambda: corpus.token_corpus(tok, 20_000, 5_000, 64, seed=1),
               "chat template": lambda: corpus.token_corpus(other_template, 20_000, 5_000, 64),
               "truncation side": lambda: corpus.token_corpus(other_truncation, 20_000, 5_000, 64)}
    for change, call in changes.items():
        with pytest.raises(AssertionError, match="rebuilt"):
            call()
            pytest.fail(f"a corpus built with another {change} was read from the cache")
    with moved.open("a", encoding="utf-8") as fh:
        fh.write('{"text": "One more prompt."}\n')
    with pytest.raises(AssertionError, match="rebuilt"):
        corpus.token_corpus(tok, 20_000, 5_000, 64)


@pytest.mark.slow
def test_v2_windows_begin_like_a_prompt_and_hold_no_attention_sink(tiny_model):
    """A window cut from the middle of a long text repeats its document's chat-template opening: without it the model
    turns the window's first content tokens into attention sinks (~150× the median residual norm) that would
    dominate an SAE's loss; behind the opening, every token the SAE reads has an ordinary norm."""
    from saif_utils.corpus import CORPUS_SKIP_FIRST, _windows, build_documents
    from saif_utils.models import read_residual_tokens, tokenize

    tok = tiny_model.tokenizer
    n_head = CORPUS_SKIP_FIRST["v2"]
    docs, _ = build_documents(tok, version="v2")
    long_texts = [ids for ids in tokenize(tok, [d.text for d in docs[:1500]]) if len(ids) > 256][:40]
    windows = [w for ids in long_texts for w in _windows(ids, 128, n_head)[1:]][:32]
    assert all(w[:n_head] == long_texts[0][:n_head] for w in windows)
    assert tok.convert_ids_to_tokens(windows[0][:n_head]) == ["<|im_start|>", "system", "Ċ"]
    bare = [w[n_head:] for w in windows]  # the same windows as a plain cut (the old v2) would give them

    def norm_ratio(texts, skip_first):  # largest over median residual norm at a middle layer (sinks live on there)
        norms = read_residual_tokens(tiny_model, texts, [15], skip_first=skip_first, batch_size=16)[15].float().norm(dim=-1)
        return (norms.max() / norms.median()).item()

    assert norm_ratio(windows, n_head) < 2, "a token the SAE trains on has an attention sink's norm"
    assert norm_ratio(bare, 1) > 20, "the plain cut no longer makes sinks: this test has lost its point"


@pytest.mark.slow
def test_heldout_texts_are_unseen_by_every_family(tiny_model):
    """The side-by-side metrics read texts that no family trained on (the 8x eval split minus the 4x train split)."""
    from saif_utils.profiles import with_family
    from saif_utils.saes import heldout_token_ids, sae_corpus

    profile = with_family(PROFILES["default"], "8x")
    held_out = set(map(tuple, heldout_token_ids(tiny_model.tokenizer, profile)))
    assert len(held_out) > 100
    start = tiny_model.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(ids[0] == start for ids in held_out), "a held-out text does not begin like a chat prompt"
    for family in profile.sae_families:
        assert not held_out & set(map(tuple, sae_corpus(tiny_model.tokenizer, family.sae_train).train_ids)), family.name


def test_spliced_cross_entropy_against_a_plain_forward(tiny_model):
    """Clean CE equals the model's own full-vocabulary CE over the scored tokens; splicing in an exact reconstruction
    (the identity) changes nothing; zeroing the residual costs nats."""
    from saif_utils.models import chat_prompt, tokenize
    from saif_utils.saes import spliced_cross_entropy

    tok = tiny_model.tokenizer
    ids = tokenize(tok, [chat_prompt(tok, "Name a colour."), chat_prompt(tok, "Bees dance to show where flowers are.")])
    got = spliced_cross_entropy(tiny_model, {3: torch.nn.Identity()}, ids, batch_size=2, skip_first=1)[3]
    nll, n = 0.0, 0
    for row in ids:
        with torch.inference_mode():
            lp = tiny_model._module(torch.tensor([row])).logits[0, 1:-1].float().log_softmax(-1)  # predictions after the sink
        nll -= lp.gather(-1, torch.tensor(row[2:])[:, None]).sum().item()
        n += len(row) - 2
    assert got["n_predictions"] == n
    # Per-text sums: each text's own predictions, in the order the texts were given (batches sort them by length).
    assert got["per_text"]["n"].tolist() == [len(row) - 2 for row in ids]
    for i, row in enumerate(ids):
        with torch.inference_mode():
            lp = tiny_model._module(torch.tensor([row])).logits[0, 1:-1].float().log_softmax(-1)
        assert got["per_text"]["ce_clean"][i] == pytest.approx(-lp.gather(-1, torch.tensor(row[2:])[:, None]).sum().item(),
                                                               rel=1e-4)
    assert got["ce_clean"] == pytest.approx(nll / n, abs=1e-4)
    assert got["ce_spliced"] == pytest.approx(got["ce_clean"], abs=1e-5) and abs(got["kl"]) < 1e-5
    assert got["ce_zero"] > got["ce_clean"] + 1


def test_spliced_and_zeroed_passes_match_a_hooked_forward(tiny_model):
    """An edited pass starts from the clean pass's block output and two SAEs at one layer share its zero ablation: each
    text's spliced and zero-ablated CE still equal a plain forward whose block output is replaced by a hook."""
    from saif_utils.models import chat_prompt, tokenize
    from saif_utils.saes import spliced_cross_entropy

    tok = tiny_model.tokenizer
    ids = tokenize(tok, [chat_prompt(tok, "Name a colour."), chat_prompt(tok, "Bees dance to show where flowers are.")])
    saes = {"half": lambda x: 0.5 * x, "flip": lambda x: -x, "deep": lambda x: 0.5 * x}
    layers = {"half": 3, "flip": 3, "deep": 5}
    got = spliced_cross_entropy(tiny_model, saes, ids, batch_size=2, skip_first=1, layers=layers)

    def hooked_ce(row: list[int], layer: int, edit) -> float:
        def hook(module, args, output):
            resid = output[0] if isinstance(output, tuple) else output
            edited = resid.clone()
            edited[:, 1:] = edit(resid[:, 1:])  # the splice skips the first token, as `skip_first=1` does
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        handle = tiny_model._module.model.layers[layer].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                lp = tiny_model._module(torch.tensor([row])).logits[0, 1:-1].float().log_softmax(-1)
        finally:
            handle.remove()
        return -lp.gather(-1, torch.tensor(row[2:])[:, None]).sum().item()

    for label, edit in saes.items():
        for i, row in enumerate(ids):
            assert got[label]["per_text"]["ce_spliced"][i] == pytest.approx(hooked_ce(row, layers[label], edit), rel=1e-4)
            assert got[label]["per_text"]["ce_zero"][i] == pytest.approx(
                hooked_ce(row, layers[label], torch.zeros_like), rel=1e-4)
    assert got["half"]["ce_zero"] == got["flip"]["ce_zero"] != got["deep"]["ce_zero"]
