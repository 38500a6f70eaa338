"""SAEs with sae-lens: validate and load released SAEs, train TopK SAEs on our own activations, save/load, evaluate."""
from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import nnsight
import numpy as np
import torch

from .architectures import blocks, final_norm, lm_head, skip_blocks_through
from .corpus import TokenCorpus, token_corpus
from .io import atomic_dir, atomic_path, cache_root, cached_frames, content_hash, sha256_file
from .models import (
    length_buckets,
    model_fingerprint,
    read_residual_tokens,
    real_token_mask,
    residual_batches,
    server_errors,
    trim_heap,
)
from .paths import REPO_ROOT
from .profiles import Profile, SAETrainConfig
from .progress import tqdm

TRAINING_RECORD = "training.json"
CURVE_TOKENS = 8192
"""Held-out tokens the learning curve in a training record is measured on."""
SKIP_FIRST = 1
"""Leading tokens of every held-out text that SAE metrics skip: the attention sink, whose norm dwarfs the rest."""


# ---------------------------------------------------------------- released SAEs
def validate_release(release: str, sae_id: str) -> None:
    """Check `release`/`sae_id` against sae-lens's bundled registry (offline); raise listing close valid names."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, directory, n=5, cutoff=0.4)
        raise ValueError(f"unknown SAE release {release!r}; closest sae-lens releases: {close or sorted(directory)[:10]}")
    ids = directory[release].saes_map
    if sae_id not in ids:
        close = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.4)
        raise ValueError(f"unknown sae_id {sae_id!r} in release {release!r}; closest ids: {close or sorted(ids)[:10]}")


def neuronpedia_id(release: str, sae_id: str) -> str | None:
    """Neuronpedia dashboard id of a released SAE (e.g. 'gemma-2-2b/25-gemmascope-res-16k'), if sae-lens knows one."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()[release].neuronpedia_id.get(sae_id)


def neuronpedia_ids(profile: Profile) -> dict[int, str]:
    """Neuronpedia dashboard ids per layer for a profile's released SAEs (empty for SAEs we trained)."""
    if profile.trains_saes:
        return {}
    ids = {layer: neuronpedia_id(profile.sae_release, profile.sae_id(layer)) for layer in profile.sae_layers}
    return {layer: value for layer, value in ids.items() if value}


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu"):
    """Validate the names offline, then download and load a released SAE with sae-lens."""
    from sae_lens import SAE

    validate_release(release, sae_id)
    return SAE.from_pretrained(release, sae_id, device=device)


# ---------------------------------------------------------------- checks, save, load
def sae_layer(sae) -> int | None:
    """Layer index parsed from the SAE's hook name (`blocks.L.hook_resid_post` or `model.layers.L`)."""
    match = re.search(r"(?:blocks|layers)\.(\d+)\b", sae.cfg.metadata.hook_name or "")
    return int(match.group(1)) if match else None


def check_sae(sae, layer: int, d_model: int) -> None:
    """Raise when an SAE cannot read `layer` of a model with width `d_model`."""
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} (layer {layer}) does not match the model's d_model={d_model}: "
                         f"pick an SAE trained on this model")
    hooked = sae_layer(sae)
    if hooked is not None and hooked != layer:
        raise ValueError(f"SAE hook {sae.cfg.metadata.hook_name!r} reads layer {hooked}, but layer={layer} was requested")


