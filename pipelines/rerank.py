"""Offline re-ranking on Ray Data: sharded global search -> candidate-major re-ranking -> rankings.

The work of a run is the query ids minus those committed to the rankings table (keyed by
``query_id``, :mod:`pipelines.committed` under the output's lease), taken in waves of
``wave_queries``. Per wave:

1. **Global search**: the gallery's descriptor table is cut into ``search_shards`` row ranges;
   :class:`SearchActor` s search each range for the wave's queries (exact :func:`cvnet.search.search`
   or faiss IVF / IVF-PQ, :func:`cvnet.index.ivf_search`), and the driver merges the partial
   top-``depth`` lists (:func:`cvnet.search.merge`: equal to one search over the whole gallery).
   With IVF, the first ``recall_queries`` queries are also searched exactly and recall@k is logged.
2. **Candidate-major re-ranking**: the shortlist pairs (first ``k`` of every list) are grouped by
   gallery image; :class:`RerankActor` s get each image once with the queries that need it, take
   its rerank features (``cached``: by id from the gallery table, :func:`cvnet.features.read_rerank_levels`;
   ``recompute``: decoded and computed from its image) and score it against all those queries in
   one batched call (:func:`cvnet.models.rerank.key_major_probability`). The wave's query features
   travel once through the object store.
3. **Fuse and commit**: the driver fuses each query's list (:func:`cvnet.retrieval.fuse`) and commits
   the wave's rankings in shards of ``commit_queries`` queries, each query exactly once.

A killed actor's call is retried by Ray Data; a killed driver loses only uncommitted queries, which
the rerun does. New queries in a grown query table are the next run's work.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from cvnet import features, storage
from cvnet.config import RerankConfig
from cvnet.models.checkpoints import extractor_sha256
from cvnet.models.rerank import RerankFeatures, key_major_probability
from cvnet.registry import resolve_checkpoint
from cvnet.retrieval import RANKINGS_SCHEMA, TopK, fuse
from cvnet.search import Descriptors, merge, recall_at_k, search
from cvnet.tables import Lease, Table, TableWriter, open_or_create
from pipelines.committed import ShardCommitter, fragment_summary

log = logging.getLogger(__name__)

TOPK_SCHEMA = pa.schema([("shard", pa.int64()), ("exact", pa.bool_()), ("query_id", pa.string()), ("ids", pa.list_(pa.string())),
                         ("scores", pa.list_(pa.float32()))])
PAIRS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("query_ids", pa.list_(pa.string())),
                          ("probabilities", pa.list_(pa.float32()))])


@dataclass
class RerankResult:
    output: str
    queries: int  # committed by this run
    skipped: int  # committed before this run
    seconds: float
    pairs: int = 0  # (query, candidate) pairs re-ranked
    images: int = 0  # distinct gallery images whose rerank features were used
    recall: float | None = None  # IVF recall@k against exact search (None: exact search)
    versions_read: dict[str, int] = field(default_factory=dict)
    versions_written: dict[str, int] = field(default_factory=dict)

    @property
    def queries_per_s(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else 0.0


def rankings_settings(cfg: RerankConfig, gallery: Table, model_sha: str) -> dict:
    """What determines the numbers of a rankings table (a resumed run must match them)."""
    return {"model_sha256": model_sha, "gallery": storage.redact(cfg.gallery), "gallery_version": gallery.version,
            "k": cfg.k if cfg.rerank else 0, "depth": depth_of(cfg), "weight": cfg.weight, "index": cfg.index, "precision": cfg.precision,
            **({"nlist": cfg.nlist, "nprobe": cfg.nprobe} if cfg.index != "flat" else {}),
            **({"pq_m": cfg.pq_m} if cfg.index == "ivfpq" else {})}


def depth_of(cfg: RerankConfig) -> int:
    depth = cfg.depth or cfg.k
    if depth < cfg.k:
        raise ValueError(f"depth: {depth} must be at least k ({cfg.k})")
    return depth


def _torch_setup(cfg: RerankConfig) -> str:
    import torch

    torch.set_num_threads(max(1, cfg.torch_threads))
    return "cuda" if cfg.actor_gpus > 0 else "cpu"


# ---- workers -----------------------------------------------------------------------------------

class SearchActor:
    """Searches row ranges of the gallery table for one wave's queries (from the object store)."""

    def __init__(self, cfg: RerankConfig, version: int, queries: list):
        self.cfg, self.version, self.device = cfg, version, _torch_setup(cfg)
        self.query_ids, self.vectors = ray.get(queries[0])

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = features.open_features(self.cfg.gallery, self.version).dataset
        depth, self_excluded = depth_of(self.cfg), self.cfg.queries is None
        queries = Descriptors(self.vectors, self.query_ids)
        parts = []
        for shard, offset, limit in zip(batch["shard"].to_pylist(), batch["offset"].to_pylist(),
                                        batch["limit"].to_pylist()):
            rows = table.to_table(columns=["image_id", "descriptor"], offset=offset, limit=limit)
            gallery = Descriptors(features.descriptors_of(rows), rows["image_id"].to_pylist())
            if self.cfg.index == "flat":
                parts.append((shard, True, search(queries, gallery, depth, exclude_self=self_excluded,
                                                  device=self.device)))
                continue
            from cvnet.index import ivf_search

            parts.append((shard, False, ivf_search(queries, gallery, depth, self.cfg.index, self.cfg.nlist, self.cfg.nprobe,
                                            self.cfg.pq_m, exclude_self=self_excluded)))
            sample = Descriptors(self.vectors[: self.cfg.recall_queries], self.query_ids[: self.cfg.recall_queries])
            parts.append((shard, True, search(sample, gallery, depth, exclude_self=self_excluded, device=self.device)))
        return pa.Table.from_pylist([{"shard": shard, "exact": exact, "query_id": q, "ids": ids.tolist(),
                                      "scores": scores.tolist()}
                                     for shard, exact, top in parts
                                     for q, ids, scores in zip(top.query_ids, top.ids, top.scores)], schema=TOPK_SCHEMA)


