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
