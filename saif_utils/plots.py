"""Figures shared by the notebooks: point estimates with their 95 % intervals, one row per configuration."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns


def ci_dotplot(ax, table: pd.DataFrame, value: str, label: str, hue: str, hue_order: Sequence[str] | None = None,
               low: str | None = None, high: str | None = None, palette: str | dict = "Set2") -> None:
    """Horizontal dots at `value` with error bars from `low`/`high` (default `<stem>_ci_low/_ci_high` where `value`
    is `<stem>_acc` or `<stem>`), one row per `label`, dodged by `hue`; `palette` is a seaborn name or {hue: colour}."""
    stem = value.removesuffix("_acc")
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
    stem = value.removesuffix("_acc")
    hues = list(dict.fromkeys(table[hue]))
    for name, colour in zip(hues, sns.color_palette(palette, len(hues))):
        sub = table[table[hue] == name].sort_values(x)
        ax.plot(sub[x], sub[value], "o-", ms=3, color=colour, label=str(name))
        if f"{stem}_ci_low" in sub:
            ax.fill_between(sub[x], sub[f"{stem}_ci_low"], sub[f"{stem}_ci_high"], color=colour, alpha=0.15)
    ax.grid(alpha=0.3)
