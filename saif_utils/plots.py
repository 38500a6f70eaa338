"""Every figure of the study, each a function of the tables a stage wrote, on two shared primitives: dots and lines
with their 95 % bootstrap intervals."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from .io import save_figure


def ci_dotplot(ax, table: pd.DataFrame, value: str, label: str, hue: str, hue_order: Sequence[str] | None = None,
               low: str | None = None, high: str | None = None, palette: str | dict = "Set2") -> None:
    """Horizontal dots at `value` with error bars from `low`/`high` (default `<stem>_ci_low/_ci_high` where `value`
    is `<stem>_acc`, `<stem>_rate` or `<stem>`), one row per `label`, dodged by `hue`; `palette` is a seaborn name or {hue: colour}."""
    stem = value.removesuffix("_acc").removesuffix("_rate")
    low, high = low or f"{stem}_ci_low", high or f"{stem}_ci_high"
    labels = list(dict.fromkeys(table[label]))
    hues = list(hue_order or dict.fromkeys(table[hue]))
    colours = [palette[h] for h in hues] if isinstance(palette, dict) else sns.color_palette(palette, len(hues))
    offsets = np.linspace(-0.25, 0.25, len(hues)) if len(hues) > 1 else [0.0]
    for offset, name, colour in zip(offsets, hues, colours):
        sub = table[table[hue] == name].set_index(label).reindex(labels)
        y = np.arange(len(labels)) + offset
        err = np.vstack([sub[value] - sub[low], sub[high] - sub[value]]).clip(min=0)
        ax.errorbar(sub[value], y, xerr=err, fmt="o", ms=4, lw=1, color=colour, label=name)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def ci_lineplot(ax, table: pd.DataFrame, x: str, value: str, hue: str, palette: str = "tab10") -> None:
    """One line per `hue` over `x` with a shaded 95 % interval (`<stem>_ci_low/_ci_high`, as in `ci_dotplot`)."""
    stem = value.removesuffix("_acc").removesuffix("_rate")
    hues = list(dict.fromkeys(table[hue]))
    for name, colour in zip(hues, sns.color_palette(palette, len(hues))):
        sub = table[table[hue] == name].sort_values(x)
        ax.plot(sub[x], sub[value], "o-", ms=3, color=colour, label=str(name))
        if f"{stem}_ci_low" in sub:
            ax.fill_between(sub[x], sub[f"{stem}_ci_low"], sub[f"{stem}_ci_high"], color=colour, alpha=0.15)
    ax.grid(alpha=0.3)


def show(fig, dest) -> None:
    """Save a figure atomically (PNG, 150 dpi) and display it."""
    import matplotlib.pyplot as plt

    save_figure(fig, dest)
    plt.show()


# ---------------------------------------------------------------- SAE quality
def latent_firing(firing: pd.DataFrame, model_name: str):
    """Histogram of log10 firing frequency per latent, one line per layer (dead latents sit at −6)."""
    import matplotlib.pyplot as plt

    plot_df = firing.assign(log10_freq=np.log10(firing["firing_freq"].clip(lower=1e-6)))
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.histplot(data=plot_df, x="log10_freq", hue="layer", element="step", fill=False, bins=60, ax=ax,
                 palette="viridis")
    ax.set(xlabel="log10 firing frequency on held-out tokens (dead latents at -6)", ylabel="latents",
           title=f"{model_name}: SAE latent firing frequencies")
    return fig


def sae_quality(metrics: pd.DataFrame, targets: dict):
    """Explained variance, spliced cross-entropy increase and CE loss recovered per layer with their 95 % CIs (texts
    resampled), one colour per SAE family (`family` column; a single family is one colour), dashed lines at the targets."""
    import matplotlib.pyplot as plt

    family = metrics.get("family", pd.Series("", index=metrics.index)).fillna("").astype(str)  # "" read back is NaN
    has_family = family.ne("").any()
    names = (family + " (" if has_family else "") + metrics["d_sae"].map("{:,}".format) + " latents, k " \
        + metrics["k"].astype(str) + (")" if has_family else "")
    plot_df = metrics.assign(sae=names, layer_label="layer " + metrics["layer"].astype(str)).sort_values("layer")
    n_rows = plot_df["layer"].nunique() * plot_df["sae"].nunique()
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.5, 0.35 * n_rows + 2.2)), sharey=True)
    panels = (("explained_variance", f"explained variance (n = {int(metrics['n_texts'].iloc[0])} texts, "
               f"{int(metrics['n_tokens'].iloc[0]):,} tokens)", targets["explained_variance"]),
              ("ce_increase", f"CE increase, SAE spliced in, nats (n = {int(metrics['n_ce_texts'].iloc[0])} texts, "
               f"{int(metrics['n_ce_predictions'].iloc[0]):,} predictions)", targets["ce_increase"]),
              ("ce_recovered", "CE loss recovered (vs zero-ablating the layer)", None))
    for ax, (column, title, target) in zip(axes, panels):
        ci_dotplot(ax, plot_df, column, "layer_label", "sae", palette="Set2")
        if target is not None:
            ax.axvline(target, ls="--", c="k", lw=1)
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle("SAE quality on the same held-out text, 95 % bootstrap CIs over texts (dashed: targets)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def sae_learning_curves(curves: pd.DataFrame):
    """Held-out explained variance over training samples, one line per layer (the training records' learning curves)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=curves, x="samples", y="explained_variance", hue="layer", marker="o", palette="viridis", ax=ax)
    ax.set(xlabel="training samples (activations seen)", ylabel="explained variance",
           title=f"SAE learning curves (held-out, n = {int(curves['n_tokens'].iloc[0]):,} tokens)")
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------- feature discovery
def consistent_latents(summary: pd.DataFrame):
    """Latents with consistency ≥ 0.5 per task and layer (content contrast)."""
    import matplotlib.pyplot as plt

    main = summary[summary["contrast"] == "content"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.barplot(data=main, x="task", y="n_consistent", hue="layer", ax=ax, palette="viridis", errorbar=None)
    ax.set(ylabel="latents with consistency ≥ 0.5",
           title="Instruction-consistent latents per task and layer (content contrast)")
    ax.tick_params(axis="x", rotation=30)
    return fig


def latents_by_language(breakdown: pd.DataFrame, task: str, layer: int, position: str):
    """Consistency of a selection's top latents by the language of the instruction (one row per latent), or None
    when the selection is empty."""
    import matplotlib.pyplot as plt

    bd = breakdown[(breakdown["task"] == task) & (breakdown["layer"] == layer) & (breakdown["position"] == position)
                   & (breakdown["contrast"] == "content")]
    if bd.empty:
        return None
    heat = bd.pivot_table(index="latent", columns="language", values="consistency")
    n_pairs = bd.groupby("language")["n_pairs"].first()
    heat.columns = [f"{lang}\n(n={n_pairs[lang]})" for lang in heat.columns]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(heat) + 1.5))
    sns.heatmap(heat, vmin=0, vmax=1, cmap="mako", annot=True, fmt=".2f", ax=ax, cbar_kws={"label": "consistency"})
    ax.set(title=f"{task}, layer {layer}, {position}: top latents by variant language")
    return fig


