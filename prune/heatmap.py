"""The keep heatmap: one row per MoE layer, one column per expert.

Kept experts are coloured by their keep score (scaled per layer, so each row shows its own
ranking), dropped experts are grey, protected experts carry a dot. Drawn with matplotlib's Agg
canvas directly: no pyplot, no global backend switch, safe in threads and on headless machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_keep_heatmap(path: Path, agg: np.ndarray, dropped: list[list[int]], protected: list[set[int]],
                      layers: list[int], title: str = "") -> None:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    L, E = agg.shape
    lo, hi = agg.min(axis=1, keepdims=True), agg.max(axis=1, keepdims=True)
    scaled = (agg - lo) / np.where(hi > lo, hi - lo, 1.0)
    rgba = colormaps["viridis"](scaled)
    for l, d in enumerate(dropped):
        rgba[l, d] = (0.85, 0.85, 0.85, 1.0)
    fig = Figure(figsize=(min(max(6, 2 + E * 0.1), 24), min(max(3, 1.5 + L * 0.25), 16)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    fig.colorbar(ScalarMappable(cmap="viridis"), ax=ax, label="keep score, scaled per layer")
    ys, xs = zip(*[(l, e) for l, p in enumerate(protected) for e in p]) if any(protected) else ((), ())
    ax.scatter(xs, ys, s=6, c="white", edgecolors="black", linewidths=0.3, label="protected")
    ax.set_yticks(range(0, L, max(1, L // 30)), [str(x) for x in layers[::max(1, L // 30)]])
    ax.set_xticks(range(0, E, max(1, E // 16)))
    ax.set_xlabel("expert id (grey = dropped, dot = protected)")
    ax.set_ylabel("layer")
    kept = E * L - sum(map(len, dropped))
    ax.set_title(f"{title + ': ' if title else ''}kept {kept}/{E * L} experts")
    fig.tight_layout()
    fig.savefig(path, format="png")
