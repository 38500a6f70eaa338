"""Instruction variants, content passages and task definitions: validated loaders and the contrastive pair builder."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from .models import chat_prompt
from .paths import DATA_DIR

INSTRUCTIONS_PATH = DATA_DIR / "instructions"
CONTENT_PATH = DATA_DIR / "content" / "passages.jsonl"
TASKS_PATH = DATA_DIR / "tasks.jsonl"
LABELS_PATH = DATA_DIR / "labels" / "responses.jsonl"
AGREEMENT_PATH = DATA_DIR / "labels" / "agreement.csv"
"""The judges' precision and recall against LABELS_PATH (`tools/label_sample.py agreement`)."""

POSITIONS = ("post", "pre")
"""Where the instruction sits relative to the content: after it (post) or before it (pre)."""


@dataclass(frozen=True)
class Variant:
    """One wording of one task's instruction."""

    task: str
    variant_id: str
    language: str
    kind: str  # "paraphrase" (English reformulation) | "translation" (the instruction in another language)
    text: str


@dataclass(frozen=True)
class Passage:
    """One short content passage the instruction applies to."""

    passage_id: str
    text: str
    split: str  # "train" (discovery) | "val" (choosing settings) | "test" (reporting)


@dataclass(frozen=True)
class Task:
    """A task's description, its role in the study, its sibling contrasts and the checker that judges it."""

    task: str
    description: str
    role: str = "target"  # "target" (evaluated) | "sibling" (contrast only)
    siblings: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    checker: str | None = None  # a registered checker's name (`evaluation.CHECKERS`); None → the task's own name
    steered: bool = True  # a target among the default tasks of ablation and steering
    steered_keywords: tuple[str, ...] = ()  # of `keywords`, those steered by default (empty: all)

    @property
    def checker_name(self) -> str:
        """The registered checker that judges this task's responses."""
        return self.checker or self.task

    def sub_tasks(self, steered_only: bool = False) -> tuple[str, ...]:
        """The task as responses are judged: one `keyword:<word>` per keyword, else the task itself."""
        words = (self.steered_keywords or self.keywords) if steered_only else self.keywords
        return tuple(f"{self.task}:{word}" for word in words) if self.keywords else (self.task,)


def default_tasks(tasks: dict[str, Task]) -> tuple[str, ...]:
    """The (sub-)tasks ablation and steering run when none are named: the steered targets, in file order."""
    return tuple(sub for task in tasks.values() if task.role == "target" and task.steered
                 for sub in task.sub_tasks(steered_only=True))


@dataclass(frozen=True)
class LabelledResponse:
    """One response of the study, read by a person and labelled (see data/labels/README.md)."""

    response_id: str
    task: str
    method: str
    split: str
    passage_id: str
    source: str
    response: str
    degenerate: bool  # a reader rejects it as language: a loop, a token flood, gibberish or pseudo-words, empty
    follows: bool | None  # translate_fr / keyword: does it follow the instruction (None: not labelled for this task)
    fold: str  # "dev" (thresholds were set on it) | "heldout" (reported)
    note: str = ""


ENUMS = {"kind": ("paraphrase", "translation"), "split": ("train", "val", "test"), "role": ("target", "sibling"),
         "fold": ("dev", "heldout")}
MAY_BE_EMPTY = {"response", "note"}
"""String fields that may be empty (a model can answer with nothing)."""


class DataError(ValueError):
    """A data file violates its documented schema (see data/README.md); the message names file:line."""


