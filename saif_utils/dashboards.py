"""Latent dashboards: for each selected latent, the held-out contexts it fires on most (tokens shaded by activation),
its activation histogram, the tokens its decoder direction promotes, and its consistency by variant language and kind
— one self-contained HTML page per task (Jinja2; no script, no network), as Neuronpedia shows released SAEs."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, select_autoescape

from .activations import encode
from .corpus import CORPUS_SKIP_FIRST
from .io import atomic_path, cached_json, content_hash
from .models import read_residual_tokens, span_token_texts


@dataclass(frozen=True)
class DashboardConfig:
    """What each latent's card holds."""

    n_contexts: int = 8
    """Top-activating contexts per latent, each from a different held-out text."""
    radius: int = 12
    """Tokens shown before the peak token (and half as many after it)."""
    n_bins: int = 20
    """Histogram bins over the latent's non-zero activations."""
    max_tokens: int = 20_000
    """Held-out tokens read (whole texts, in corpus order, until this many)."""


def held_out_budget(token_ids: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """The first texts of `token_ids` whose lengths sum to at most `max_tokens` (at least one)."""
    kept, total = [], 0
    for ids in token_ids:
        if kept and total + len(ids) > max_tokens:
            break
        kept.append(list(ids))
        total += len(ids)
    return kept


def latent_cards(acts: np.ndarray, token_ids: Sequence[Sequence[int]], skip_first: int, latents: Sequence[int],
                 span_text: Callable[[Sequence[int]], list[str]], cfg: DashboardConfig) -> dict[int, dict]:
    """Per latent: top contexts (tokens with their activations, peak marked), histogram of non-zero activations and
    firing frequency, from `acts` `[n_tokens, k]` whose rows are the texts' tokens after their first `skip_first`;
    `span_text` gives the text each token of a context adds (`models.span_token_texts`)."""
    lengths = [len(ids) - skip_first for ids in token_ids]
    doc_of = np.repeat(np.arange(len(token_ids)), lengths)
    pos_of = np.concatenate([np.arange(skip_first, len(ids)) for ids in token_ids])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cards = {}
    for j, latent in enumerate(latents):
        col = acts[:, j]
        per_doc_max = np.maximum.reduceat(col, starts)
        best_docs = [d for d in np.argsort(-per_doc_max, kind="stable")[: cfg.n_contexts] if per_doc_max[d] > 0]
        contexts = []
        for doc in best_docs:
            rows = np.flatnonzero(doc_of == doc)
            peak = rows[np.argmax(col[rows])]
            lo, hi = max(rows[0], peak - cfg.radius), min(rows[-1], peak + cfg.radius // 2)
            texts = span_text(token_ids[doc][pos_of[lo]:pos_of[hi] + 1])
            contexts.append({"max": float(col[peak]), "tokens": [
                {"text": text, "act": float(col[r]), "peak": bool(r == peak)}
                for r, text in zip(range(lo, hi + 1), texts)]})
        fired = col[col > 0]
        counts, edges = np.histogram(fired, bins=cfg.n_bins) if len(fired) else (np.zeros(0), np.zeros(0))
        cards[int(latent)] = {"contexts": contexts, "freq": float(len(fired) / max(len(col), 1)),
                              "hist_counts": counts.tolist(), "hist_edges": edges.tolist()}
    return cards


def all_layer_cards(ctx, latents: dict[int, list[int]], token_ids: list[list[int]], cfg: DashboardConfig
                    ) -> dict[int, dict[int, dict]]:
    """`latent_cards` for the listed latents of each SAE layer → `{layer: {latent: card}}`, the residuals of every
    layer read in one pass; cached by the model, SAEs, latents, texts and settings."""
    skip_first = CORPUS_SKIP_FIRST[ctx.profile.sae_train.corpus]
    layers = sorted(latents)

    def compute() -> dict:
        resid = read_residual_tokens(ctx.model, token_ids, layers, skip_first=skip_first, batch_size=ctx.batch_size,
                                     remote=ctx.remote, desc="dashboard contexts")
        span_text = functools.partial(span_token_texts, ctx.tokenizer)
        return {str(layer): {str(k): v for k, v in latent_cards(
            encode(ctx.saes[layer], resid.pop(layer), latents=latents[layer]).numpy(), token_ids, skip_first,
            latents[layer], span_text, cfg).items()} for layer in layers}

    # "text": how context tokens are decoded (streamed, so split multi-byte characters show whole) — in the key so
    # that pages cached under the earlier token-by-token decoding are not reused.
    key = {"model": ctx.model_key, "saes": {str(layer): ctx.sae_keys[layer] for layer in layers}, "text": "streamed",
           "latents": {str(layer): list(map(int, latents[layer])) for layer in layers},
           "ids": content_hash(token_ids), "skip_first": skip_first, "config": cfg.__dict__}
    entry = cached_json("dashboards", key, compute)
    return {int(layer): {int(k): v for k, v in cards.items()} for layer, cards in entry.items()}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;line-height:1.4;color:#222}
.card{border:1px solid #ccc;border-radius:6px;padding:.8em 1em;margin:1em 0}
.ctx{font-family:ui-monospace,monospace;font-size:.85em;white-space:pre-wrap;margin:.15em 0}
.tok{border-radius:2px}.peak{outline:1px solid #b00}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
.muted{color:#666;font-size:.85em}nav a{margin-right:1em}
</style></head><body>
<h1>{{ title }}</h1>
<p class="muted">{{ intro }}</p>
<nav>{% for layer in layers %}<a href="#layer-{{ layer.layer }}">layer {{ layer.layer }}</a>{% endfor %}</nav>
{% for layer in layers %}
<h2 id="layer-{{ layer.layer }}">Layer {{ layer.layer }}</h2>
{% for c in layer.cards %}
<div class="card" id="L{{ layer.layer }}-{{ c.latent }}">
<h3>#{{ c.rank }} · latent {{ c.latent }}{% if c.url %} · <a href="{{ c.url }}">Neuronpedia</a>{% endif %}</h3>
<p class="muted">selected at {{ c.positions }} · weight {{ "%.3g"|format(c.weight) }} · consistency
{{ "%.2f"|format(c.consistency) }} · fires on {{ "%.2f"|format(100 * c.freq) }} % of {{ n_tokens }} held-out tokens</p>
<p><b>Promotes</b> {{ c.top_tokens }}<br><b>Suppresses</b> {{ c.bottom_tokens }}</p>
{% if c.hist_counts %}<svg width="320" height="70" role="img" aria-label="activation histogram">
{% set top = c.hist_counts|max %}{% for n in c.hist_counts %}
<rect x="{{ loop.index0 * 16 }}" y="{{ 60 - 58 * n / top }}" width="14" height="{{ 58 * n / top }}" fill="#e07b00"><title>{{ n }} tokens in [{{ "%.3g"|format(c.hist_edges[loop.index0]) }}, {{ "%.3g"|format(c.hist_edges[loop.index]) }})</title></rect>
{% endfor %}<text x="0" y="69" font-size="9">{{ "%.3g"|format(c.hist_edges[0]) }}</text>
<text x="320" y="69" font-size="9" text-anchor="end">{{ "%.3g"|format(c.hist_edges[-1]) }}</text></svg>{% endif %}
{% for ctx in c.contexts %}<div class="ctx">{% for t in ctx.tokens %}<span class="tok{% if t.peak %} peak{% endif %}"
 style="background:rgba(224,123,0,{{ "%.2f"|format(t.act / c.scale) }})" title="{{ "%.3g"|format(t.act) }}">{{ t.text }}</span>{% endfor %}</div>{% endfor %}
{% if c.breakdown %}<table><tr><th>language</th><th>kind</th><th>pairs</th><th>consistency</th><th>fires (with instr.)</th></tr>
{% for b in c.breakdown %}<tr><td>{{ b.language }}</td><td>{{ b.kind }}</td><td>{{ b.n_pairs }}</td>
<td>{{ "%.2f"|format(b.consistency) }}</td><td>{{ "%.2f"|format(b.freq_pos) }}</td></tr>{% endfor %}</table>{% endif %}
</div>
{% endfor %}{% endfor %}
</body></html>
"""


INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Latent dashboards</title></head><body>
<h1>Latent dashboards</h1><ul>{% for task, name in pages.items() %}<li><a href="{{ name }}">{{ task }}</a></li>
{% endfor %}</ul></body></html>
"""


def _environment() -> Environment:
    return Environment(autoescape=select_autoescape(default=True, default_for_string=True))


def render_page(title: str, intro: str, layers: list[dict], n_tokens: int) -> str:
    """One task's dashboard page from its layers' cards (each card: rank, latent, positions, weight, consistency,
    freq, top/bottom tokens, url, histogram, contexts, breakdown)."""
    return _environment().from_string(PAGE).render(title=title, intro=intro, layers=layers, n_tokens=n_tokens)


def task_layers(task_selected: pd.DataFrame, proximity: pd.DataFrame, breakdown: pd.DataFrame,
                cards: dict[int, dict[int, dict]], urls: dict[int, str]) -> list[dict]:
    """The cards of one task's selected latents per layer (rank order, both positions merged)."""
    # Every latent's language × kind breakdown in one aggregation, looked up per card (one per card took seconds).
    breakdowns: dict[tuple[int, int], list[dict]] = {}
    for rec in (breakdown.groupby(["layer", "latent", "language", "kind"], as_index=False)
                .agg(n_pairs=("n_pairs", "first"), consistency=("consistency", "mean"), freq_pos=("freq_pos", "mean"))
                .to_dict("records")):
        breakdowns.setdefault((int(rec.pop("layer")), int(rec.pop("latent"))), []).append(rec)
    layers = []
    for layer, group in task_selected.groupby("layer"):
        merged = (group.sort_values(["rank", "position"]).groupby("latent", sort=False)
                  .agg(rank=("rank", "min"), weight=("weight", "first"), consistency=("consistency", "first"),
                       positions=("position", lambda p: " and ".join(sorted(set(p))))).reset_index()
                  .sort_values("rank"))
        lens = proximity[(proximity["layer"] == layer) & ~proximity["control"]].drop_duplicates("latent") \
            .set_index("latent")
        rows = []
        for rec in merged.to_dict("records"):
            latent, card = int(rec["latent"]), cards[layer][int(rec["latent"])]
            peak = max((t["act"] for c in card["contexts"] for t in c["tokens"]), default=0.0)
            rows.append(rec | card | {
                "latent": latent, "scale": peak or 1.0, "url": f"{urls[layer]}/{latent}" if layer in urls else None,
                "top_tokens": lens.at[latent, "top_tokens"] if latent in lens.index else "",
                "bottom_tokens": lens.at[latent, "bottom_tokens"] if latent in lens.index else "",
                "breakdown": breakdowns.get((int(layer), latent), [])})
        layers.append({"layer": int(layer), "cards": rows})
    return layers


def write_dashboards(ctx, selected: pd.DataFrame, proximity: pd.DataFrame, breakdown: pd.DataFrame, out: Path,
                     k: int = 15, cfg: DashboardConfig = DashboardConfig()) -> dict[str, Path]:
    """One page per task for its top-`k` latents (content contrast, both positions) at every SAE layer, plus an
    index; → task → page path."""
    from .saes import heldout_token_ids, neuronpedia_ids

    chosen = selected[(selected["contrast"] == "content") & (selected["rank"] <= k)]
    if chosen.empty:
        raise ValueError("no selected latents for the dashboards: run notebook 02 first")
    token_ids = held_out_budget(heldout_token_ids(ctx.tokenizer, ctx.profile), cfg.max_tokens)
    n_tokens = sum(len(ids) for ids in token_ids)
    cards = all_layer_cards(ctx, {int(layer): sorted(set(group["latent"].astype(int)))
                                  for layer, group in chosen.groupby("layer")}, token_ids, cfg)
    urls = {layer: f"https://www.neuronpedia.org/{np_id}" for layer, np_id in neuronpedia_ids(ctx.profile).items()}
    folder = out / "dashboards"
    folder.mkdir(parents=True, exist_ok=True)
    pages = {}
    for task, group in chosen.groupby("task"):
        page = folder / f"{task.replace(':', '_')}.html"
        intro = (f"{ctx.profile.model.name}, SAE family {ctx.profile.sae_family or ctx.profile.sae_release}: the top-{k} "
                 f"latents notebook 02 selected for {task} (content contrast), with their top-activating contexts "
                 f"among {n_tokens} held-out tokens ({len(token_ids)} texts no SAE trained on).")
        with atomic_path(page) as tmp:
            tmp.write_text(render_page(f"Latent dashboards — {task}", intro,
                                       task_layers(group, proximity, breakdown, cards, urls), n_tokens))
        pages[task] = page
    with atomic_path(folder / "index.html") as tmp:
        tmp.write_text(_environment().from_string(INDEX).render(pages={t: p.name for t, p in pages.items()}))
    return pages
