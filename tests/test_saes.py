import numpy as np
import pytest
import torch

from saif_utils.profiles import PROFILES
from saif_utils.saes import (
    check_sae, load_local_sae, reconstruction_metrics, sae_layer, save_sae, validate_release,
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
    with pytest.raises(ValueError, match=r"SAE d_in=576 does not match the model's d_model=2304"):
        check_sae(sae, 6, 2304)
    with pytest.raises(ValueError, match=r"reads layer 6, but layer=10 was requested"):
        check_sae(sae, 10, 576)


def test_reconstruction_metrics_on_known_cases():
    sae = _random_topk_sae(d_sae=64, k=8)
    acts = np.random.default_rng(0).normal(size=(256, 576)).astype(np.float16)
    m = reconstruction_metrics(sae, acts, batch_size=100)
    assert m["n_tokens"] == 256 and m["l0"] <= 8 and 0 <= m["dead_frac"] <= 1
    # Reference explained variance computed directly.
    x = torch.from_numpy(acts).float()
    recon = sae.decode(sae.encode(x))
    expected = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["explained_variance"] == pytest.approx(expected.item(), rel=1e-5)
    assert m["firing_freq"].shape == (64,)
