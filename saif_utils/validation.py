"""How far the judges agree with people: precision and recall of the degeneracy detector and of the checkers against
the human-read responses in `data/labels/`."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .evaluation import judge
from .stats import bootstrap_ci

FOLDS = ("heldout", "dev", "all")
LABELLED_TASKS = ("translate_fr", "keyword:ocean")
"""Tasks whose responses also carry a `follows` label."""


def word_trigram_loop(text: str) -> bool:
    """The loop rule used before the degeneracy detector: ≥ 50 % of whitespace-split word 3-grams repeat an earlier
    one (kept only to report how it fares against the labels)."""
    tokens = text.split()
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    return bool(grams) and 1 - len(set(grams)) / len(grams) >= 0.5


def comparisons(labels: pd.DataFrame) -> list[tuple[str, pd.Series, pd.Series]]:
    """(judge, predicted, human label) for every judge compared, each over the rows it applies to."""
    judged = judge(labels)
    pairs = [("degeneracy detector → degenerate", judged["degenerate"], labels["degenerate"]),
             ("word 3-gram loop rule (before) → degenerate", labels["response"].map(word_trigram_loop),
              labels["degenerate"])]
    for task in LABELLED_TASKS:
        rows = (labels["task"] == task) & labels["follows"].notna()
        truth = labels.loc[rows, "follows"].astype(bool)
        for verdict in ("strict", "loose", "checker_strict", "checker_loose"):
            pairs.append((f"{task} {verdict.replace('_', ' ')} → follows", judged.loc[rows, verdict], truth))
    return pairs


def _rate(hits: pd.Series, seed: int) -> tuple[float, float, float]:
    return bootstrap_ci(hits.astype(float), seed=seed) if len(hits) else (np.nan, np.nan, np.nan)


def agreement_table(labels: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per judge and fold (held-out, dev — the half the thresholds were set on — and all): n, how many the judge and
    the labels call positive, precision and recall with 95 % bootstrap CIs."""
    rows = []
    for name, predicted, truth in comparisons(labels):
        predicted, truth = predicted.astype(bool), truth.astype(bool)
        for fold in FOLDS:
            keep = labels.loc[predicted.index, "fold"].eq(fold) if fold != "all" else pd.Series(True, predicted.index)
            pred, true = predicted[keep], truth[keep]
            precision, p_low, p_high = _rate(true[pred], seed)
            recall, r_low, r_high = _rate(pred[true], seed)
            rows.append({"judge": name, "fold": fold, "n": int(keep.sum()), "n_judge_positive": int(pred.sum()),
                         "n_label_positive": int(true.sum()), "precision": precision, "precision_ci_low": p_low,
                         "precision_ci_high": p_high, "recall": recall, "recall_ci_low": r_low,
                         "recall_ci_high": r_high})
    return pd.DataFrame(rows)