def save_sae(sae, dest: str | Path, record: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an SAE atomically in sae-lens format (`cfg.json` + `sae_weights.safetensors`) plus an optional record."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        if dtype is not None:
            original = sae.cfg.dtype
            sae.to(dtype=dtype)
            sae.cfg.dtype = str(dtype).removeprefix("torch.")
            sae.save_model(tmp)
            sae.to(dtype=getattr(torch, original))
            sae.cfg.dtype = original
        else:
            sae.save_model(tmp)
        if record is not None:
            (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return dest


SUPPORTED_ARCHITECTURES = ("standard", "topk", "jumprelu")
"""sae-lens architectures whose maths the interventions mirror (`interventions.SAEWeights`); a BatchTopK SAE is saved
as jumprelu."""


def load_local_sae(path: str | Path, device: str = "cpu"):
    """Load an SAE saved in sae-lens format, in float32 whatever dtype it was stored in; a folder that is not one, an
    architecture the interventions cannot mirror or an unreadable weights file is refused naming the file."""
    from sae_lens import SAE
    from safetensors import SafetensorError

    path = Path(path)
    missing = [name for name in ("cfg.json", "sae_weights.safetensors") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no sae-lens SAE at {path}: {missing} missing (an SAE folder holds cfg.json and "
                                f"sae_weights.safetensors, as sae-lens's `save_model` writes them)")
    try:
        architecture = json.loads((path / "cfg.json").read_text()).get("architecture", "standard")
    except ValueError as err:
        raise ValueError(f"{path / 'cfg.json'} is not valid JSON ({err})") from None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: SAE architecture {architecture!r} is not supported; allowed: "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    try:
        return SAE.load_from_disk(path, device=device, dtype="float32")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path / 'sae_weights.safetensors'} cannot be read ({type(err).__name__}: {err}): the file "
                         f"is corrupt or truncated; restore it (git checkout for a shipped SAE) or retrain") from None


# ---------------------------------------------------------------- activations
def collect_activations(model, profile: Profile, corpus: TokenCorpus, layers: list[int],
                        splits: tuple[str, ...] = ("train", "eval")) -> dict[str, dict[int, np.ndarray]]:
    """fp16 residual activations of the corpus's `splits` at `layers` → `{split: {layer: [n_tok, d]}}`, cached on disk.

    One forward pass per batch serves every layer (it stops after the deepest one). The cache key covers the
    model weights, the split's token ids and the layer, so any change to the corpus or model yields a new entry.
    """
    root = cache_root() / "activations" / profile.model.name
    ids_by_split = {"train": corpus.train_ids, "eval": corpus.eval_ids}
    out: dict[str, dict[int, np.ndarray]] = {}
    for split in splits:
        key = {"model": model_fingerprint(profile), "tokens": corpus.manifest[split]["token_ids_hash"],
               "skip_first": corpus.manifest["skip_first"]}
        paths = {layer: root / f"{split}-L{layer}-{content_hash(key | {'layer': layer})}.npy" for layer in layers}
        missing = [layer for layer, path in paths.items() if not path.is_file()]
        if missing:
            acts = read_residual_tokens(model, ids_by_split[split], missing, skip_first=corpus.manifest["skip_first"],
                                        batch_size=profile.batch_size, remote=profile.remote,
                                        desc=f"{split} activations", dtype=torch.float16)
            for layer in missing:
                with atomic_path(paths[layer]) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, acts[layer].numpy())
            del acts
        out[split] = {layer: np.load(path, mmap_mode="r") for layer, path in paths.items()}
    return out


# ---------------------------------------------------------------- training
def _batches(acts: np.ndarray, batch_size: int, seed: int):
    """Endless shuffled float32 batches over the rows of `acts`, a fresh permutation each epoch."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    data = torch.from_numpy(np.array(acts))  # a writable in-memory copy of the (read-only) memmap
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield data[order[start:start + batch_size]].float()


def train_sae(train_acts: np.ndarray, cfg: SAETrainConfig, layer: int, model_name: str,
              curve_acts: np.ndarray | None = None, n_curve_points: int = 8):
    """Train a TopK or BatchTopK SAE with sae-lens's `SAETrainer` on cached activations `[n_tokens, d_in]`.

    Returns `(sae, curve)`: with held-out `curve_acts`, `curve` lists explained variance and L0 on them at
    `n_curve_points` evenly spaced points of training (the learning curve in the training record); else it is empty.
    """
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    d_in = train_acts.shape[1]
    common = dict(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
                  normalize_activations="expected_average_only_in", dtype="float32", device="cpu")
    if cfg.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae.cfg.metadata.model_name = model_name
    sae.cfg.metadata.hook_head_index = None
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.total_steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr * cfg.lr_end_fraction,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=int(cfg.total_steps * cfg.lr_decay_fraction),
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(cfg.dead_feature_window, 50),
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=min(50, cfg.total_steps),
        n_checkpoints=n_curve_points if curve_acts is not None else 0,
        checkpoint_path=None,  # sae-lens's "checkpoints" default would write every checkpoint into the cwd
    )
    curve: list[dict] = []

    def record_curve_point(checkpoint_path=None) -> None:
        scale = trainer.activation_scaler.scaling_factor or 1.0
        curve.append({"samples": trainer.n_training_samples, "steps": trainer.n_training_steps}
                     | _heldout_fit(sae, curve_acts, scale))

    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(train_acts, cfg.batch_size, cfg.seed),
                         save_checkpoint_fn=record_curve_point if curve_acts is not None else None)
    with torch.enable_grad():  # callers may run under inference_mode
        trainer.fit()
    inference_sae = _inference_sae(sae)
    if curve_acts is not None:
        curve.append({"samples": trainer.n_training_samples, "steps": trainer.n_training_steps}
                     | _heldout_fit(inference_sae, curve_acts, 1.0))
    return inference_sae, curve


@torch.no_grad()
def _heldout_fit(sae, acts: np.ndarray, scale: float) -> dict:
    """Explained variance and mean L0 of a (training or inference) SAE on `acts`, which it reads multiplied by `scale`
    (sae-lens trains on activations normalised by a scalar it folds into the weights only at the end)."""
    x = torch.from_numpy(np.array(acts, dtype=np.float32)) * scale  # a writable copy of the memmap
    feats = sae.encode(x)
    recon = sae.decode(feats)
    return {"explained_variance": 1 - ((x - recon) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item(),
            "l0": (feats > 0).sum(-1).float().mean().item()}


def _inference_sae(training_sae):
    """Convert a training SAE into its inference class (TopK → TopKSAE, BatchTopK → JumpReLUSAE) via a save/load."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        training_sae.save_inference_model(tmp)
        return load_local_sae(tmp)