class RerankActor:
    """Scores gallery images, each once, against all the queries of its shortlist pairs."""

    def __init__(self, cfg: RerankConfig, version: int, queries: list):
        from cvnet.models.checkpoints import load_model

        self.cfg, self.version = cfg, version
        self.model = load_model(cfg.model, device=_torch_setup(cfg))
        self.query_features = {q: RerankFeatures.from_bytes(b) for q, b in ray.get(queries[0]).items()}

    def _gallery_features(self, batch: pa.Table) -> list[RerankFeatures]:
        ids = batch["image_id"].to_pylist()
        if self.cfg.rerank_from == "cached":
            levels = features.read_rerank_levels(self.cfg.gallery, ids, self.version)
            return [RerankFeatures(levels[i]) for i in ids]
        from cvnet.data.images import decode_image
        from cvnet.data.manifest import read_image_bytes
        from cvnet.retry import retry_transient

        def compute(image_id: str, uri: str) -> RerankFeatures:
            data = retry_transient(lambda: read_image_bytes(uri), f"{image_id} ({uri})",
                                   lambda err: getattr(err, "transient", False))
            return self.model.rerank_features(decode_image(data, image_id))

        return [compute(i, u) for i, u in zip(ids, batch["uri"].to_pylist())]

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = self._gallery_features(batch)
        probabilities = [key_major_probability(self.model.cv_learner, key, [self.query_features[q] for q in qs],
                                               self.cfg.precision).tolist()
                         for key, qs in zip(keys, batch["query_ids"].to_pylist())]
        return batch.drop_columns(["probabilities"]).append_column("probabilities",
                                                                   pa.array(probabilities, pa.list_(pa.float32())))