def consistency_vs_sensitivity(latent_scores: pd.DataFrame, task: str, position: str, top_k: int):
    """Every latent that fires on a positive: effect size against consistency, one panel per layer, selected in red."""
    sc = latent_scores[(latent_scores["task"] == task) & (latent_scores["position"] == position)
                       & (latent_scores["contrast"] == "content")]
    sc = sc.assign(selected=(sc["rank"] <= top_k) & (sc["score"] > 0))
    grid = sns.relplot(data=sc[sc["freq_pos"] > 0], x="effect_size", y="consistency", hue="selected", col="layer",
                       palette={True: "tab:red", False: "tab:gray"}, alpha=0.6, s=12, height=3, aspect=1)
    grid.set_axis_labels("sensitivity (effect size)", "consistency")
    grid.figure.suptitle(f"{task}: every latent that fires on a positive (n = {int(sc['n_pairs'].iloc[0])} pairs)",
                         y=1.04)
    return grid.figure


# ---------------------------------------------------------------- semantic proximity
def cosine_selected_vs_random(proximity: pd.DataFrame):
    """Cosine of decoder directions with the instruction representation: selected latents against random ones."""
    import matplotlib.pyplot as plt

    view = proximity[proximity["contrast"] == "content"].assign(
        which=lambda d: d["control"].map({False: "selected", True: "random"}))
    fig, ax = plt.subplots(figsize=(10, 4))
    sns.boxplot(data=view, x="task", y="cos_instruction", hue="which", ax=ax,
                palette={"selected": "tab:red", "random": "tab:gray"})
    ax.axhline(0, c="k", lw=0.8)
    ax.set(ylabel="cos(decoder direction, instruction representation)",
           title=f"Selected latents vs random control (all layers; n = {len(view) // 2} each)")
    ax.tick_params(axis="x", rotation=30)
    return fig


