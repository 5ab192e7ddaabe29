"""Evaluation on the pipeline: extraction -> rankings -> revisitop metrics, no image in the driver.

The benchmark's database (plus an optional distractor manifest, R1M-style) and its queries
(cropped to their ``bbx`` by the extraction) are extracted on Ray into two feature tables of the
model under ``<store>/eval/<benchmark>-<sha12>/`` (two tables, so a query's image id never clashes
with the same image in the database; a rerun extracts nothing again). :func:`pipelines.rerank.run_rerank`
writes the committed rankings (raw top-K re-ranked, or global only). Metrics, labelled:

- ``global``: the global order of the rankings (global score, then id);
- ``rerank_topk``: the rankings as committed (deployment shortlist: raw top-K);
- ``rerank_gt_aware``: per protocol, that protocol's junk removed from the global list before its
  first K are re-ranked (the paper's protocol); pairs not re-ranked in the committed table are
  scored by the same candidate-major actors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cvnet import features, storage
from cvnet.config import EvaluateConfig, ExtractConfig, RerankConfig
from cvnet.data.manifest import read_manifest, write_manifest
from cvnet.data.revisitop import PROTOCOLS, benchmark_name, ground_truth_uri, load_ground_truth, revisitop_manifest
from cvnet.models.checkpoints import extractor_sha256
from cvnet.registry import resolve_checkpoint
from cvnet.retrieval import TopK, evaluate_rankings, fuse, protocol_junk, rankings_to_topk, remove_junk
from cvnet.tables import Table
from pipelines.extract import run_extract
from pipelines.rerank import _query_inputs, run_rerank, wave_probabilities

log = logging.getLogger(__name__)
FULL_RANKING_UP_TO = 10_000


@dataclass
class EvaluateResult:
    metrics: dict[str, dict[str, dict[str, float]]]  # label -> protocol -> metric -> fraction
    rankings: str
    gallery: str
    queries: str
    database_images: int
    versions_read: dict[str, int] = field(default_factory=dict)
    versions_written: dict[str, int] = field(default_factory=dict)


def eval_folder(cfg: EvaluateConfig, extractor: str) -> str:
    """``<store>/eval/<benchmark>-<extractor hash>``: models that extract the same features (a
    re-ranker and the one it was fine-tuned from) share the benchmark's extraction."""
    return storage.join(cfg.store or storage.default_store(), "eval",
                        f"{benchmark_name(cfg.benchmark)}-{extractor[:12]}")


def _database_manifest(cfg: EvaluateConfig, gt_manifest: pa.Table) -> tuple[pa.Table, str]:
    """Database rows (plus distractors) and the name of this database variant."""
    db = gt_manifest.filter(pa.compute.equal(gt_manifest["split"], "db"))
    if cfg.distractors is None:
        return db, "database"
    extra = read_manifest(cfg.distractors)
    clash = set(db["image_id"].to_pylist()) & set(extra["image_id"].to_pylist())
    if clash:
        raise ValueError(f"distractors: image id(s) {sorted(clash)[:5]} are also database images")
    stem = cfg.distractors.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    return pa.concat_tables([db, extra.select(db.schema.names).cast(db.schema)]), f"database-with-{stem}"


def extract_benchmark(cfg: EvaluateConfig, folder: str) -> tuple[str, str, dict[str, int]]:
    """Extract the database (+ distractors) and the cropped queries; their feature URIs."""
    manifest = revisitop_manifest(cfg.benchmark, benchmark_name(cfg.benchmark))
    db, variant = _database_manifest(cfg, manifest)
    parts = {variant: (db, cfg.rerank and cfg.rerank_from == "cached", "gallery"),
             "queries": (manifest.filter(pa.compute.equal(manifest["split"], "query")), cfg.rerank, "queries")}
    written = {}
    outputs = {}
    for name, (rows, rerank_features, role) in parts.items():
        path = storage.join(folder, f"{name}.parquet")
        write_manifest(rows, path)
        outputs[name] = storage.join(folder, name + ("-rerank" if rerank_features else ""))
        result = run_extract(ExtractConfig(
            manifest=path, model=cfg.model, output=outputs[name], rerank_features=rerank_features,
            scales=cfg.scales, num_actors=cfg.num_actors, actor_cpus=cfg.actor_cpus, actor_gpus=cfg.actor_gpus,
            max_bad_fraction=0.0))
        written[f"{role}_features"] = result.versions_written["features"]
    return outputs[variant], outputs["queries"], written