def _check_row(row: Any, cls: type, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    allowed = {f.name for f in fields(cls)}
    missing = sorted(required - row.keys())
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; required: {sorted(required)}")
    unknown = sorted(row.keys() - allowed)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    types = {f.name: f.type for f in fields(cls)}
    for name, value in row.items():
        if types[name] in ("bool", "bool | None"):
            if not (isinstance(value, bool) or (value is None and types[name] == "bool | None")):
                raise DataError(f"{where}: field {name!r} must be true or false"
                                f"{' or null' if types[name] == 'bool | None' else ''}, got {value!r}")
        elif name in ("siblings", "keywords", "steered_keywords"):
            if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise DataError(f"{where}: field {name!r} must be a list of non-empty strings, got {value!r}")
        elif not isinstance(value, str) or not (value.strip() or name in MAY_BE_EMPTY):
            raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
        if name in ENUMS and value not in ENUMS[name]:
            raise DataError(f"{where}: field {name!r} is {value!r}; allowed: {list(ENUMS[name])}")
    return row


def read_jsonl(path: str | Path, cls: type) -> list:
    """Parse a JSONL file into `cls` records, failing on the first bad line with `file:line: problem`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        row = _check_row(row, cls, where)
        records.append(cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}))
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _jsonl_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .jsonl files in this folder")
    return files


def load_tasks(path: str | Path = TASKS_PATH) -> dict[str, Task]:
    """Task definitions by name; siblings must name defined tasks."""
    tasks = {}
    for task in read_jsonl(path, Task):
        if task.task in tasks:
            raise DataError(f"{path}: task {task.task!r} is defined twice")
        tasks[task.task] = task
    for task in tasks.values():
        for sibling in task.siblings:
            if sibling not in tasks:
                raise DataError(f"{path}: task {task.task!r} names sibling {sibling!r}, which is not defined")
        unknown = sorted(set(task.steered_keywords) - set(task.keywords))
        if unknown:
            raise DataError(f"{path}: task {task.task!r} steers keywords {unknown} it does not list in keywords")
    return tasks


def load_variants(path: str | Path = INSTRUCTIONS_PATH, tasks: dict[str, Task] | None = None) -> pd.DataFrame:
    """All instruction variants (a folder of JSONL files or one file) as a DataFrame, validated against `tasks`.

    Keyword tasks are expanded: a variant of task `keyword` with a `{keyword}` placeholder becomes one variant per
    keyword, under the sub-task `keyword:<word>` (one steering vector can carry only one keyword).
    """
    tasks = load_tasks() if tasks is None else tasks
    rows = []
    seen: dict[str, str] = {}
    for file in _jsonl_files(path):
        for lineno, variant in enumerate(read_jsonl(file, Variant), 1):
            where = f"{file}:{lineno}"
            if variant.task not in tasks:
                raise DataError(f"{where}: task {variant.task!r} is not defined in tasks.jsonl; defined: {sorted(tasks)}")
            if variant.variant_id in seen:
                raise DataError(f"{where}: variant_id {variant.variant_id!r} already used at {seen[variant.variant_id]}")
            seen[variant.variant_id] = where
            keywords = tasks[variant.task].keywords
            if "{keyword}" in variant.text:
                if not keywords:
                    raise DataError(f"{where}: text has a {{keyword}} placeholder but task {variant.task!r} has no keywords")
                for word in keywords:
                    rows.append({**variant.__dict__, "task": f"{variant.task}:{word}", "base_task": variant.task,
                                 "variant_id": f"{variant.variant_id}:{word}", "keyword": word,
                                 "text": variant.text.format(keyword=word)})
            else:
                rows.append({**variant.__dict__, "base_task": variant.task, "keyword": None})
    return pd.DataFrame(rows)


def load_passages(path: str | Path = CONTENT_PATH) -> pd.DataFrame:
    """Content passages as a DataFrame; a passage id or text in two splits is an error (no leakage)."""
    rows, first_seen = [], {}
    for file in _jsonl_files(path):
        for lineno, passage in enumerate(read_jsonl(file, Passage), 1):
            where = f"{file}:{lineno}"
            for key in (("id", passage.passage_id), ("text", " ".join(passage.text.split()).lower())):
                if key in first_seen:
                    prev_where, prev_split = first_seen[key]
                    problem = "in more than one split" if prev_split != passage.split else "twice"
                    raise DataError(f"{where}: passage {passage.passage_id!r} ({key[0]}) appears {problem}: "
                                    f"{prev_split} at {prev_where} and {passage.split} here")
                first_seen[key] = (where, passage.split)
            rows.append(passage.__dict__)
    return pd.DataFrame(rows)


def load_labels(path: str | Path = LABELS_PATH) -> pd.DataFrame:
    """The human-read sample of responses as a DataFrame; response ids must be unique."""
    records = read_jsonl(path, LabelledResponse)
    ids = pd.Series([r.response_id for r in records])
    if ids.duplicated().any():
        raise DataError(f"{path}: response_id(s) {sorted(set(ids[ids.duplicated()]))} appear more than once")
    return pd.DataFrame([r.__dict__ for r in records])


@dataclass(frozen=True)
class DataSources:
    """Where a run reads its instruction variants, passages and task definitions (None → the committed data)."""

    instructions_path: str | Path | None = None
    content_path: str | Path | None = None
    tasks_path: str | Path | None = None

    def tasks(self) -> dict[str, Task]:
        """Task definitions by name."""
        return load_tasks(self.tasks_path or TASKS_PATH)

    def variants(self) -> pd.DataFrame:
        """Every instruction variant, validated against the task definitions."""
        return load_variants(self.instructions_path or INSTRUCTIONS_PATH, self.tasks())

    def passages(self) -> pd.DataFrame:
        """Every content passage with its split."""
        return load_passages(self.content_path or CONTENT_PATH)

    def check(self) -> None:
        """Read and validate every source (a missing path, an empty folder, a bad line, a target task without a
        registered checker or without instruction variants), naming the parameter that points at it: run before any
        model work."""
        from .evaluation import check_tasks

        for name, read in (("tasks_path", self.tasks), ("instructions_path", self.variants),
                           ("content_path", self.passages)):
            try:
                read()
            except DataError as err:
                raise DataError(f"{name}={getattr(self, name)!r}: {err}") from None
        tasks = self.tasks()
        try:
            check_tasks(tasks)
        except ValueError as err:
            raise DataError(f"tasks_path={self.tasks_path!r}: {err}") from None
        with_variants = set(self.variants()["base_task"])
        bare = [name for name, task in tasks.items() if task.role == "target" and name not in with_variants]
        if bare:
            raise DataError(f"instructions_path={self.instructions_path!r}: target task(s) {bare} have no instruction "
                            f"variants; add a <task>.jsonl of variants, or mark them \"role\": \"sibling\"")


def sample_passages(passages: pd.DataFrame, split: str, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of `n` passages from `split` (all of them when the split is smaller)."""
    pool = passages[passages["split"] == split]
    if pool.empty:
        raise ValueError(f"no passages in split {split!r}; check content_path")
    return pool.sample(n=min(n, len(pool)), random_state=seed).sort_values("passage_id").reset_index(drop=True)


def prompting_instructions(variants: pd.DataFrame, tasks: Sequence[str], suffix: str) -> dict[str, str]:
    """The instruction text written in the prompt for every task (variant `<base>-<suffix>`, `:<word>` for keywords)."""
    out = {}
    for task in tasks:
        base, _, word = task.partition(":")
        variant_id = f"{base}-{suffix}" + (f":{word}" if word else "")
        match = variants[variants["variant_id"] == variant_id]
        if match.empty:
            raise ValueError(f"prompt_variant={suffix!r}: no variant {variant_id!r} for task {task!r} in the instruction data")
        out[task] = match["text"].iloc[0]
    return out


def check_position(position: str, name: str = "position") -> str:
    """Return `position` if it is one of `POSITIONS`, else raise naming the allowed values."""
    if position not in POSITIONS:
        raise ValueError(f"{name}={position!r}; allowed: {list(POSITIONS)}")
    return position


# ---------------------------------------------------------------- contrastive prompts
def join_content(content: str, instruction: str | None, position: str) -> str:
    """The user message: content alone (negative), content then instruction (post), or instruction then content (pre)."""
    if instruction is None:
        return content
    if position == "post":
        return f"{content}\n\n{instruction}"
    check_position(position)
    return f"{instruction}\n\n{content}"


def build_prompts(tokenizer, variants: pd.DataFrame, passages: pd.DataFrame,
                  positions: Sequence[str] = POSITIONS) -> pd.DataFrame:
    """Every (passage × variant × position) positive plus one negative per passage, chat-formatted and tokenised.

    Columns: prompt_id, passage_id, split, task, base_task, variant_id, language, kind, position, label
    ("positive"/"negative"), user_text, prompt, input_ids, and the token indices `idx_last_prompt`,
    `idx_end_user` and `idx_last_instruction` (-1 for negatives) described in `token_positions`.
    """
    for position in positions:
        check_position(position)
    if variants.empty or passages.empty:
        raise ValueError("build_prompts: no variants or no passages; check instructions_path / content_path")
    rows = []
    for passage in passages.itertuples():
        base = {"passage_id": passage.passage_id, "split": passage.split, "content": passage.text}
        rows.append(base | {"task": None, "base_task": None, "variant_id": None, "language": None, "kind": None,
                            "position": "none", "label": "negative", "instruction": None})
        for variant in variants.itertuples():
            for position in positions:
                rows.append(base | {"task": variant.task, "base_task": variant.base_task,
                                    "variant_id": variant.variant_id, "language": variant.language,
                                    "kind": variant.kind, "position": position, "label": "positive",
                                    "instruction": variant.text})
    for row in rows:
        row["user_text"] = join_content(row["content"], row["instruction"], row["position"])
        row.update(token_positions(tokenizer, row["user_text"], row["instruction"]))
        row["prompt_id"] = f"{row['passage_id']}|{row['variant_id'] or '-'}|{row['position']}"
    df = pd.DataFrame(rows)
    duplicated = df["prompt_id"][df["prompt_id"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"build_prompts: prompt ids {list(duplicated[:3])} repeat; variant_id must be unique per variant")
    return df[["prompt_id", *[c for c in df.columns if c != "prompt_id"]]]


def token_positions(tokenizer, user_text: str, instruction: str | None) -> dict:
    """Chat-format `user_text`, tokenise it and locate the three positions every stage addresses.

    * `idx_last_prompt` — the last token of the generation prompt (what the model reads just before answering);
    * `idx_end_user` — the first token after the user's text (the template's end-of-turn marker);
    * `idx_last_instruction` — the last token overlapping the instruction's characters (-1 without instruction).

    Positions come from the tokenizer's character offsets, so multi-byte scripts and merges across the boundary
    are handled exactly.
    """
    prompt = chat_prompt(tokenizer, user_text)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    user_start = prompt.rindex(user_text)
    user_end = user_start + len(user_text)
    idx_end_user = next(i for i, (start, end) in enumerate(offsets) if start >= user_end and end > start)
    idx_instr = -1
    if instruction is not None:
        instr_start = user_start + user_text.index(instruction)
        instr_end = instr_start + len(instruction)
        idx_instr = max(i for i, (start, end) in enumerate(offsets) if start < instr_end and end > instr_start)
    return {"prompt": prompt, "input_ids": enc["input_ids"], "n_tokens": len(enc["input_ids"]),
            "idx_last_prompt": len(enc["input_ids"]) - 1, "idx_end_user": idx_end_user, "idx_last_instruction": idx_instr}


def evaluation_prompts(tokenizer, passages: pd.DataFrame, instruction: str | None = None,
                       position: str = "post") -> pd.DataFrame:
    """One chat prompt per passage — content alone, or with `instruction` at `position` — for generation.

    Columns: passage_id, split, source (the passage text the checkers compare against), user_text, input_ids.
    """
    if passages.empty:
        raise ValueError("evaluation_prompts: no passages; check content_path and the split sizes")
    user_texts = [join_content(text, instruction, position) for text in passages["text"]]
    ids = tokenizer([chat_prompt(tokenizer, t) for t in user_texts], add_special_tokens=False)["input_ids"]
    return pd.DataFrame({"passage_id": passages["passage_id"].to_numpy(), "split": passages["split"].to_numpy(),
                         "source": passages["text"].to_numpy(), "user_text": user_texts, "input_ids": ids})