def task_overlap(overlap: pd.DataFrame):
    """Task × task Jaccard of the top-k selections, one heatmap per layer (post position, content contrast)."""
    import matplotlib.pyplot as plt

    layers = sorted(overlap["layer"].unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        m = overlap[(overlap["layer"] == layer) & (overlap["position"] == "post") & (overlap["contrast"] == "content")]
        sns.heatmap(m.pivot(index="task_a", columns="task_b", values="jaccard"), vmin=0, vmax=1, cmap="rocket_r",
                    annot=True, fmt=".2f", ax=ax, cbar=False)
        ax.set(title=f"layer {layer}", xlabel="", ylabel="")
    return fig


# ---------------------------------------------------------------- causal ablation
def ablation(table: pd.DataFrame, k: int):
    """Strict and loose accuracy per task, layer and ablation condition, and the drop in log-prob of the unablated
    response, all with 95 % bootstrap CIs."""
    import matplotlib.pyplot as plt

    rows = table.assign(label=lambda d: d["task"] + " · L" + d["layer"].astype(str) + " (n=" + d["n"].astype(str) + ")")
    conditions = list(dict.fromkeys(rows["condition"]))
    colours = dict(zip(conditions, sns.color_palette("Set2", len(conditions))))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * rows["label"].nunique() + 2), sharey=True)
    for ax, value in zip(axes, ["strict_acc", "loose_acc"]):
        ci_dotplot(ax, rows, value, "label", "condition", conditions, palette=colours)
        ax.set(xlabel=value.replace("_acc", " accuracy"), xlim=(-0.05, 1.05))
    ci_dotplot(axes[2], rows[rows["condition"] != "none"], "logprob_drop", "label", "condition",
               [c for c in conditions if c != "none"], palette=colours)
    axes[2].axvline(0, color="black", lw=0.8)
    axes[2].set(xlabel="drop in log-prob of the unablated response (nats/token)")
    axes[0].legend(title="ablated", loc="upper left", bbox_to_anchor=(0, -0.12), ncol=3)
    fig.suptitle(f"Prompted instruction following when the top-{k} latents are removed (95 % bootstrap CIs)")
    return fig


# ---------------------------------------------------------------- steering
def steering_results(results: pd.DataFrame, methods: Sequence[str]):
    """Strict and loose accuracy (degenerate responses fail) of every method per task on test, and the share of
    degenerate responses."""
    import matplotlib.pyplot as plt

    rows = results.assign(label=lambda d: d["task"] + " (n=" + d["n"].astype(str) + ")")
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * rows["label"].nunique() + 2.5), sharey=True)
    for ax, value in zip(axes, ["strict_acc", "loose_acc"]):
        ci_dotplot(ax, rows, value, "label", "method", methods, palette="tab10")
        ax.set(xlabel=value.replace("_acc", " accuracy") + " (degenerate = fail)", xlim=(-0.05, 1.05))
    ci_dotplot(axes[2], rows, "degenerate_rate", "label", "method", methods, palette="tab10")
    axes[2].set(xlabel="share of degenerate responses (loops, floods, gibberish)", xlim=(-0.05, 1.05))
    axes[0].legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncol=6, fontsize=8)
    fig.suptitle("Steering vs baselines on the test passages (95 % bootstrap CIs)")
    return fig


def recovered_share(results: pd.DataFrame, methods: Sequence[str], xlim: tuple[float, float] = (-0.5, 2.0)):
    """Share of prompting's gain over no instruction that each steering method recovers on test (strict and loose,
    paired 95 % bootstrap CIs, clipped to `xlim`); a task where prompting does not beat no instruction has no share."""
    import matplotlib.pyplot as plt

    steered = [m for m in methods if m not in ("no_instruction", "prompting")]
    rows = results[results["method"].isin(steered)]
    undefined = rows.groupby("task", sort=False)["strict_recovered"].apply(lambda s: s.isna().all())
    rows = rows.assign(label=rows["task"].map(lambda t: f"{t} (undefined)" if undefined[t] else t)
                       + " (n=" + rows["n"].astype(str) + ")")
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.6 * rows["label"].nunique() + 2.5), sharey=True)
    for ax, score in zip(axes, ("strict", "loose")):
        clipped = rows.assign(**{c: rows[c].clip(*xlim) for c in
                                 (f"{score}_recovered", f"{score}_recovered_ci_low", f"{score}_recovered_ci_high")})
        ci_dotplot(ax, clipped, f"{score}_recovered", "label", "method", steered, palette="tab10")
        for x, style in ((0, "-"), (1, "--")):
            ax.axvline(x, color="grey", lw=0.8, ls=style)
        ax.set(xlabel=f"{score}: share of prompting's gain (0 = no instruction, 1 = prompting)", xlim=xlim)
    axes[0].legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncol=6, fontsize=8)
    fig.suptitle("Steering read against prompting on the test passages (paired 95 % bootstrap CIs; undefined where "
                 "prompting does not beat no instruction)")
    return fig


