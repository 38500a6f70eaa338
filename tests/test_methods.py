"""The steering-method registry: one interface, registered by name, and every registered method runs through the
sweep — including one added by a test, which is all a new method needs."""
import shutil

import pytest

from saif_utils.methods import METHODS, SteeringMethod, VectorSource, get_method, register


def test_registry_flags_and_lookup():
    assert list(METHODS) == ["no_instruction", "prompting", "saif", "saif_output", "diff_in_means", "random_latents",
                             "saif_plus_prompt", "saif_calibrated", "saif_calibrated_kl", "optimized_dense"]
    assert [m for m, method in METHODS.items() if method.ranks] == ["saif_output"]
    with pytest.raises(TypeError, match="method 'saif' ranks nothing"):
        get_method("saif").rank(None, "json", 10, "post")
    assert {m: (method.dense, method.objective) for m, method in METHODS.items() if method.fits} == {
        "saif_calibrated": (False, "nll"), "saif_calibrated_kl": (False, "kl"), "optimized_dense": (True, "nll")}
    with pytest.raises(TypeError, match="method 'saif' fits nothing"):
        get_method("saif").fit(None, None)
    with pytest.raises(ValueError, match="no fitted vector for saif_calibrated on json"):
        from saif_utils.methods import Condition
        get_method("saif_calibrated").vector(VectorSource({}, None, {}, {}), Condition("json", "saif_calibrated", 10))
    assert [m for m, method in METHODS.items() if method.tuned] == ["saif", "saif_output", "diff_in_means"]
    assert {m for m, method in METHODS.items() if method.instructed} == {"prompting", "saif_plus_prompt"}
    assert not get_method("no_instruction").steers and get_method("random_latents").steers
    with pytest.raises(ValueError, match=r"method='steer_harder'; allowed: \['no_instruction'"):
        get_method("steer_harder")
    with pytest.raises(ValueError, match="already registered"):
        register(type("Again", (SteeringMethod,), {"name": "saif"}))
    with pytest.raises(ValueError, match="borrows from 'prompting', which is not a registered tuned method"):
        register(type("Bad", (SteeringMethod,), {"name": "bad", "borrows": "prompting"}))
    with pytest.raises(TypeError, match="adds no vector"):
        get_method("prompting").vector(VectorSource({}, None, {}, {}), None)


def test_every_registered_method_runs_through_the_sweep(tiny_run, tmp_path):
    """A new method is one class and its registration: here SAIF's vector pointing the other way."""
    from saif_utils.context import open_run
    from saif_utils.profiles import stage_config
    from saif_utils.stages import steering

    @register
    class NegatedSaif(SteeringMethod):
        name = "negated_saif"
        uses_latents = True
        borrows = "saif"

        def vector(self, source, cond, draw=0):
            vector, n_latents = source.latent_vector(cond)
            return -vector, n_latents

    try:
        for stage in ("01_sae_loading", "02_feature_discovery"):
            shutil.copytree(tiny_run[0] / stage, tmp_path / stage)
        ctx = open_run("tiny", tmp_path)
        cfg = stage_config(steering.SweepConfig, ctx.profile, tasks=("summarize",), methods=tuple(METHODS), layers=(6,),
                           k_grid=(1, 5), k_start=5, n_val=1, n_test=2, max_new_tokens=6)
        result = steering.run(ctx, cfg)
    finally:
        METHODS.pop("negated_saif")
    results = result.results.set_index("method")
    assert list(results.index) == [*METHODS, "negated_saif"] and (results["n"] == 2).all()
    config = ["layer", "k", "alpha", "position"]
    assert results.loc["negated_saif", config].tolist() == results.loc["saif", config].tolist()
    test = result.generations[result.generations["split"] == "test"].set_index(["method", "passage_id"])["response"]
    assert (test["negated_saif"] != test["saif"]).any(), "the negated vector changed nothing"
