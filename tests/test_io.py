import json

import pandas as pd

from saif_utils.io import cached_frames


def test_cached_frames_reuse_rebuild_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"scores": pd.DataFrame({"latent": [3, 1], "score": [0.5, 0.25]}), "empty": pd.DataFrame({"a": []})}

    first = cached_frames("stage", {"model": "m", "k": 1}, compute)
    again = cached_frames("stage", {"model": "m", "k": 1}, compute)
    assert len(calls) == 1, "the second call reads the cache"
    pd.testing.assert_frame_equal(first["scores"], again["scores"])
    (part,) = (tmp_path / "stage").glob("*/scores.parquet")
    part.write_bytes(b"not parquet")  # a corrupted entry is rebuilt, never trusted
    pd.testing.assert_frame_equal(cached_frames("stage", {"model": "m", "k": 1}, compute)["scores"], first["scores"])
    assert len(calls) == 2
    cached_frames("stage", {"model": "m", "k": 2}, compute)
    assert len(calls) == 3, "a different key is a different entry"


def test_cached_json_items_compute_each_key_once(tmp_path, monkeypatch):
    from saif_utils.io import cached_json_items

    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path))
    asked = []

    def compute(missing):
        asked.append(list(missing))
        return [{"v": i * 10} for i in missing]

    keys = [{"k": "a"}, {"k": "b"}, {"k": "a"}]
    assert cached_json_items("items", keys, compute, lambda e: e["v"]) == [0, 10, 0]
    assert asked == [[0, 1]], "the repeated key is computed once and shared"
    assert cached_json_items("items", keys, compute, lambda e: e["v"]) == [0, 10, 0] and len(asked) == 1


def test_sha256_file_memo_reuses_an_unchanged_file_and_rehashes_any_write(tmp_path, monkeypatch):
    import hashlib

    from saif_utils.io import sha256_file_memo

    monkeypatch.setenv("SAIF_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 4096)
    assert sha256_file_memo(weights) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert not (tmp_path / "cache" / "file_hashes").exists(), "a file written just now is hashed, not remembered"

    digest = sha256_file_memo(weights, settle_seconds=0)
    (memo,) = (tmp_path / "cache" / "file_hashes").glob("*.json")
    record = json.loads(memo.read_text())
    record["sha256"] = "remembered"  # proves the next call reads the memo instead of hashing
    memo.write_text(json.dumps(record))
    assert sha256_file_memo(weights) == "remembered"
    with open(weights, "r+b") as fh:  # same size, different bytes: the stamp moves, so the file is hashed again
        fh.seek(100)
        fh.write(b"b")
    assert sha256_file_memo(weights) != digest
    assert sha256_file_memo(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