# ---------------------------------------------------------------- evaluation
class ReconstructionSums:
    """Running sums of an SAE's reconstruction of residuals fed in pieces, per text: squared error, squared norm,
    the residuals' sum (for the set's mean, known only at the end) and token count; per latent: firing counts.
    Nothing holds the residuals themselves, so memory does not grow with the number of tokens."""

    def __init__(self, sae, n_texts: int, batch_size: int = 4096):
        self.sae, self.batch_size = sae, batch_size
        d_in, d_sae = sae.W_dec.shape[1], sae.W_dec.shape[0]
        self.sq_err, self.sq_norm = np.zeros(n_texts), np.zeros(n_texts)
        self.n = np.zeros(n_texts, dtype=np.int64)
        self.x_sum = torch.zeros(n_texts, d_in, dtype=torch.float64)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.active = 0

    @torch.inference_mode()
    def add(self, x: torch.Tensor, text: np.ndarray) -> None:
        """Residuals `x` `[n, d]` (float32), row i belonging to text `text[i]`."""
        for start in range(0, len(x), self.batch_size):
            part, where = x[start:start + self.batch_size].float(), text[start:start + self.batch_size]
            feats = self.sae.encode(part.to(self.sae.W_dec.device))
            recon = self.sae.decode(feats).cpu()
            n_texts = len(self.n)
            self.sq_err += np.bincount(where, ((part - recon) ** 2).sum(-1).double().numpy(), n_texts)
            self.sq_norm += np.bincount(where, (part.double() ** 2).sum(-1).numpy(), n_texts)
            self.n += np.bincount(where, minlength=n_texts)
            self.x_sum.index_add_(0, torch.from_numpy(where), part.double())
            active = feats > 0
            self.active += active.sum().item()
            self.fire_counts += active.sum(0).cpu()
            del feats, recon, active
            trim_heap()  # a chunk's [batch_size, d_sae] code and reconstruction: as in `spliced_cross_entropy`

    def metrics(self) -> dict:
        """Explained variance (1 − FVU over the whole set), mean L0, dead fraction, per-latent firing frequency, and
        each text's sums (`per_text`: squared error, squared deviation from the set's mean, tokens)."""
        n = int(self.n.sum())
        mean = self.x_sum.sum(0) / n
        # Σ_i |x_i − m|² over a text = Σ|x_i|² − 2 m·Σx_i + n_t |m|²
        deviation = self.sq_norm - 2 * (self.x_sum @ mean).numpy() + self.n * float(mean @ mean)
        return {"n_tokens": n, "explained_variance": 1 - self.sq_err.sum() / deviation.sum(), "l0": self.active / n,
                "dead_frac": (self.fire_counts == 0).float().mean().item(),
                "firing_freq": (self.fire_counts / n).numpy(),
                "per_text": {"sq_err": self.sq_err, "deviation": deviation, "n": self.n}}


def reconstruction_metrics(sae, acts: np.ndarray, batch_size: int = 4096, lengths: Sequence[int] | None = None) -> dict:
    """`ReconstructionSums.metrics` of residuals `acts` `[n_tokens, d]` held in memory: the concatenation of texts of
    `lengths` tokens (default: one text)."""
    lengths = [len(acts)] if lengths is None else list(lengths)
    if sum(lengths) != len(acts):
        raise ValueError(f"lengths sum to {sum(lengths)} tokens but acts has {len(acts)} rows")
    sums = ReconstructionSums(sae, len(lengths), batch_size)
    sums.add(torch.from_numpy(np.array(acts, dtype=np.float32)), np.repeat(np.arange(len(lengths)), lengths))
    return sums.metrics()


