"""Train/test overlap audit: benchmark images whose nearest training images are near-copies.

For every benchmark image (queries and database), the training images whose descriptors score
at least ``threshold`` (inner product of unit descriptors), best first, up to ``k``, found by the
exact :func:`cvnet.search.search` over the training features read block by block (the training
set need not fit in memory at once). The result is a table (``OVERLAP_SCHEMA``, one row per
benchmark image, empty lists where nothing is close) and an HTML page with the thumbnails side
by side, read from the images' URIs. Pure: no Ray.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cvnet import features, storage
from cvnet.config import AuditOverlapConfig
from cvnet.data.manifest import read_image_bytes
from cvnet.search import Descriptors, TopK, merge, search
from cvnet.tables import Lease, Table, TableWriter, open_or_create, write_table_fragments

TABLE = "overlap.lance"
OVERLAP_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("train_ids", pa.list_(pa.string()), nullable=False),
    pa.field("train_uris", pa.list_(pa.string()), nullable=False),
    pa.field("scores", pa.list_(pa.float32()), nullable=False),
])


def nearest_training(train: Table, queries: Descriptors, k: int, block_rows: int = 262144) -> TopK:
    """Exact top-``k`` training images of each benchmark image (no exclusions), block by block."""
    parts = []
    for start in range(0, max(1, train.num_rows()), block_rows):
        rows = train.dataset.to_table(columns=["image_id", "descriptor"], offset=start, limit=block_rows)
        if rows.num_rows:
            gallery = Descriptors(features.descriptors_of(rows), rows.column("image_id").to_pylist())
            parts.append(search(queries, gallery, k, exclude_self=False))
    return merge(*parts, k=k)


def overlap_rows(found: TopK, uris: Sequence[str], train_uri_of: dict[str, str], threshold: float) -> pa.Table:
    """The table rows: each benchmark image with its training matches scoring ``>= threshold``."""
    keep = (found.scores >= threshold) & (found.ids != "")
    ids = [[i for i, m in zip(row, mask) if m] for row, mask in zip(found.ids.tolist(), keep)]
    scores = [[float(s) for s, m in zip(row, mask) if m] for row, mask in zip(found.scores, keep)]
    return pa.Table.from_pydict({"image_id": found.query_ids.tolist(), "uri": list(uris), "train_ids": ids,
                                 "train_uris": [[train_uri_of[i] for i in row] for row in ids],
                                 "scores": scores}, schema=OVERLAP_SCHEMA)


def thumbnail(uri: str, side: int = 128) -> str:
    """An ``<img>`` tag with the image at ``uri`` as an inline JPEG of at most ``side`` pixels,
    or the URI as text when it cannot be read."""
    try:
        image = cv2.imdecode(np.frombuffer(read_image_bytes(uri), np.uint8), cv2.IMREAD_COLOR)
        scale = side / max(image.shape[:2])
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        data = base64.b64encode(cv2.imencode(".jpg", image)[1].tobytes()).decode()
        return f'<img src="data:image/jpeg;base64,{data}" title="{html.escape(uri)}">'
    except Exception as err:  # a report shows what it cannot read instead of failing the audit
        return f'<span class="missing">{html.escape(uri)} ({html.escape(type(err).__name__)})</span>'


def html_report(rows: pa.Table, title: str, threshold: float) -> str:
    """One table row per benchmark image with matches: its thumbnail, then its matches'."""
    flagged = [r for r in rows.to_pylist() if r["train_ids"]]
    lines = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
             "<style>td{vertical-align:top;font:12px sans-serif}img{display:block}</style>",
             f"<h1>{html.escape(title)}</h1><p>{len(flagged)} of {rows.num_rows} benchmark images have a "
             f"training image scoring at least {threshold}.</p><table>"]
    for r in flagged:
        cells = [f'<td class="benchmark">{thumbnail(r["uri"])}{html.escape(r["image_id"])}</td>']
        cells += [f'<td class="train">{thumbnail(u)}{html.escape(i)}<br>{s:.4f}</td>'
                  for i, u, s in zip(r["train_ids"], r["train_uris"], r["scores"])]
        lines.append(f"<tr>{''.join(cells)}</tr>")
    return "\n".join(lines + ["</table>"])


def default_output(store: str, train: Table, train_uri: str, benchmark_uri: str) -> str:
    """``<store>/audits/<train folder>-v<train version>-vs-<benchmark folder>``."""
    name = lambda uri: uri.rstrip("/").rsplit("/", 1)[-1] or "features"  # noqa: E731
    return storage.join(store, "audits", f"{name(train_uri)}-v{train.version}-vs-{name(benchmark_uri)}")


def audit(cfg: AuditOverlapConfig) -> tuple[str, pa.Table, dict[str, int]]:
    """Run (or resume) the audit into its committed table and write ``report.html`` next to it;
    returns the output, the table's rows and the versions read and written."""
    train, bench = features.open_features(cfg.train), features.open_features(cfg.benchmark)
    output = cfg.output or default_output(cfg.store or storage.default_store(), train, cfg.train, cfg.benchmark)
    settings = {"train_extractor_sha256": train.settings.get("extractor_sha256"), "train_version": train.version,
                "threshold": cfg.threshold, "k": cfg.k}
    with Lease(output, owner=f"audit-overlap {storage.redact(cfg.benchmark)}", ttl_s=cfg.lease_ttl_s) as lease:
        uri = storage.join(output, TABLE)
        writer = TableWriter(open_or_create(uri, OVERLAP_SCHEMA, "overlap", "image_id", settings), lease)
        todo = pending_rows(bench.read(["image_id", "uri", "descriptor"]), writer.committed)
        if todo.num_rows:
            queries = Descriptors(features.descriptors_of(todo), todo.column("image_id").to_pylist())
            train_uris = train.read(["image_id", "uri"])
            found = nearest_training(train, queries, cfg.k, cfg.block_rows)
            rows = overlap_rows(found, todo.column("uri").to_pylist(),
                                dict(zip(*(train_uris.column(c).to_pylist() for c in ("image_id", "uri")))),
                                cfg.threshold)
            writer.commit(write_table_fragments(uri, rows), rows.column("image_id").to_pylist(),
                          message=f"{rows.num_rows} benchmark images")
        result = writer.table.read()
        storage.put_atomic(storage.join(output, "report.html"), html_report(
            result, f"{storage.redact(cfg.benchmark)} vs training {storage.redact(cfg.train)}", cfg.threshold).encode())
    return output, result, {"train_version_read": train.version, "benchmark_version_read": bench.version,
                            "overlap_version_written": writer.version}


def pending_rows(rows: pa.Table, done: set[str]) -> pa.Table:
    """``rows`` whose ``image_id`` is not committed yet."""
    return rows.filter(pc.invert(pc.is_in(rows.column("image_id"), pa.array(sorted(done), pa.string()))))
