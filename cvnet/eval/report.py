"""An HTML report of a rankings table on a revisitop benchmark: PNGs (matplotlib) + one page.

- per-query AP, global vs re-ranked (a scatter: points above the diagonal gained);
- precision-recall curves (mean interpolated precision over the queries), global and re-ranked;
- top-10 grids of the 10 worst and the 10 most improved queries: the query, then its first 10
  results framed green (positive), red (negative) or grey (junk) under the protocol.

The global order is the table's global score order; the re-ranked order is its ``rank``.
"""
from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from cvnet.data.revisitop import gnd_entries, protocol_sets  # noqa: E402
from cvnet.retrieval import evaluate_rankings, fuse, per_query_ap, rankings_to_topk  # noqa: E402

COLOURS = {"positive": (0.1, 0.7, 0.2), "negative": (0.85, 0.1, 0.1), "junk": (0.55, 0.55, 0.55)}
RECALL = np.linspace(0, 1, 21)


def pr_curve(ids: np.ndarray, positives: set[str], junk: set[str]) -> np.ndarray:
    """Interpolated precision at :data:`RECALL` of one ranked list (junk removed)."""
    kept = [i for i in ids if i and i not in junk]
    hits = np.cumsum([i in positives for i in kept])
    if not positives or not len(kept):
        return np.zeros(len(RECALL))
    precision, recall = hits / np.arange(1, len(kept) + 1), hits / len(positives)
    return np.array([precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in RECALL])


def _label(image_id: str, positives: set[str], junk: set[str]) -> str:
    return "positive" if image_id in positives else "junk" if image_id in junk else "negative"


def _grid(path: str, rows: Sequence[int], orders: np.ndarray, query_ids: Sequence[str], sets: list,
          thumbnail: Callable[[str, bool], np.ndarray | None], title: str) -> None:
    fig, axes = plt.subplots(len(rows), 11, figsize=(11 * 1.1, len(rows) * 1.2), squeeze=False)
    for r, q in enumerate(rows):
        positives, junk = sets[q]
        cells = [(query_ids[q], None)] + [(i, _label(i, positives, junk)) for i in orders[q][:10] if i]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            image_id, label = cells[c]
            image = thumbnail(image_id, c == 0)
            ax.imshow(image if image is not None else np.full((8, 8, 3), 0.9))
            for side in ax.spines.values():
                side.set_color(COLOURS[label] if label else "black")
                side.set_linewidth(3 if label else 1)
            if c == 0:
                ax.set_ylabel(query_ids[q][:14], fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def write_report(out: str, rankings: pa.Table, gt: dict, thumbnail: Callable[[str, bool], np.ndarray | None],
                 protocol: str = "medium", title: str = "cvnet report") -> str:
    """Write ``index.html`` and its PNGs into the folder ``out``; returns the page's path.

    ``thumbnail(image_id, is_query)`` gives an RGB float/uint8 image (or None: drawn blank)."""
    os.makedirs(out, exist_ok=True)
    query_ids = list(gt["qimlist"])
    global_table = fuse(rankings_to_topk(rankings, query_ids, "global_score", order="global"), None)
    reranked = rankings.filter(pa.compute.is_valid(rankings["rerank_score"])).num_rows > 0
    ap_global = per_query_ap(global_table, gt, query_ids, protocol)
    ap_rerank = per_query_ap(rankings, gt, query_ids, protocol) if reranked else ap_global
    names = gt["imlist"]
    sets = []
    for entry in gnd_entries(gt):
        positives, junk = protocol_sets(entry, protocol)
        sets.append(({names[i] for i in positives}, {names[i] for i in junk}))
    orders = {"global": rankings_to_topk(global_table, query_ids).ids, "re-ranked": rankings_to_topk(rankings, query_ids).ids}

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(ap_global, ap_rerank, s=12)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    ax.set(xlabel="global AP", ylabel="re-ranked AP", xlim=(0, 1), ylim=(0, 1), title=f"per-query AP ({protocol})")
    fig.savefig(os.path.join(out, "ap_scatter.png"), dpi=90, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 3))
    for label, ids in orders.items():
        curves = [pr_curve(ids[q], *sets[q]) for q in range(len(query_ids)) if sets[q][0]]
        ax.plot(RECALL, np.mean(curves, axis=0), label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"precision-recall ({protocol})")
    ax.legend()
    fig.savefig(os.path.join(out, "pr.png"), dpi=90, bbox_inches="tight")
    plt.close(fig)

    valid = np.flatnonzero(~np.isnan(ap_rerank))
    worst = valid[np.argsort(ap_rerank[valid], kind="stable")][:10]
    gain = ap_rerank - ap_global
    improved = valid[np.argsort(-gain[valid], kind="stable")][:10]
    _grid(os.path.join(out, "worst.png"), worst, orders["re-ranked"], query_ids, sets, thumbnail,
          "10 worst queries (re-ranked top 10)")
    _grid(os.path.join(out, "improved.png"), improved, orders["re-ranked"], query_ids, sets, thumbnail,
          "10 most improved queries (re-ranked top 10)")

    metrics = {"global": evaluate_rankings(global_table, gt, query_ids)}
    if reranked:
        metrics["re-ranked"] = evaluate_rankings(rankings, gt, query_ids)
    cells = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{100 * m[p]['map']:.2f}</td>"
                                                                    for p in ("easy", "medium", "hard")) + "</tr>"
                    for label, m in metrics.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:4px 8px}} img{{max-width:100%}}
.legend span{{padding:2px 6px;margin-right:8px;color:white}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table><tr><th>ranking</th><th>Easy mAP</th><th>Medium mAP</th><th>Hard mAP</th></tr>{cells}</table>
<h2>Per-query AP ({protocol})</h2><img id="scatter" src="ap_scatter.png" alt="per-query AP scatter">
<h2>Precision-recall</h2><img id="pr" src="pr.png" alt="precision-recall curves">
<p class="legend"><span style="background:#1b3">positive</span><span style="background:#d11">negative</span>
<span style="background:#888">junk</span></p>
<h2>10 worst queries</h2><img id="worst" src="worst.png" alt="worst queries">
<h2>10 most improved queries</h2><img id="improved" src="improved.png" alt="most improved queries">
</body></html>
"""
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