@torch.inference_mode()
def spliced_cross_entropy(model, saes: dict, token_ids: list[list[int]], batch_size: int = 8,
                          skip_first: int = 1, remote: bool = False, layers: dict | None = None) -> dict:
    """Per SAE (keyed by its layer, or by any label with `layers` giving each label's layer — e.g. (family, layer), so
    that several families share one clean pass): next-token cross-entropy without and with the SAE's reconstruction
    replacing the residual, with the residual zero-ablated instead (the floor of "CE loss recovered"), and the mean
    KL(clean ‖ spliced), over every real token after the first `skip_first` (the splice and the ablation skip them
    too). `per_text` holds each text's sums of the same quantities and its number of predictions, the units a
    confidence interval resamples.

    Locally, an edited pass starts from the clean pass's output of its block instead of recomputing the blocks below
    (bitwise the same numbers), and the zero ablation, which depends on the layer only, runs once per layer."""
    from .interventions import SAEWeights
    from .logits import LOGIT_CHUNK, vocab_logprobs

    layer_of = layers or {label: label for label in saes}
    # On NDIF the splice runs on the server, which has no sae-lens: the SAE's maths travels as plain tensors.
    reconstruct = {label: SAEWeights.of(sae).reconstruct if remote else sae for label, sae in saes.items()}

    spliced_layers = sorted(set(layer_of.values()))

    def clean_pass(inputs, keep):
        """Final-norm hidden states at the scored positions [n, d], unedited, and (locally) each spliced layer's block
        output [B, S, d], from which the edited passes start."""
        with server_errors(remote, "splicing SAEs (clean)"), \
                model.trace(inputs, use_cache=False, remote=remote) as tracer:
            below = nnsight.save({} if remote else {layer: blocks(model)[layer].output.detach()
                                                    for layer in spliced_layers})
            hidden = final_norm(model).output
            saved = hidden[:, :-1][keep.to(hidden.device)].detach().cpu().save()
            tracer.stop()  # the model's LM head would build [batch, seq, vocab] logits; ours runs in chunks
        trim_heap()
        return saved, below

    def edited_pass(inputs, keep, layer, splice, below, sae=None):
        """Final-norm hidden states at the scored positions [n, d] with block `layer`'s output at the `splice`
        positions replaced by `sae`'s reconstruction, or by zeros without an `sae`; with `below` (that block's clean
        output) the blocks up to `layer` are skipped, as they would recompute it exactly."""
        with server_errors(remote, f"splicing SAEs (layer {layer})"), \
                model.trace(inputs, use_cache=False, remote=remote) as tracer:
            if below is None:
                resid = blocks(model)[layer].output
                replacement = sae(resid) if sae is not None else torch.zeros_like(resid)
                resid[:] = torch.where(splice.to(resid.device), replacement, resid)
            else:
                replacement = sae(below) if sae is not None else torch.zeros_like(below)
                skip_blocks_through(model, layer, below, torch.where(splice.to(below.device), replacement, below))
            hidden = final_norm(model).output
            saved = hidden[:, :-1][keep.to(hidden.device)].detach().cpu().save()
            tracer.stop()
        # Every pass left ≈ 120 MB of freed heap resident until the batch ended (sampled: 1.8 → 3.1 GB within one
        # batch on the default profile).
        trim_heap()
        return saved

    def scores(clean, spliced, zeroed, targets):
        """Per prediction [n]: clean cross-entropy; spliced cross-entropy and KL(clean ‖ spliced) per SAE label;
        zero-ablated cross-entropy per layer — the LM head run in chunks where the weights are (an nnsight trace: the
        module calls are ad hoc, the traced one-token input is never read)."""
        with server_errors(remote, "scoring SAE splices"), \
                model.trace(torch.tensor([[model.tokenizer.eos_token_id]]), remote=remote) as tracer:
            device = lm_head(model).weight.device
            parts = {"ce_clean": [], **{(label, name): [] for label in spliced for name in ("ce_spliced", "kl")},
                     **{(layer, "ce_zero"): [] for layer in zeroed}}
            for start in range(0, len(targets), LOGIT_CHUNK):
                rows = slice(start, start + LOGIT_CHUNK)
                chunk_targets = targets[rows].to(device)
                lp_clean = vocab_logprobs(model, clean[rows].to(device))  # once per chunk, shared by every layer
                parts["ce_clean"].append(-lp_clean.gather(1, chunk_targets)[:, 0].cpu())
                for label, hidden in spliced.items():
                    lp_spliced = vocab_logprobs(model, hidden[rows].to(device))
                    parts[label, "ce_spliced"].append(-lp_spliced.gather(1, chunk_targets)[:, 0].cpu())
                    parts[label, "kl"].append((lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1).cpu())
                for layer, hidden in zeroed.items():
                    lp_zero = vocab_logprobs(model, hidden[rows].to(device))
                    parts[layer, "ce_zero"].append(-lp_zero.gather(1, chunk_targets)[:, 0].cpu())
            per_prediction = nnsight.save({name: torch.cat(values) for name, values in parts.items()})
            tracer.stop()
        return per_prediction

    names = ("ce_clean", "ce_spliced", "ce_zero", "kl")
    per_text = {label: {name: np.zeros(len(token_ids)) for name in (*names, "n")} for label in saes}
    batches = list(length_buckets(token_ids, batch_size, model.tokenizer.pad_token_id))
    # One step per forward pass (clean, spliced per SAE, zeroed per layer) and per scoring: a batch takes minutes.
    progress = tqdm(total=len(batches) * (2 + len(saes) + len(spliced_layers)), desc=f"spliced CE ({len(saes)} SAEs, "
                    f"{len(batches)} batches)", leave=False)
    for batch in batches:
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        splice = real_token_mask(batch, token_ids, skip_first)[..., None]  # [B, S, 1]
        keep = splice[:, :-1, 0]  # predictions made at spliced positions, scored against the next token
        targets = batch.input_ids[:, 1:][keep][:, None]
        clean, below = clean_pass(inputs, keep)
        progress.update()
        spliced, zeroed = {}, {}  # [n, d] each: small beside one chunk's [chunk, vocab] log-probs
        for label in saes:
            layer = layer_of[label]
            spliced[label] = edited_pass(inputs, keep, layer, splice, below.get(layer), reconstruct[label])
            progress.update()
        for layer in spliced_layers:
            zeroed[layer] = edited_pass(inputs, keep, layer, splice, below.get(layer))
            progress.update()
        del below
        scored = scores(clean, spliced, zeroed, targets)
        progress.update()
        text = np.repeat(np.asarray(batch.rows), keep.sum(1).numpy())  # the text each prediction belongs to
        for label, sums in per_text.items():
            for name in names:
                values = (scored[name] if name == "ce_clean" else
                          scored[layer_of[label], name] if name == "ce_zero" else scored[label, name])
                sums[name] += np.bincount(text, values.double().numpy(), len(token_ids))
            sums["n"] += np.bincount(text, minlength=len(token_ids))
        trim_heap()
    progress.close()
    out = {}
    for label, sums in per_text.items():
        n_pred = int(sums["n"].sum())
        out[label] = {name: float(sums[name].sum()) / n_pred for name in names} | {"n_predictions": n_pred,
                                                                                    "per_text": sums}
    return out


