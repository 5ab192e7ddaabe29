"""Revisited Oxford / Paris (revisitop): ground truth, image lists, query crops, R1M, shortlists.

A dataset folder ``<root>`` holds ``gnd_<name>.pkl`` and ``jpg/<image>.jpg``; the R1M
distractors are ``<r1m root>/revisitop1m.txt`` (names with extension) and ``jpg/<name>``.
Ground-truth pickles are loaded with a restricted unpickler: plain containers, strings and
numbers only, any other global (which is how a pickle runs code) is refused.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cvnet.data.images import crop_query, decode_image
from cvnet.data.manifest import manifest_table, read_image_bytes
from cvnet.storage import filesystem, join

PROTOCOLS = ("easy", "medium", "hard")
# builtins a protocol-2/3 pickle needs to rebuild sets (Python 2 names included); nothing else
_ALLOWED_GLOBALS = {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset")}


class GroundTruthError(ValueError):
    """A ground-truth file is unsafe or not in the revisitop format."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise GroundTruthError(self.path, f"refused pickle global {module}.{name} "
                                          "(only plain containers and numbers are allowed)")

    def persistent_load(self, pid: object) -> object:
        raise GroundTruthError(self.path, "refused pickle persistent id")


def _check_indices(path: str, where: str, values: object, n_db: int) -> list[int]:
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise GroundTruthError(path, f"{where} must be a list of ints")
    bad = [v for v in values if not 0 <= v < n_db]
    if bad:
        raise GroundTruthError(path, f"{where} has indices outside [0, {n_db}): {bad[:5]}")
    return list(values)


def validate_ground_truth(gt: object, path: str = "<ground truth>") -> dict:
    """Check a loaded ground truth has the revisitop structure; return it."""
    if not isinstance(gt, dict):
        raise GroundTruthError(path, f"top level is {type(gt).__name__}, not dict")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in gt:
            raise GroundTruthError(path, f"missing key {key!r}; has {sorted(map(str, gt))}")
    for key in ("imlist", "qimlist"):
        if not all(isinstance(v, str) for v in gt[key]):
            raise GroundTruthError(path, f"{key} must be a list of strings")
    if len(gt["gnd"]) != len(gt["qimlist"]):
        raise GroundTruthError(path, f"{len(gt['gnd'])} gnd entries for {len(gt['qimlist'])} queries")
    n_db = len(gt["imlist"])
    for q, entry in enumerate(gt["gnd"]):
        if not isinstance(entry, dict):
            raise GroundTruthError(path, f"gnd[{q}] is {type(entry).__name__}, not dict")
        for key in ("easy", "hard", "junk"):
            _check_indices(path, f"gnd[{q}][{key!r}]", entry.get(key, []), n_db)
        bbx = entry.get("bbx")
        if bbx is not None and (len(bbx) != 4 or not all(isinstance(v, (int, float)) for v in bbx)):
            raise GroundTruthError(path, f"gnd[{q}]['bbx'] must be 4 numbers, got {bbx!r}")
    return gt