def decomposition(table: pd.DataFrame):
    """Per task at SAIF's layer: the share of diff-in-means' squared norm inside the span of k decoder directions
    (SAIF's top k, and the k that reconstruct it best), and val loose accuracy when steering with diff-in-means
    projected on each span (the dashed line: diff-in-means itself, its CI shaded)."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(table["task"]))
    spans = table[table["span"] != "diff_in_means"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.4 * len(tasks), 6.5), sharex=True, squeeze=False)
    for col, task in enumerate(tasks):
        sub, full = spans[spans["task"] == task], table[(table["task"] == task) & (table["span"] == "diff_in_means")]
        for span, colour in zip(("saif", "best"), ("tab:blue", "tab:orange")):
            rows = sub[sub["span"] == span].sort_values("k")
            axes[0, col].plot(rows["k"], rows["norm_share"], "o-", ms=3, color=colour, label=f"{span} span")
        ci_lineplot(axes[1, col], sub.assign(series=sub["span"] + " span"), "k", "loose_acc", "series")
        if len(full):
            row = full.iloc[0]
            axes[1, col].axhline(row["loose_acc"], color="grey", ls="--", lw=1, label="diff-in-means")
            axes[1, col].axhspan(row["loose_ci_low"], row["loose_ci_high"], color="grey", alpha=0.1)
        first = sub.iloc[0]
        axes[0, col].set(title=f"{task}\nL{int(first['layer'])}, {first['position']} · cos(SAIF, DiM) "
                               f"{first['cosine_saif_dim']:.2f}", ylim=(-0.02, 1.02),
                         ylabel="share of ‖diff-in-means‖²" if col == 0 else "")
        ks = sorted(int(k) for k in sub["k"].unique())
        axes[1, col].set(xscale="log", xlabel="k (decoder directions)", ylim=(-0.05, 1.05),
                         ylabel=f"loose accuracy, val (n={int(first['n'])})" if col == 0 else "")
        axes[1, col].set_xticks(ks, [str(k) for k in ks])
        axes[1, col].minorticks_off()
        axes[0, col].grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    axes[1, -1].legend(fontsize=8)
    fig.suptitle("How much of diff-in-means the SAE's decoder directions carry, and does SAIF pick them?")
    return fig


def accuracy_vs_k(k_rows: pd.DataFrame):
    """SAIF's val accuracy over k, one line per task with its 95 % CI."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
    for ax, value in zip(axes, ["strict_acc", "loose_acc"]):
        ci_lineplot(ax, _with_n(k_rows, "task"), "k", value, "task")
        ax.set(xlabel="k (top latents in the vector)", ylabel=value.replace("_acc", " accuracy") + " (val)")
    axes[1].legend(fontsize=8)
    return fig


def accuracy_fluency_vs_alpha(alpha_rows: pd.DataFrame):
    """Strict, loose and degenerate rate over α, one panel column per task and one line per layer."""
    import matplotlib.pyplot as plt

    rows = alpha_rows.assign(series=lambda d: "L" + d["layer"].astype(int).astype(str))
    tasks = list(dict.fromkeys(rows["task"]))
    fig, axes = plt.subplots(3, len(tasks), figsize=(3.4 * len(tasks), 8), sharex=True, squeeze=False)
    for col, task in enumerate(tasks):
        sub = rows[rows["task"] == task]
        for row, value in enumerate(["strict_acc", "loose_acc", "degenerate_rate"]):
            ci_lineplot(axes[row, col], sub, "alpha", value, "series", palette="viridis")
            axes[row, col].set(ylabel=value.replace("_acc", " acc").replace("_", " ") if col == 0 else "",
                               xlabel="α" if row == 2 else "")
        axes[0, col].set_title(f"{task} (n={int(sub['n'].iloc[0])})")
    axes[0, -1].legend(title="layer", fontsize=8)
    return fig


