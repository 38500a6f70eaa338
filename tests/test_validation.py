"""The human-read sample: its schema, its coverage, and the precision / recall table recomputed from it."""
import json

import pandas as pd
import pytest

from saif_utils.data import AGREEMENT_PATH, DataError, load_labels
from saif_utils.validation import LABELLED_TASKS, agreement_table


@pytest.fixture(scope="module")
def labels():
    return load_labels()


@pytest.fixture(scope="module")
def agreement(labels, tmp_path_factory):
    """The agreement table recomputed from the labels once for the module (the judges read every response), in a
    verdict cache of its own."""
    from saif_utils.pipeline import scoped_environ

    with scoped_environ({"SAIF_CACHE_DIR": str(tmp_path_factory.mktemp("validation-cache"))}):
        return agreement_table(labels)


def test_sample_is_large_stratified_and_fully_labelled(labels):
    assert len(labels) >= 200
    counts = labels.groupby(["task", "method"]).size()
    assert labels["task"].nunique() >= 5 and labels["method"].nunique() >= 6 and counts.min() >= 4, counts
    assert set(labels["fold"]) == {"dev", "heldout"}
    labelled = labels["task"].isin(LABELLED_TASKS)
    assert labels.loc[labelled, "follows"].notna().all() and labels.loc[~labelled, "follows"].isna().all()
    assert 0.1 < labels["degenerate"].mean() < 0.9, "a sample with one class cannot measure a detector"


def test_committed_agreement_table_is_what_the_labels_give(agreement):
    recomputed = agreement
    committed = pd.read_csv(AGREEMENT_PATH)
    pd.testing.assert_frame_equal(recomputed, committed, check_dtype=False, atol=1e-9)


def test_malformed_label_fails_with_file_and_line(tmp_path):
    row = {"response_id": "a1", "task": "json", "method": "saif", "split": "test", "passage_id": "p1", "source": "s",
           "response": "", "degenerate": "yes", "follows": None, "fold": "dev"}
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"labels.jsonl:1: field 'degenerate' must be true or false, got 'yes'"):
        load_labels(path)
    path.write_text(json.dumps(row | {"degenerate": True}) + "\n" + json.dumps(row | {"degenerate": False}) + "\n")
    with pytest.raises(DataError, match=r"response_id\(s\) \['a1'\] appear more than once"):
        load_labels(path)


def test_judges_agree_with_the_readers_on_the_heldout_fold(agreement):
    # Measured: detector 0.96 / 0.90 (43 of 48; the target is 0.9 each), translate_fr loose 0.90 / 0.90, keyword
    # loose 1.00 / 1.00. The floor below leaves room for one relabelled close call, not for a broken judge.
    table = agreement.set_index(["judge", "fold"])
    for judge in ("degeneracy detector → degenerate", "translate_fr loose → follows", "keyword:ocean loose → follows"):
        row = table.loc[(judge, "heldout")]
        assert row["precision"] >= 0.85 and row["recall"] >= 0.85, (judge, row["precision"], row["recall"])
    before = table.loc[("word 3-gram loop rule (before) → degenerate", "heldout")]
    assert before["recall"] < 0.5, "the old loop rule missed most degenerate responses; the labels should show it"