# ---------------------------------------------------------------- a profile's SAEs
@functools.lru_cache(maxsize=4)  # notebook 01 needs each family's corpus several times
def sae_corpus(tokenizer, cfg: SAETrainConfig) -> TokenCorpus:
    """The offline corpus a training recipe uses: train tokens for the SAE, disjoint eval tokens for its metrics
    (shared between callers: treat it as read-only)."""
    return token_corpus(tokenizer, cfg.n_train_tokens, cfg.n_eval_tokens, cfg.context_size, cfg.seed,
                        version=cfg.corpus)


def training_recipe(profile: Profile, layer: int, corpus_manifest: dict) -> dict:
    """Everything that determines a trained SAE: model weights, layer, training config and corpus identity."""
    return {"model": profile.model.name, "model_fingerprint": model_fingerprint(profile), "layer": layer,
            "train_config": asdict(profile.sae_train),
            "corpus": {k: corpus_manifest[k] for k in ("sources", "seed", "context_size", "skip_first")}
            | {"train_hash": corpus_manifest["train"]["token_ids_hash"]}}


def shipped_sae_path(profile: Profile, layer: int) -> Path | None:
    """Committed SAE folder for `layer` if the profile ships one."""
    return REPO_ROOT / profile.shipped_sae_dir / f"layer_{layer}" if profile.shipped_sae_dir else None


