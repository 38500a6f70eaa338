"""The human-read sample behind the judges (data/labels/).

  draw RUN_DIR OUT       stratified sample of a run's steering responses, unlabelled, for a person to read
  agreement              precision / recall of the judges against data/labels/responses.jsonl → agreement.csv
  calibrate [PROFILE]    MiniLM similarity of the prompted keyword responses on the train passages to their own
                         passage and to another one (the keyword checker's topic threshold: the 95th percentile of
                         the latter, so 5 % of responses pass against a passage they are not about)
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pandas as pd

from saif_utils.data import AGREEMENT_PATH, evaluation_prompts, load_labels, prompting_instructions
from saif_utils.degeneracy import is_degenerate
from saif_utils.evaluation import checker_for, minilm_similarity
from saif_utils.io import write_table
from saif_utils.validation import LABELLED_TASKS, agreement_table

PER_STRATUM = {"default": 8, "labelled": 10}
"""Responses drawn per task × method: more for the tasks that also get a `follows` label."""


def draw(run_dir: Path, out: Path, seed: int = 0, tasks: list[str] | None = None, per_stratum: int | None = None,
         exclude: Path | None = None) -> pd.DataFrame:
    """Per task × method, responses split evenly between test (the reported configuration) and val (any searched
    configuration, where the strong α that break the model live), halves alternating between the dev and held-out
    folds; no response text twice, none already in `exclude` (a labels file)."""
    generations = pd.read_parquet(run_dir / "05_steering_sweeps" / "generations.parquet")
    generations = generations.drop_duplicates("response")
    if exclude is not None:
        generations = generations[~generations["response"].isin(load_labels(exclude)["response"])]
    if tasks:
        generations = generations[generations["task"].isin(tasks)]
    picked = []
    for (task, _), group in generations.groupby(["task", "method"], sort=True):
        n = per_stratum or PER_STRATUM["labelled" if task in LABELLED_TASKS else "default"]
        test, val = group[group["split"] == "test"], group[group["split"] == "val"]
        n_val = min(len(val), n // 2)
        part = pd.concat([test.sample(min(len(test), n - n_val), random_state=seed),
                          val.sample(n_val, random_state=seed)]).sample(frac=1, random_state=seed)
        picked.append(part.assign(fold=["dev" if i % 2 == 0 else "heldout" for i in range(len(part))]))
    sample = pd.concat(picked, ignore_index=True)
    with out.open("w") as fh:
        for row in sample.to_dict("records"):
            config = {k: (None if pd.isna(row[k]) else row[k]) for k in ("layer", "k", "alpha", "position")}
            rid = hashlib.sha256(json.dumps([row["task"], row["method"], row["split"], row["passage_id"], config,
                                             row["response"]], default=str).encode()).hexdigest()[:12]
            fh.write(json.dumps({"response_id": rid, "task": row["task"], "method": row["method"],
                                 "split": row["split"], "passage_id": row["passage_id"], "source": row["source"],
                                 "response": row["response"], "fold": row["fold"]}, ensure_ascii=False) + "\n")
    return sample


def calibrate(profile: str = "default") -> pd.DataFrame:
    """Prompt the model with each keyword instruction on every train passage (never val or test) and measure each
    answer's MiniLM similarity to its own passage and, as the null, to another passage."""
    from saif_utils.context import open_run
    from saif_utils.profiles import stage_config
    from saif_utils.stages.steering import SweepConfig

    ctx = open_run(profile)
    cfg = stage_config(SweepConfig, ctx.profile)
    passages = ctx.data.passages()
    train = passages[passages["split"] == "train"]
    keywords = [t for t in ctx.data.variants()["task"].unique() if t.startswith("keyword:")]
    instructions = prompting_instructions(ctx.data.variants(), keywords, cfg.prompt_variant)
    rows = []
    for task in keywords:
        prompts = evaluation_prompts(ctx.tokenizer, train, instructions[task], "post")
        answers = ctx.generate(list(prompts["input_ids"]), None, None, cfg.max_new_tokens, cfg.gen_batch_size,
                               desc=f"prompted {task}")
        # The null: each response against another passage (the next one), which it is not about.
        others = list(prompts["source"].iloc[1:]) + [prompts["source"].iloc[0]]
        for source, other, ids in zip(prompts["source"], others, answers):
            response = ctx.tokenizer.decode(ids, skip_special_tokens=True).strip()
            uses_word = checker_for(task)(response, None).loose
            rows.append({"task": task, "uses_keyword": uses_word, "degenerate": is_degenerate(response),
                         "similarity": minilm_similarity(response, source),
                         "similarity_other": minilm_similarity(response, other)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_draw = sub.add_parser("draw")
    p_draw.add_argument("run_dir", type=Path)
    p_draw.add_argument("out", type=Path)
    p_draw.add_argument("--seed", type=int, default=0)
    p_draw.add_argument("--tasks", nargs="*")
    p_draw.add_argument("--per-stratum", type=int)
    p_draw.add_argument("--exclude", type=Path, help="a labels file whose responses are not drawn again")
    sub.add_parser("agreement")
    p_cal = sub.add_parser("calibrate")
    p_cal.add_argument("profile", nargs="?", default="default")
    args = parser.parse_args()
    if args.command == "draw":
        print(draw(args.run_dir, args.out, args.seed, args.tasks, args.per_stratum, args.exclude).groupby(["task", "method", "split"]).size().to_string())
    elif args.command == "agreement":
        table = agreement_table(load_labels())
        write_table(table, AGREEMENT_PATH)
        print(table.round(3).to_string())
    else:
        table = calibrate(args.profile)
        fluent = table[~table["degenerate"]]
        print(f"{len(table)} prompted train responses, {len(fluent)} not degenerate; MiniLM similarity quantiles")
        print(fluent[["similarity", "similarity_other"]].quantile([.05, .25, .5, .75, .9, .95, .99]).round(3))
        print(f"topic threshold = 95th percentile against another passage: "
              f"{fluent['similarity_other'].quantile(0.95):.3f}")


if __name__ == "__main__":
    main()
