import pytest

from saif_utils.profiles import PROFILES, check_layer, get_profile


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown profile='defualt'.*did you mean 'default'"):
        get_profile("defualt")


def test_layer_out_of_range_names_the_valid_range():
    with pytest.raises(ValueError, match=r"layer=30 is out of range .*30 layers.*0 … 29"):
        get_profile("default", sae_layers=[10, 30])
    with pytest.raises(ValueError, match="out of range"):
        check_layer(-1, PROFILES["default"].model)
    for not_a_layer in (True, 3.0, "3"):
        with pytest.raises(ValueError, match="out of range"):
            check_layer(not_a_layer, PROFILES["default"].model)


def test_overrides_are_typed_and_validated():
    profile = get_profile("default", sae_layers=[10, 15], sae_k="32", batch_size=8.0)
    assert profile.sae_layers == (10, 15) and profile.sae_train.k == 32 and profile.batch_size == 8
    with pytest.raises(TypeError, match="override batch_size='many'"):
        get_profile("default", batch_size="many")
    for not_an_int in (8.5, "8.5", True):  # never truncated to 8, never read as 1
        with pytest.raises(TypeError, match=f"override batch_size={not_an_int!r}"):
            get_profile("default", batch_size=not_an_int)
    with pytest.raises(ValueError, match="unknown override 'sae_widht'"):
        get_profile("default", sae_widht=10)
    with pytest.raises(ValueError, match=r"SAETrainConfig.k=5000 must lie in 1 … d_sae=4608"):
        get_profile("default", sae_k=5000)


def test_every_profile_can_go_remote():
    assert all(get_profile(name, remote=True).remote for name in ("tiny", "default", "llama-3.1-8b"))


def test_a_remote_handle_keeps_the_key_in_memory_only_and_fails_fast_without_a_server(tmp_path, monkeypatch):
    """nnsight's `CONFIG.set_default_api_key` writes the key to its user config file; the handle must not. With no
    server at NDIF_HOST the handle fails at once, naming the host and how to start one."""
    import socket

    from nnsight import CONFIG

    from saif_utils.models import remote_model

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{probe.getsockname()[1]}"
    secret, config_file = "ndif-dummy-key-7c1d0e", tmp_path / "nnsight" / "config.yaml"
    monkeypatch.setenv("NNSIGHT_CONFIG", str(config_file))
    monkeypatch.setenv("NDIF_HOST", host)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    spec = get_profile("tiny").model
    with pytest.raises(OSError, match="needs the NDIF_API_KEY environment variable"):
        remote_model(spec)
    monkeypatch.setenv("NDIF_API_KEY", secret)
    monkeypatch.setattr(CONFIG.API, "APIKEY", CONFIG.API.APIKEY)  # restored after the test
    monkeypatch.setattr(CONFIG.API, "HOST", CONFIG.API.HOST)
    with pytest.raises(ConnectionError, match=f"no NDIF server answers at {host} .*`make ndif-up`"):
        remote_model(spec)
    assert CONFIG.API.APIKEY == secret and CONFIG.API.HOST == host
    assert not config_file.exists(), "the key was persisted to nnsight's config file"


def test_every_profiles_stage_defaults_build_valid_configs():
    """A typo in a profile's stage defaults must fail here, not an hour into a run."""
    from saif_utils.profiles import stage_config
    from saif_utils.stages.ablation import AblationConfig
    from saif_utils.stages.discovery import DiscoveryConfig
    from saif_utils.stages.proximity import ProximityConfig
    from saif_utils.stages.sae_loading import SAELoadingConfig
    from saif_utils.stages.steering import SweepConfig

    configs = (SAELoadingConfig, DiscoveryConfig, ProximityConfig, AblationConfig, SweepConfig)
    for profile in PROFILES.values():
        assert set(profile.stage_defaults) <= {cls.profile_key for cls in configs}, profile.name
        for cls in configs:
            cfg = stage_config(cls, profile)
            layers = getattr(cfg, "layers", None) or ()
            assert set(layers) <= set(profile.sae_layers), (profile.name, cls.__name__)
    assert stage_config(SweepConfig, PROFILES["full"]).search == "grid"


def test_stage_config_reads_a_parameters_namespace():
    from saif_utils.profiles import stage_config
    from saif_utils.stages.steering import SweepConfig

    # A notebook passes its globals(): fields are taken (None keeps the profile's default), other names ignored.
    namespace = {"profile": "tiny", "output_dir": None, "k_grid": [1, 2], "n_val": None, "seed": 3, "pd": object()}
    cfg = stage_config(SweepConfig, PROFILES["tiny"], namespace)
    assert cfg.k_grid == (1, 2) and cfg.seed == 3 and cfg.n_val == PROFILES["tiny"].stage_defaults["steering"]["n_val"]
    assert stage_config(SweepConfig, PROFILES["tiny"], namespace, seed=5).seed == 5  # explicit overrides win
    with pytest.raises(ValueError, match=r"unknown SweepConfig field\(s\) \['k_gird'\]"):
        stage_config(SweepConfig, PROFILES["default"], k_gird=(1,))
    with pytest.raises(TypeError, match="must be a list"):
        stage_config(SweepConfig, PROFILES["default"], layers=15)
    with pytest.raises(TypeError, match="override n_val='many'"):
        stage_config(SweepConfig, PROFILES["default"], {"n_val": "many"})


def test_sae_family_is_one_parameter_or_profile_away():
    from saif_utils.profiles import with_family

    default, narrow = get_profile("default"), get_profile("default", sae_family="4x")
    assert default.sae_family == "8x" and default.sae_train.d_sae == 8 * default.model.d_model
    assert default.sae_train.k == 32 and default.sae_layers == (10, 15, 20, 25, 29)
    assert narrow.sae_family == "4x" and narrow.sae_train.d_sae == 4 * narrow.model.d_model
    assert narrow.sae_layers == get_profile("default-4x").sae_layers == (10, 15, 20, 29)
    assert default.shipped_sae_dir.endswith("/8x") and narrow.shipped_sae_dir.endswith("/4x")
    assert get_profile("default", sae_family="4x", sae_layers=[10]).sae_layers == (10,), "overrides apply on top"
    with pytest.raises(ValueError, match="no SAE family '16x'.*allowed: \\['4x', '8x'\\]"):
        with_family(default, "16x")
    with pytest.raises(ValueError, match="no SAE family"):
        get_profile("tiny", sae_family="8x")