def recipe_matches(path: Path, recipe: dict) -> bool:
    """True when the SAE folder at `path` records exactly this training recipe."""
    record_file = path / TRAINING_RECORD
    return record_file.is_file() and json.loads(record_file.read_text()).get("recipe_hash") == content_hash(recipe)


def profile_saes(model, profile: Profile, retrain: bool = False) -> dict[int, dict]:
    """The profile's SAE per layer → `{layer: {"sae", "path", "source", "record"}}`.

    Released SAEs are downloaded through sae-lens; local folders (`sae_path_template`) are read as they are.
    Otherwise a committed SAE whose recipe matches is reused, then the user cache; anything missing (or everything,
    with `retrain`) is trained from cached activations.
    """
    d_model = profile.model.d_model
    if profile.sae_path_template is not None:
        saes = {layer: load_local_sae(profile.sae_path(layer), profile.device) for layer in profile.sae_layers}
        for layer, sae in saes.items():
            check_sae(sae, layer, d_model)
        return {layer: {"sae": sae, "path": str(profile.sae_path(layer)), "source": "local",
                        "record": _training_record(profile.sae_path(layer))} for layer, sae in saes.items()}
    if not profile.trains_saes:
        out = {}
        for layer in profile.sae_layers:
            validate_release(profile.sae_release, profile.sae_id(layer))
        for layer in profile.sae_layers:
            sae = load_pretrained_sae(profile.sae_release, profile.sae_id(layer), profile.device)
            check_sae(sae, layer, d_model)
            out[layer] = {"sae": sae, "path": f"{profile.sae_release}/{profile.sae_id(layer)}", "source": "released",
                          "record": {}}
        return out

    cfg = profile.sae_train
    corpus = sae_corpus(model.tokenizer, cfg)
    recipes = {layer: training_recipe(profile, layer, corpus.manifest) for layer in profile.sae_layers}
    cached = {layer: cache_root() / "saes" / profile.model.name / f"layer_{layer}-{content_hash(recipe)}"
              for layer, recipe in recipes.items()}
    found: dict[int, tuple[Path, str]] = {}
    stale = []
    for layer, recipe in recipes.items():
        shipped = shipped_sae_path(profile, layer)
        if not retrain and shipped is not None and recipe_matches(shipped, recipe):
            found[layer] = (shipped, "shipped")
        elif not retrain and recipe_matches(cached[layer], recipe):
            found[layer] = (cached[layer], "cache")
        elif not retrain and shipped is not None and (shipped / TRAINING_RECORD).is_file():
            stale.append(layer)
    if stale:  # a shipped SAE exists but records another recipe: training silently would take hours
        raise ValueError(f"the shipped SAEs of {profile.name!r} at layers {stale} ({profile.shipped_sae_dir}) were "
                         f"trained with another recipe than the code now asks for (corpus, config or code changed). "
                         f"Pass retrain_sae=true (`make reproduce ARGS=\"--only 01 -p retrain_sae true\"`, hours on a "
                         f"CPU) and `make ship-saes`, or restore the recipe")
    to_train = [layer for layer in profile.sae_layers if layer not in found]
    if to_train:
        acts = collect_activations(model, profile, corpus, to_train)
        for layer in tqdm(to_train, desc="train SAEs"):
            recipe = recipes[layer]
            sae, curve = train_sae(acts["train"][layer], cfg, layer, profile.model.name,
                                   curve_acts=acts["eval"][layer][:CURVE_TOKENS])
            metrics = reconstruction_metrics(sae, acts["eval"][layer])
            record = {"recipe": recipe, "recipe_hash": content_hash(recipe), "corpus_manifest": corpus.manifest,
                      "eval": {k: v for k, v in metrics.items() if k != "firing_freq"},
                      "learning_curve": {"n_tokens": len(acts["eval"][layer][:CURVE_TOKENS]), "points": curve}}
            save_sae(sae, cached[layer], record)
            found[layer] = (cached[layer], "trained")
    out = {}
    for layer in profile.sae_layers:
        path, source = found[layer]
        sae = load_local_sae(path, profile.device)
        check_sae(sae, layer, d_model)
        out[layer] = {"sae": sae, "path": str(path), "source": source, "record": _training_record(path)}
    return out