def _depth(cfg: EvaluateConfig, n_db: int, most_junk: int) -> int:
    if cfg.depth is not None:
        return max(cfg.depth, min(n_db, cfg.k + most_junk))
    return n_db if n_db <= FULL_RANKING_UP_TO else max(1000, cfg.k + most_junk)


def gt_aware_metrics(rcfg: RerankConfig, rankings: pa.Table, gt: dict) -> dict[str, dict[str, float]]:
    """Per protocol: junk removed before the first k are re-ranked, scored with that protocol."""
    query_ids = list(gt["qimlist"])
    ranking = rankings_to_topk(rankings, query_ids, "global_score", order="global")
    scored = rankings.filter(pa.compute.is_valid(rankings["rerank_score"]))
    known = dict(zip(zip(scored["query_id"].to_pylist(), scored["image_id"].to_pylist()),
                     scored["rerank_score"].to_pylist()))
    shortlists = {p: remove_junk(ranking, protocol_junk(gt, p)) for p in PROTOCOLS}
    missing: list[list[str]] = [[] for _ in query_ids]
    for top in shortlists.values():
        for row, (q, ids) in enumerate(zip(query_ids, top.ids[:, :rcfg.k])):
            missing[row] += [i for i in ids if i and (q, i) not in known and i not in missing[row]]
    width = max(map(len, missing))
    if width:
        ids = np.array([m + [""] * (width - len(m)) for m in missing], dtype=str)
        extra = TopK(np.array(query_ids, dtype=str), ids, np.zeros(ids.shape, np.float32))
        gallery = features.open_features(rcfg.gallery)
        _, query_features = _query_inputs(rcfg, query_ids, features.open_features(rcfg.queries).version)
        p, _ = wave_probabilities(rcfg.model_copy(update={"k": width}), gallery, extra, query_features)
        known |= {(q, i): float(v) for q, row_ids, row_p in zip(query_ids, ids, p)
                  for i, v in zip(row_ids, row_p) if i}
    out = {}
    for protocol, top in shortlists.items():
        k = min(rcfg.k, top.k)
        probabilities = np.array([[known.get((q, i), np.nan) for i in ids] for q, ids in zip(query_ids, top.ids[:, :k])],
                                 dtype=np.float32)
        table = fuse(top, probabilities, rcfg.weight)
        out[protocol] = evaluate_rankings(table, gt, query_ids, protocols=[protocol])[protocol]
    return out


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Extract, rank and score one benchmark on Ray (Ray must be initialised)."""
    checkpoint = resolve_checkpoint(cfg.model)  # paths, URIs and models:/ URIs
    model_sha, folder = storage.file_sha256(checkpoint), eval_folder(cfg, extractor_sha256(checkpoint))
    gt = load_ground_truth(ground_truth_uri(cfg.benchmark))
    gallery, queries, written = extract_benchmark(cfg, folder)
    n_db = features.open_features(gallery).num_rows()
    most_junk = max(len(protocol_junk(gt, p)[q]) for p in PROTOCOLS for q in range(len(gt["qimlist"])))
    depth = _depth(cfg, n_db, most_junk)
    label = (f"rankings-{gallery.rsplit('/', 1)[-1]}-d{depth}" + (f"-k{cfg.k}-w{cfg.weight:g}" if cfg.rerank else "")
             + f"-m{model_sha[:12]}")
    rcfg = RerankConfig(gallery=gallery, queries=queries, model=cfg.model, k=min(cfg.k, depth), rerank=cfg.rerank,
                        depth=depth, weight=cfg.weight, rerank_from=cfg.rerank_from, out=storage.join(folder, label),
                        num_actors=cfg.num_actors, actor_cpus=cfg.actor_cpus, actor_gpus=cfg.actor_gpus,
                        store=cfg.store)
    ranked = run_rerank(rcfg)
    rankings = Table.open(ranked.output).read()
    query_ids = list(gt["qimlist"])
    metrics = {"global": evaluate_rankings(fuse(rankings_to_topk(rankings, query_ids, "global_score", "global"), None),
                                           gt, query_ids)}
    if cfg.rerank:
        metrics["rerank_topk"] = evaluate_rankings(rankings, gt, query_ids)
        metrics["rerank_gt_aware"] = gt_aware_metrics(rcfg, rankings, gt)
    return EvaluateResult(metrics, ranked.output, gallery, queries, n_db,
                          versions_read={"rankings": ranked.versions_read.get("rankings", 0)},
                          versions_written={**written, **ranked.versions_written})
