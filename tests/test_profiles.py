import pytest

from saif_utils.profiles import PROFILES, check_layer, get_profile


def test_every_profile_has_layers_in_range():
    for profile in PROFILES.values():
        for layer in profile.sae_layers:
            assert 0 <= layer < profile.model.n_layers


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown profile='defualt'.*did you mean 'default'"):
        get_profile("defualt")


def test_layer_out_of_range_names_the_valid_range():
    with pytest.raises(ValueError, match=r"layer=30 is out of range .*30 layers.*0 … 29"):
        get_profile("default", sae_layers=[10, 30])
    with pytest.raises(ValueError, match="out of range"):
        check_layer(-1, PROFILES["default"].model)


def test_overrides_are_typed_and_validated():
    profile = get_profile("default", sae_layers=[10, 15], sae_k="32", batch_size=8.0)
    assert profile.sae_layers == (10, 15) and profile.sae_train.k == 32 and profile.batch_size == 8
    with pytest.raises(TypeError, match="override batch_size='many'"):
        get_profile("default", batch_size="many")
    with pytest.raises(ValueError, match="unknown override 'sae_widht'"):
        get_profile("default", sae_widht=10)
    with pytest.raises(ValueError, match=r"SAETrainConfig.k=5000 must lie in 1 … d_sae=2304"):
        get_profile("default", sae_k=5000)


def test_remote_needs_a_hub_model():
    assert get_profile("llama-3.1-8b", remote=True).remote
    with pytest.raises(ValueError, match="remote=True needs a model deployed on NDIF"):
        get_profile("default", remote=True)


def test_every_profiles_stage_defaults_build_valid_configs():
    """A typo in a profile's stage defaults must fail here, not an hour into a run."""
    from saif_utils.ablation import AblationConfig
    from saif_utils.discovery import DiscoveryConfig
    from saif_utils.profiles import stage_config
    from saif_utils.sweeps import SweepConfig

    stages = {"discovery": DiscoveryConfig, "ablation": AblationConfig, "steering": SweepConfig}
    for profile in PROFILES.values():
        assert set(profile.stage_defaults) <= set(stages), profile.name
        for stage, cls in stages.items():
            cfg = stage_config(cls, profile, stage)
            layers = getattr(cfg, "layers", None) or ()
            assert set(layers) <= set(profile.sae_layers), (profile.name, stage)
    assert stage_config(SweepConfig, PROFILES["full"], "steering").search == "grid"
    with pytest.raises(TypeError, match="must be a list"):
        stage_config(SweepConfig, PROFILES["default"], "steering", layers=15)