def load_ground_truth(path: str) -> dict:
    """Load and validate ``gnd_<name>.pkl`` (keys ``imlist``, ``qimlist``, ``gnd``) safely."""
    fs, fs_path = filesystem(path)
    try:
        data = fs.cat_file(fs_path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: ground truth not found") from exc
    try:
        gt = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except GroundTruthError:
        raise
    except Exception as exc:  # any malformed pickle stream
        raise GroundTruthError(path, f"not a readable pickle: {exc}") from exc
    return validate_ground_truth(gt, path)


def gnd_entries(gnd: dict | list) -> list[dict]:
    """The per-query list of a ground truth given whole (dict) or as its ``gnd`` list."""
    return gnd["gnd"] if isinstance(gnd, dict) else list(gnd)


def protocol_sets(entry: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """``(positives, junk)`` database indices of one query under a protocol."""
    easy, hard, junk = (np.asarray(entry.get(k, []), dtype=np.int64) for k in ("easy", "hard", "junk"))
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def check_ranks(ranks: np.ndarray, n_queries: int) -> np.ndarray:
    """Validate a ranking array ``(n_ranked, n_queries)`` of integer database indices."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a 2-D integer array (n_ranked, n_queries), got "
                         f"{ranks.dtype} with shape {ranks.shape}")
    if ranks.shape[1] != n_queries:
        raise ValueError(f"ranks has {ranks.shape[1]} columns, the ground truth {n_queries} queries")
    return ranks


def image_uri(root: str, name: str) -> str:
    return join(root, "jpg", f"{name}.jpg")


def revisitop_manifest(root: str, name: str, queries: bool = True) -> pa.Table:
    """Manifest of a revisitop dataset: database (split ``db``) then, with ``queries``, the
    queries (split ``query``), each with its crop box ``bbx`` (crop with
    :func:`cvnet.data.images.crop_query`, as the reference does)."""
    gt = load_ground_truth(join(root, f"gnd_{name}.pkl"))
    db, qs = gt["imlist"], gt["qimlist"] if queries else []
    boxes = [None] * len(db) + [gt["gnd"][q].get("bbx") for q in range(len(qs))]
    return manifest_table(db + qs, [image_uri(root, n) for n in db + qs],
                          ["db"] * len(db) + ["query"] * len(qs), bbx=boxes)


def query_bbx(gt: dict, query: int) -> tuple[float, float, float, float]:
    """The crop box ``(x1, y1, x2, y2)`` of query ``query``."""
    bbx = gt["gnd"][query].get("bbx")
    if bbx is None:
        raise GroundTruthError("<ground truth>", f"query {query} ({gt['qimlist'][query]}) has no bbx")
    return tuple(float(v) for v in bbx)  # type: ignore[return-value]


def load_image(root: str, name: str) -> np.ndarray:
    """Read and decode the benchmark image ``name`` (BGR uint8)."""
    uri = image_uri(root, name)
    return decode_image(read_image_bytes(uri), uri)


def load_query_image(root: str, gt: dict, query: int) -> np.ndarray:
    """Read, decode and crop query ``query`` the way the reference does (BGR uint8)."""
    return crop_query(load_image(root, gt["qimlist"][query]), query_bbx(gt, query))


def benchmark_name(root: str) -> str:
    """The dataset name of a revisitop folder: its last path component (``gnd_<name>.pkl``)."""
    return root.rstrip("/").rsplit("/", 1)[-1]


def ground_truth_uri(root: str) -> str:
    """``<root>/gnd_<name>.pkl``, the ground truth of the revisitop folder ``root``."""
    return join(root, f"gnd_{benchmark_name(root)}.pkl")


@dataclass(frozen=True)
class Benchmark:
    """A small revisitop benchmark in memory: its ground truth, the cropped query images and
    (``None`` when not loaded) the database images, both in the ground truth's order."""

    root: str
    gt: dict
    query_images: list[np.ndarray]
    images: list[np.ndarray] | None

    @property
    def query_ids(self) -> list[str]:
        return list(self.gt["qimlist"])

    @property
    def ids(self) -> list[str]:
        return list(self.gt["imlist"])


def load_benchmark(root: str, images: bool = True) -> Benchmark:
    """Read the revisitop folder ``root``: ground truth, query crops and, with ``images``, the
    database images (for benchmarks small enough to hold in memory)."""
    gt = load_ground_truth(ground_truth_uri(root))
    queries = [load_query_image(root, gt, q) for q in range(len(gt["qimlist"]))]
    return Benchmark(root, gt, queries, [load_image(root, n) for n in gt["imlist"]] if images else None)


def read_r1m_list(uri: str) -> list[str]:
    """The R1M distractor names (with extension), one per line of ``revisitop1m.txt``."""
    fs, path = filesystem(uri)
    with fs.open(path, "rt", encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    bad = [n for n in names if "/" in n or n.startswith(".")]
    if bad:
        raise GroundTruthError(uri, f"unsafe distractor names: {bad[:5]}")
    return names


def r1m_manifest(root: str, list_name: str = "revisitop1m.txt") -> pa.Table:
    """Manifest of the R1M distractors (split ``distractor``), uri ``<root>/jpg/<name>``."""
    names = read_r1m_list(join(root, list_name))
    return manifest_table([n.rsplit(".", 1)[0] for n in names], [join(root, "jpg", n) for n in names],
                          "distractor")


def shortlist_gt_aware(ranks: np.ndarray, gnd: dict | list, protocol: str, k: int = 100) -> np.ndarray:
    """Paper shortlist: per query, the first ``k`` candidates that are not junk for ``protocol``.

    Returns ``(k, n_queries)``; raises if a query has fewer than ``k`` non-junk candidates.
    """
    entries = gnd_entries(gnd)
    ranks = check_ranks(ranks, len(entries))
    out = np.empty((k, ranks.shape[1]), dtype=ranks.dtype)
    for q, entry in enumerate(entries):
        _, junk = protocol_sets(entry, protocol)
        kept = ranks[~np.isin(ranks[:, q], junk), q]
        if len(kept) < k:
            raise ValueError(f"query {q}: only {len(kept)} non-junk candidates under the "
                             f"{protocol} protocol, need {k}")
        out[:, q] = kept[:k]
    return out


def shortlist_topk(ranks: np.ndarray, k: int = 100) -> np.ndarray:
    """Deployment shortlist: the raw top ``k`` rows of ``ranks`` ``(n_ranked, n_queries)``."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] < k:
        raise ValueError(f"ranks of shape {ranks.shape} has fewer than k={k} rows")
    return ranks[:k]

