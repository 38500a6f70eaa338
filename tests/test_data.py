import json

import pytest

from saif_utils.data import (
    DataError,
    build_prompts,
    join_content,
    load_passages,
    load_tasks,
    load_variants,
    token_positions,
)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def test_shipped_data_meets_the_schema_and_sizes():
    tasks = load_tasks()
    variants = load_variants(tasks=tasks)
    passages = load_passages()
    for task in ("translate_fr", "summarize", "keyword"):
        base = variants[variants["base_task"] == task].drop_duplicates("variant_id")
        assert (base["kind"] == "paraphrase").sum() >= 12, task
        assert base.loc[base["kind"] == "translation", "language"].nunique() >= 5, task
    assert {"keyword:ocean", "keyword:music"} <= set(variants["task"])
    assert variants["variant_id"].is_unique, "keyword sub-tasks need their own variant ids"
    assert len(passages) >= 190 and (passages["split"] == "test").sum() >= 90
    assert passages.groupby("passage_id")["split"].nunique().max() == 1


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = {"passage_id": "a", "text": "One.", "split": "train"}
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_passages(_write(tmp_path / "bad.jsonl", [good, '{"passage_id": "b", "text": ']))
    with pytest.raises(DataError, match=r"split\.jsonl:1: field 'split' is 'dev'; allowed: \['train', 'val', 'test'\]"):
        load_passages(_write(tmp_path / "split.jsonl", [good | {"split": "dev"}]))
    with pytest.raises(DataError, match=r"missing\.jsonl:1: missing field\(s\) \['text'\]"):
        load_passages(_write(tmp_path / "missing.jsonl", [{"passage_id": "a", "split": "train"}]))
    with pytest.raises(DataError, match=r"empty\.jsonl: the file holds no records"):
        load_passages(_write(tmp_path / "empty.jsonl", []))


def test_a_passage_in_two_splits_is_rejected(tmp_path):
    rows = [{"passage_id": "a", "text": "The cat sleeps.", "split": "train"},
            {"passage_id": "b", "text": "The  cat sleeps.", "split": "test"}]
    with pytest.raises(DataError, match=r"two\.jsonl:2: passage 'b' \(text\) appears in more than one split: train"):
        load_passages(_write(tmp_path / "two.jsonl", rows))


def test_variant_checks(tmp_path):
    tasks = load_tasks()
    row = {"task": "translate_fr", "variant_id": "x", "language": "en", "kind": "paraphrase", "text": "Go French."}
    with pytest.raises(DataError, match=r"v\.jsonl:2: variant_id 'x' already used at .*v\.jsonl:1"):
        load_variants(_write(tmp_path / "v.jsonl", [row, row]), tasks)
    with pytest.raises(DataError, match=r"u\.jsonl:1: task 'translate_xx' is not defined"):
        load_variants(_write(tmp_path / "u.jsonl", [row | {"task": "translate_xx"}]), tasks)
    with pytest.raises(DataError, match=r"k\.jsonl:1: field 'kind' is 'rephrase'"):
        load_variants(_write(tmp_path / "k.jsonl", [row | {"kind": "rephrase"}]), tasks)


def test_join_content_positions():
    assert join_content("C.", "Do X.", "post") == "C.\n\nDo X."
    assert join_content("C.", "Do X.", "pre") == "Do X.\n\nC."
    assert join_content("C.", None, "none") == "C."
    with pytest.raises(ValueError, match="position='middle'"):
        join_content("C.", "Do X.", "middle")


@pytest.mark.parametrize("instruction", ["Translate this text into French.", "把这段文字翻译成法语。",
                                         "Переведи этот текст на французский язык.", "Übersetze diesen Text ins Französische."])
@pytest.mark.parametrize("position", ["post", "pre"])
def test_token_positions_on_real_tokenisations(tiny_model, instruction, position):
    tok = tiny_model.tokenizer
    user = join_content("The old lighthouse stood at the end of the pier.", instruction, position)
    marks = token_positions(tok, user, instruction)
    ids = marks["input_ids"]
    assert ids == tok(marks["prompt"], add_special_tokens=False)["input_ids"]
    assert marks["idx_last_prompt"] == len(ids) - 1
    assert tok.decode(ids[marks["idx_end_user"]]) == "<|im_end|>"
    # Decoding up to the last instruction token reproduces the instruction's end; one token fewer does not.
    upto = tok.decode(ids[: marks["idx_last_instruction"] + 1])
    assert upto.rstrip().endswith(instruction[-2:].strip())
    assert instruction in tok.decode(ids[: marks["idx_last_instruction"] + 1])
    assert instruction not in tok.decode(ids[: marks["idx_last_instruction"]])
    assert token_positions(tok, "Just content.", None)["idx_last_instruction"] == -1


def test_build_prompts_pairs_every_variant_with_one_negative(tiny_model):
    variants = load_variants()
    variants = variants[variants["task"] == "translate_fr"].head(3)
    passages = load_passages().head(2)
    df = build_prompts(tiny_model.tokenizer, variants, passages)
    assert len(df) == 2 * (1 + 3 * 2) and df["prompt_id"].is_unique
    assert (df["label"] == "negative").sum() == 2
    neg = df[df["label"] == "negative"].iloc[0]
    assert neg["user_text"] == passages.iloc[0]["text"] and neg["idx_last_instruction"] == -1


def test_keyword_sub_tasks_get_distinct_prompts(tiny_model):
    variants = load_variants()
    variants = variants[variants["base_task"] == "keyword"].groupby("task").head(1)
    df = build_prompts(tiny_model.tokenizer, variants, load_passages().head(1), ["post"])
    positives = df[df["label"] == "positive"]
    assert positives["prompt_id"].is_unique and positives["task"].nunique() == 3
    for row in positives.itertuples():
        assert row.task.split(":")[1] in row.user_text


def test_evaluation_passages_are_unseen_by_the_sae_corpora(tiny_model):
    """No val or test passage, nor any of its sentences, is in a text the SAEs were trained on (either corpus)."""
    import re

    from saif_utils.corpus import CORPUS_VERSIONS, build_documents

    passages = load_passages()
    held = passages[passages["split"] != "train"]["text"]
    sentences = {s for text in held for s in re.split(r"(?<=[.!?])\s+", text) if len(s) >= 30}
    assert len(sentences) >= 2 * len(held) - 10
    for version in CORPUS_VERSIONS:
        corpus = "\n".join(doc.text for doc in build_documents(tiny_model.tokenizer, version=version)[0])
        seen = sorted(s for s in sentences if s in corpus)
        assert not seen, f"corpus {version} holds evaluation sentences: {seen[:3]}"