def _actors(cfg: RerankConfig) -> dict:
    return {"compute": ray.data.ActorPoolStrategy(size=cfg.num_actors), "num_cpus": cfg.actor_cpus,
            "num_gpus": cfg.actor_gpus or None, "batch_format": "pyarrow"}


# ---- driver ------------------------------------------------------------------------------------

def wave_search(cfg: RerankConfig, gallery: Table, query_ids: list[str], vectors: np.ndarray
                ) -> tuple[TopK, float | None]:
    """The merged global top-``depth`` of a wave's queries, and IVF recall@k (None if exact)."""
    n = gallery.num_rows()
    shards = min(n, cfg.search_shards or cfg.num_actors)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    specs = [{"shard": i, "offset": int(a), "limit": int(b - a)} for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    ref = ray.put((np.asarray(query_ids, dtype=str), vectors))
    ds = ray.data.from_items(specs).map_batches(
        SearchActor, batch_size=1, fn_constructor_kwargs={"cfg": cfg, "version": gallery.version, "queries": [ref]},
        **_actors(cfg))
    rows = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    parts: dict[bool, list[TopK]] = {True: [], False: []}
    for shard, exact in {(r["shard"], r["exact"]) for r in rows.select(["shard", "exact"]).to_pylist()}:
        parts[exact].append(_topk(rows.filter((pa.compute.field("shard") == shard)
                                              & (pa.compute.field("exact") == exact))))
    exact = merge(*parts[True])
    if cfg.index == "flat":
        return exact, None
    approximate = merge(*parts[False])
    sample = TopK(exact.query_ids, *_rows(approximate, exact.query_ids))
    return approximate, recall_at_k(sample, exact, cfg.k)


def _topk(rows: pa.Table) -> TopK:
    ids = np.array(rows["ids"].to_pylist(), dtype=str)
    scores = np.array(rows["scores"].to_pylist(), dtype=np.float32)
    return TopK(np.array(rows["query_id"].to_pylist(), dtype=str), ids, scores)


def _rows(top: TopK, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = {q: i for i, q in enumerate(top.query_ids)}
    index = [where[q] for q in query_ids]
    return top.ids[index], top.scores[index]


def wave_probabilities(cfg: RerankConfig, gallery: Table, shortlist: TopK, query_features: dict[str, bytes]
                       ) -> tuple[np.ndarray, int]:
    """(Q, k') probabilities of the shortlists' first ``k`` candidates, computed candidate-major;
    and the number of distinct gallery images scored."""
    k = min(cfg.k, shortlist.k)
    needs: dict[str, list[str]] = {}
    for q, ids in zip(shortlist.query_ids, shortlist.ids[:, :k]):
        for image_id in ids[ids != ""]:
            needs.setdefault(str(image_id), []).append(str(q))
    if not needs:
        return np.full((len(shortlist.query_ids), k), np.nan, np.float32), 0
    images = sorted(needs)
    uris = gallery.take(images, ["uri"])["uri"].to_pylist()
    table = pa.table({"image_id": images, "uri": uris, "query_ids": [needs[i] for i in images],
                      "probabilities": [[] for _ in images]}, schema=PAIRS_SCHEMA)
    ref = ray.put(query_features)
    blocks = [table.slice(s, cfg.part_images) for s in range(0, table.num_rows, cfg.part_images)]
    ds = ray.data.from_arrow(blocks).map_batches(
        RerankActor, batch_size=cfg.part_images,
        fn_constructor_kwargs={"cfg": cfg, "version": gallery.version, "queries": [ref]}, **_actors(cfg))
    p: dict[tuple[str, str], float] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for image_id, qs, ps in zip(batch["image_id"].to_pylist(), batch["query_ids"].to_pylist(),
                                    batch["probabilities"].to_pylist()):
            p.update({(q, image_id): v for q, v in zip(qs, ps)})
    out = np.full((len(shortlist.query_ids), k), np.nan, np.float32)
    for row, (q, ids) in enumerate(zip(shortlist.query_ids, shortlist.ids[:, :k])):
        for col, image_id in enumerate(ids):
            if image_id != "":
                out[row, col] = p[(str(q), str(image_id))]
    return out, len(images)


def _query_inputs(cfg: RerankConfig, ids: list[str], version: int) -> tuple[np.ndarray, dict[str, bytes]]:
    """The wave's query descriptors and rerank features (bytes, for the object store; none
    without re-ranking)."""
    uri = cfg.queries or cfg.gallery
    table = features.open_features(uri, version)
    vectors = features.descriptors_of(table.take(ids, ["image_id", "descriptor"]))
    if not cfg.rerank:
        return vectors, {}
    if not table.settings.get("rerank_features"):
        raise ValueError(f"queries: {storage.redact(uri)} was extracted without rerank features "
                         "(extract the queries with --rerank-features)")
    levels = features.read_rerank_levels(uri, ids, version)
    return vectors, {q: RerankFeatures(levels[q]).to_bytes() for q in ids}


def default_output(cfg: RerankConfig) -> str:
    return cfg.out or storage.join(cfg.store or storage.default_store(), "rankings", cfg.name)


def run_rerank(cfg: RerankConfig) -> RerankResult:
    """Run (or resume) one re-ranking job into its rankings table; Ray must be initialised."""
    started = time.monotonic()
    checkpoint = resolve_checkpoint(cfg.model)  # paths, URIs and models:/ URIs
    model_sha, extractor = storage.file_sha256(checkpoint), extractor_sha256(checkpoint)
    gallery = features.open_features(cfg.gallery, extractor_sha256=extractor)
    queries = features.open_features(cfg.queries, extractor_sha256=extractor) if cfg.queries else gallery
    output = default_output(cfg)
    lease = Lease(output, owner=f"rerank {storage.redact(cfg.gallery)}", ttl_s=cfg.lease_ttl_s).acquire()
    result = RerankResult(output, 0, 0, 0.0)
    try:
        writer = TableWriter(open_or_create(output, RANKINGS_SCHEMA, "rankings", "query_id",
                                            rankings_settings(cfg, gallery, model_sha)), lease)
        result.versions_read = {"gallery": gallery.version, "queries": queries.version, "rankings": writer.version}
        all_ids = sorted(queries.keys().to_pylist())
        todo = [q for q in all_ids if q not in writer.committed]
        result.skipped = len(all_ids) - len(todo)
        log.info("rerank into %s: %d queries, %d committed before, %d to do", storage.redact(output),
                 len(all_ids), result.skipped, len(todo))
        committer = ShardCommitter({"rankings": writer}, cfg.commit_queries, total=len(todo))
        recalls = []
        for start in range(0, len(todo), cfg.wave_queries):
            wave = todo[start: start + cfg.wave_queries]
            vectors, query_features = _query_inputs(cfg, wave, queries.version)
            ranking, recall = wave_search(cfg, gallery, wave, vectors)
            if recall is not None:
                recalls.append(recall)
            probabilities = None
            if cfg.rerank:
                probabilities, images = wave_probabilities(cfg, gallery, ranking, query_features)
                result.pairs += int(np.isfinite(probabilities).sum())
                result.images += images
            rankings = fuse(ranking, probabilities, cfg.weight)
            for q0 in range(0, len(wave), cfg.commit_queries):
                chunk = wave[q0: q0 + cfg.commit_queries]
                rows = rankings.filter(pa.compute.is_in(rankings["query_id"], pa.array(chunk, pa.string())))
                committer.add(fragment_summary("rankings", output, rows, "query_id"))
        committer.flush()
        result.queries = len(committer.keys["rankings"])
        result.recall = float(np.mean(recalls)) if recalls else None
        result.versions_written = {"rankings": writer.version}
        writer.collect_garbage()
    finally:
        lease.release()
    result.seconds = time.monotonic() - started
    return result
