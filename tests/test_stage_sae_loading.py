"""The SAE loading stage measures every SAE family of a profile on the same held-out tokens, a row per (family, layer)."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd


def test_sae_metrics_has_a_row_per_family_and_layer(tmp_path, tiny_profile):
    from saif_utils.context import RunDir
    from saif_utils.profiles import SAEFamily, with_family
    from saif_utils.stages import sae_loading

    recipe = replace(tiny_profile.sae_train, n_train_tokens=1024, epochs=1)
    wide = SAEFamily("wide", (3, 6), replace(recipe, d_sae=1152, k=16), "no-such-dir/wide")
    narrow = SAEFamily("narrow", (3,), replace(recipe, d_sae=576, k=8), "no-such-dir/narrow")
    profile = with_family(replace(tiny_profile, sae_families=(narrow, wide)), "wide")

    result = sae_loading.run(profile, RunDir(tmp_path), sae_loading.SAELoadingConfig(n_ce_tokens=128))

    written = pd.read_csv(tmp_path / sae_loading.NAME / "sae_metrics.csv")
    pd.testing.assert_frame_equal(written, result.metrics, check_dtype=False)
    assert list(zip(written["family"], written["layer"])) == [("wide", 3), ("wide", 6), ("narrow", 3)], \
        "the family in use first, then every other family's layers"
    assert list(written["d_sae"]) == [1152, 1152, 576] and list(written["k"]) == [16, 16, 8]
    # Both families are scored on the very same held-out tokens and predictions.
    assert written["n_tokens"].nunique() == 1 and written["n_ce_predictions"].nunique() == 1
    assert written["ce_clean"].nunique() == 1
    assert sorted(result.saes) == [3, 6] and set(result.firing["layer"]) == {3, 6}, "downstream: the family in use"
    # One residual read and one clean CE pass serve both families: each family measured alone gives the same numbers.
    from saif_utils.models import load_model
    from saif_utils.saes import heldout_token_ids, profile_saes, sae_metrics_table

    model = load_model(profile)
    eval_ids = heldout_token_ids(model.tokenizer, profile)
    for name, position in (("wide", slice(0, 2)), ("narrow", slice(2, 3))):
        alone, _ = sae_metrics_table(model, profile, {name: profile_saes(model, with_family(profile, name))},
                                     eval_ids, n_ce_tokens=128)
        together = result.metrics.iloc[position].reset_index(drop=True)
        pd.testing.assert_frame_equal(alone.drop(columns="source"), together.drop(columns="source"))  # cache/trained
