"""Write data/sae_corpus/instruction_prompts.jsonl: a frozen snapshot of our content+instruction prompts for SAE training.

A snapshot (rather than reading data/instructions live) keeps the SAE training recipe stable when instruction variants
are edited later. Only `train` passages are used, so val/test passages never reach the SAEs. Each variant appears with
four random passages in a random position (instruction after or before the content), and every train passage also
appears alone (the negative of the contrast).

`--extra` writes the second snapshot the v2 corpus adds (data/sae_corpus/instruction_prompts_extra.jsonl): eight more
passages per variant drawn with another seed, no bare passages (the first snapshot has them). Both files are frozen
inputs of committed SAE recipes; rewriting either one forces the SAEs that read it to be retrained.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(out: Path, seed: int, passages_per_variant: int, bare: bool) -> None:
    rng = random.Random(seed)
    passages = [json.loads(l) for l in (ROOT / "data/content/passages.jsonl").read_text().splitlines()]
    train = [p for p in passages if p["split"] == "train"]
    tasks = {t["task"]: t for t in map(json.loads, (ROOT / "data/tasks.jsonl").read_text().splitlines())}
    rows = [{"text": p["text"], "task": None, "variant_id": None, "position": None, "passage_id": p["passage_id"]}
            for p in train]
    for path in sorted((ROOT / "data/instructions").glob("*.jsonl")):
        for variant in map(json.loads, path.read_text().splitlines()):
            for passage in rng.sample(train, passages_per_variant):
                instruction = variant["text"].format(keyword=rng.choice(tasks[variant["task"]].get("keywords", [""])))
                position = rng.choice(["pre", "post"])
                text = f"{instruction}\n\n{passage['text']}" if position == "pre" else f"{passage['text']}\n\n{instruction}"
                rows.append({"text": text, "task": variant["task"], "variant_id": variant["variant_id"],
                             "position": position, "passage_id": passage["passage_id"]})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="store_true", help="write the v2 corpus's extra snapshot instead")
    args = parser.parse_args()
    if args.extra:
        main(ROOT / "data/sae_corpus/instruction_prompts_extra.jsonl", seed=1, passages_per_variant=8, bare=False)
    else:
        main(ROOT / "data/sae_corpus/instruction_prompts.jsonl", seed=0, passages_per_variant=4, bare=True)