def _training_record(path: Path) -> dict:
    """The training record beside an SAE we trained; empty for an SAE from elsewhere."""
    record = Path(path) / TRAINING_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def ship_saes(profile: Profile, saes: dict[int, dict]) -> list[Path]:
    """Copy a profile's trained SAEs into its committed folder in fp16 (≈ 5 MB each) with their training records."""
    if profile.shipped_sae_dir is None:
        raise ValueError(f"profile {profile.name!r} has no shipped_sae_dir to write to")
    written = []
    for layer, entry in saes.items():
        dest = shipped_sae_path(profile, layer)
        save_sae(entry["sae"], dest, entry["record"], dtype=torch.float16)
        written.append(dest)
    return written


METRIC_TARGETS = {"explained_variance": 0.85, "l0": 32, "dead_frac": 0.05, "ce_increase": 0.15, "ce_layers_upto": 20}
"""Quality bar for a trained SAE: explained variance ≥, mean L0 ≤, dead fraction ≤ on held-out text, and a spliced
cross-entropy increase ≤ `ce_increase` nats at layers ≤ `ce_layers_upto` (deeper splices compound less downstream
computation, so the CE bar applies to the early and middle layers)."""


def heldout_token_ids(tokenizer, profile: Profile) -> list[list[int]]:
    """Held-out texts for SAE metrics: the profile's corpus eval split without any text that one of the profile's SAE
    families trained on, so that every family is measured on the same tokens, unseen by all of them — and without any
    text that does not begin like a chat prompt: the model puts attention-sink tokens with ~150× the median residual
    norm into such a text (see `corpus._windows`), and they would dominate every variance."""
    from .models import chat_prompt, tokenize

    corpus = sae_corpus(tokenizer, profile.sae_train)
    trained = {tuple(ids) for ids in corpus.train_ids}
    for family in profile.sae_families:
        if family.sae_train != profile.sae_train:
            trained |= {tuple(ids) for ids in sae_corpus(tokenizer, family.sae_train).train_ids}
    prompt_start = tokenize(tokenizer, [chat_prompt(tokenizer, "")])[0][0]
    kept = [ids for ids in corpus.eval_ids if tuple(ids) not in trained and ids[0] == prompt_start]
    if not kept:
        raise ValueError(f"profile {profile.name!r}: every held-out text was trained on by some SAE family; "
                         f"raise sae_train.n_eval_tokens")
    return kept


def sae_metrics_table(model, profile: Profile, families: dict[str, dict[int, dict]], eval_ids: list[list[int]],
                      n_ce_tokens: int = 8000):
    """One row per SAE family and layer (`family` column, families in the order given): reconstruction metrics on the
    held-out texts `eval_ids` and spliced next-token CE/KL. Every family is read from one pass over the held-out
    residuals and one clean pass per CE batch.

    Returns `(metrics, firing)`: the metrics DataFrame and a tidy `(family, layer, latent, firing_freq)` DataFrame.
    """
    # Cached by everything the numbers depend on, so a warm rerun skips the forward passes.
    key = {"model": model_fingerprint(profile),
           "families": {name: {layer: sae_fingerprint(e["sae"]) for layer, e in saes.items()}
                        for name, saes in families.items()},
           "sources": {name: {layer: e["source"] for layer, e in saes.items()} for name, saes in families.items()},
           "eval_ids": content_hash(eval_ids), "n_ce_tokens": n_ce_tokens, "batch_size": profile.batch_size,
           "code": sha256_file(__file__)[:16]}  # any change to the metrics code recomputes them
    frames = cached_frames("sae_metrics", key, lambda: dict(zip(
        ("metrics", "firing"), _sae_metrics(model, profile, families, eval_ids, n_ce_tokens))))
    return frames["metrics"], frames["firing"]