def layer_comparison(layer_rows: pd.DataFrame):
    """Loose accuracy (degenerate = fail) on val over layers, SAIF against diff-in-means, one panel per task."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(layer_rows["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = layer_rows[layer_rows["task"] == task]
        ci_lineplot(ax, sub, "layer", "loose_acc", "method")
        ax.set(title=f"{task} (n={int(sub['n'].iloc[0])})", xlabel="layer",
               ylabel="loose accuracy, degenerate = fail (val)")
    axes[0, -1].legend(fontsize=8)
    return fig


def pre_vs_post(pairs: pd.DataFrame):
    """Loose accuracy on val with latents / directions extracted from post against pre placements."""
    import matplotlib.pyplot as plt

    labelled = pairs.assign(label=pairs["task"] + " · " + pairs["method"] + " (n=" + pairs["n"].astype(str) + ")")
    fig, ax = plt.subplots(figsize=(7, 0.5 * labelled["label"].nunique() + 1.5))
    ci_dotplot(ax, labelled, "loose_acc", "label", "position")
    ax.set(xlabel="loose accuracy (val)", xlim=(-0.05, 1.05))
    ax.legend(title="extracted from")
    return fig


def _with_n(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """`rows` with `column` labelled by its sample size, e.g. 'summarize (n=16)'."""
    return rows.assign(**{column: rows[column] + " (n=" + rows["n"].astype(int).astype(str) + ")"})


# ---------------------------------------------------------------- calibration
def calibration_rounds(history: pd.DataFrame):
    """Validation (solid, shaded: 95 % CI over targets) NLL of the target responses per calibration round, and train
    NLL (dashed) from the start to the kept round (the two rounds it is evaluated at), one panel per calibrating
    method, one colour per task; round 0 is SAIF's vector, the ringed dot the round kept."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = history[history["calibrated"]]
    methods = list(dict.fromkeys(done["method"]))
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(6 * max(len(methods), 1), 4), squeeze=False)
    tasks = list(dict.fromkeys(done["task"]))
    colours = dict(zip(tasks, sns.color_palette("tab10", len(tasks))))
    for ax, method in zip(axes[0], methods):
        for task in tasks:
            rows = done[(done["method"] == method) & (done["task"] == task)].sort_values("round")
            if rows.empty:
                continue
            n_train, n_val = int(rows["n_train_targets"].iloc[0]), int(rows["n_val_targets"].iloc[0])
            ax.plot(rows["round"], rows["val_nll"], "o-", ms=3, color=colours[task],
                    label=f"{task} (n = {n_train} train / {n_val} val)")
            ax.fill_between(rows["round"], rows["val_nll_ci_low"], rows["val_nll_ci_high"], color=colours[task],
                            alpha=0.12, lw=0)
            train = rows.dropna(subset=["train_nll"])
            ax.plot(train["round"], train["train_nll"], "x--", color=colours[task], alpha=0.6)
            kept = rows[rows["best"]]
            ax.scatter(kept["round"], kept["val_nll"], s=80, facecolors="none", edgecolors=colours[task])
        ax.set(title=method, xlabel="round (0 = SAIF's vector)", ylabel="NLL per response token")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Calibration objective per round: val NLL (solid; shaded: 95 % bootstrap CI over targets), "
                 "train NLL at the start and the kept round (dashed)", fontsize=10)
    fig.tight_layout()
    return fig


def calibrated_weights(weights: pd.DataFrame):
    """SAIF's latent weights before (x) and after (y) calibration, one panel per task; pruned latents in grey."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(weights["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = weights[weights["task"] == task]
        kept = rows[~rows["pruned"]]
        ax.scatter(kept["initial_weight"], kept["weight"], s=18, color="tab:blue", label="kept")
        ax.scatter(rows.loc[rows["pruned"], "initial_weight"], rows.loc[rows["pruned"], "weight"], s=18,
                   color="0.6", label="pruned")
        lim = float(np.abs(rows[["initial_weight", "weight"]].to_numpy()).max()) * 1.1 or 1.0
        ax.plot([-lim, lim], [-lim, lim], ls="--", c="k", lw=0.8)
        status = "" if rows["calibrated"].all() else " (not calibrated: too few targets)"
        ax.set(title=f"{task}, L{int(rows['layer'].iloc[0])}, k = {len(rows)}{status}", xlabel="initial weight",
               ylabel="calibrated weight", xlim=(-lim, lim), ylim=(-lim, lim))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