def _sae_metrics(model, profile: Profile, families: dict[str, dict[int, dict]], eval_ids: list[list[int]],
                 n_ce_tokens: int):
    """`sae_metrics_table` without the cache."""
    import pandas as pd

    skip_first = SKIP_FIRST  # as in training: the attention sink is neither encoded nor spliced
    entries = {(family, layer): entry for family, saes in families.items() for layer, entry in saes.items()}
    # Reconstruction sums per batch of residuals, every SAE of every family in one read: no [n_tokens, d] array.
    sums = {label: ReconstructionSums(entry["sae"], len(eval_ids)) for label, entry in entries.items()}
    layers = sorted({layer for _, layer in entries})
    for batch, resid in residual_batches(model, eval_ids, layers, profile.batch_size, profile.remote,
                                         "held-out activations"):
        real = real_token_mask(batch, eval_ids, skip_first)
        text = np.repeat(np.asarray(batch.rows), real.sum(1).numpy())  # row-major, as the mask flattens
        for (_, layer), layer_sums in sums.items():
            layer_sums.add(resid[layer][real], text)
    ce_ids, n_tok = [], 0
    for ids in eval_ids:
        if n_tok >= n_ce_tokens:
            break
        ce_ids.append(ids)
        n_tok += len(ids) - skip_first
    ce = spliced_cross_entropy(model, {label: e["sae"] for label, e in entries.items()}, ce_ids,
                               batch_size=profile.batch_size, skip_first=skip_first, remote=profile.remote,
                               layers={label: label[1] for label in entries})
    rows, firing = [], []
    for (family, layer), entry in entries.items():
        sae = entry["sae"]
        rec = sums[family, layer].metrics()
        score = ce[family, layer]
        rows.append({"family": family, "layer": layer, "d_sae": sae.cfg.d_sae, "k": getattr(sae.cfg, "k", None),
                     "n_tokens": rec["n_tokens"], "n_texts": len(eval_ids), "l0": rec["l0"],
                     "dead_frac": rec["dead_frac"], "ce_clean": score["ce_clean"],
                     "ce_spliced": score["ce_spliced"], "ce_zero_ablated": score["ce_zero"],
                     "kl": score["kl"], "n_ce_predictions": score["n_predictions"],
                     "n_ce_texts": len(ce_ids), "source": entry["source"]}
                    | _metric_cis(rec["per_text"], score["per_text"]))
        firing.append(pd.DataFrame({"family": family, "layer": layer, "latent": range(sae.cfg.d_sae),
                                    "firing_freq": rec["firing_freq"]}))
    columns = ["family", "layer", "d_sae", "k", "n_tokens", "explained_variance", "l0", "dead_frac", "ce_clean",
               "ce_spliced", "ce_zero_ablated", "kl", "n_ce_predictions", "source", "ce_increase", "ce_recovered"]
    metrics = pd.DataFrame(rows)
    metrics = metrics[columns + [c for c in metrics if c not in columns]]
    ce_ok = ((metrics["ce_increase"] <= METRIC_TARGETS["ce_increase"])
             | (metrics["layer"] > METRIC_TARGETS["ce_layers_upto"]))
    metrics["meets_targets"] = ((metrics["explained_variance"] >= METRIC_TARGETS["explained_variance"])
                                & (metrics["l0"] <= METRIC_TARGETS["l0"])
                                & (metrics["dead_frac"] <= METRIC_TARGETS["dead_frac"]) & ce_ok)
    return metrics, pd.concat(firing, ignore_index=True)


def _metric_cis(reconstruction: dict, ce: dict) -> dict:
    """Explained variance, CE increase and CE loss recovered with 95 % CIs, texts resampled (ratios of per-text sums)."""
    from .stats import ratio_ci

    unexplained, low, high = ratio_ci(reconstruction["sq_err"], reconstruction["deviation"])
    row = {"explained_variance": 1 - unexplained, "explained_variance_ci_low": 1 - high,
           "explained_variance_ci_high": 1 - low}
    for name, numer, denom in (("ce_increase", ce["ce_spliced"] - ce["ce_clean"], ce["n"]),
                               ("ce_recovered", ce["ce_zero"] - ce["ce_spliced"], ce["ce_zero"] - ce["ce_clean"])):
        row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = ratio_ci(numer, denom)
    return row


def load_recorded_sae(entry: dict, device: str = "cpu"):
    """Load the SAE a run manifest entry names (`{"path", "source", "sha256"}`): a released id, or a local folder whose
    weights must still hash to what the SAE loading stage recorded."""
    if entry["source"] == "released":
        release, sae_id = entry["path"].split("/", 1)
        return load_pretrained_sae(release, sae_id, device)
    weights = Path(entry["path"]) / "sae_weights.safetensors"
    if entry.get("sha256") and weights.is_file() and sha256_file(weights) != entry["sha256"]:
        raise ValueError(f"{weights} changed since notebook 01 recorded it in saes.json (sha256 "
                         f"{entry['sha256'][:12]}…, now {sha256_file(weights)[:12]}…): rerun "
                         f"notebooks/01_sae_loading.ipynb for this output_dir, then the later stages")
    return load_local_sae(entry["path"], device)


def sae_fingerprint(sae) -> str:
    """Short hash of an SAE's weights (cache keys for generations under interventions that use it)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
