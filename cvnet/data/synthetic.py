"""Synthetic landmark collections in the GLDv2 and revisitop formats (for demos and tests).

``generate(out, seed, ...)`` draws procedural landmarks (see ``synthetic_scenes``) and writes:

- ``out/gldv2/``: ``train.csv`` (id,url,landmark_id), ``train_clean.csv`` (landmark_id,images:
  every landmark's images but its least visible one), ``train_label_to_category.csv``,
  ``index.csv``, ``test.csv``, ``index_image_to_landmark.csv``, ``retrieval_solution_v2.1.csv``
  (id,images,Usage: Public / Private, and ``None`` / ``Ignored`` for test images without a
  match), images under ``train|index|test/<a>/<b>/<c>/<id>.jpg`` and the train images again as
  ``train/images_NNN.tar`` shards with ``train/md5.images_NNN.txt``;
- ``out/revisitop/<name>/``: ``gnd_<name>.pkl`` and ``jpg/<id>.jpg`` (queries and database);
- ``out/synth.json`` (seed, parameters, counts) and ``out/synth_images.csv`` (per image: split,
  landmark, family, measured visible fraction, perspective strength).

Training landmarks, benchmark landmarks and the distractors' confuser landmarks are disjoint,
but all come from the same families (shared textures, different layouts), so what is learned
on the training split transfers and the benchmark holds hard negatives.

Ground truth of a query = the database views of its landmark, labelled by the visible fraction
``v`` of the landmark in each view and the view's perspective strength ``s``:
easy: ``v >= 0.5`` and ``s < 0.6``; hard: ``0.15 <= v`` and (``v < 0.5`` or ``s >= 0.6``);
junk: ``0 < v < 0.15``; a view with ``v == 0`` is a negative. The output is byte-identical for
the same arguments.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvnet.data.gldv2 import member_name
from cvnet.data.synthetic_scenes import (
    Landmark,
    View,
    ViewParams,
    make_family,
    make_landmark,
    render_view,
)
from cvnet.data.synthetic_writers import (
    encode_jpeg,
    staged_folder,
    write_bytes,
    write_csv,
    write_pickle,
    write_tar_shards,
)

log = logging.getLogger(__name__)

EASY_MIN_VISIBLE = 0.5
JUNK_MAX_VISIBLE = 0.15
STRONG_VIEW = 0.6
LANDMARKS_PER_FAMILY = 4
DEFAULT_NAME = "roxsynth"
SPLITS = ("train", "query", "database", "distractor", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One generated image: ``split`` is train, query, database, distractor or test."""

    image_id: str
    split: str
    landmark_id: int  # -1: no landmark
    family: int  # -1: no landmark
    visible: float
    strength: float
    bbx: tuple[float, float, float, float] | None  # landmark extent in the photo


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate`` wrote: folders, parameters, counts and every image's record."""

    out: str
    seed: int
    name: str
    parameters: dict[str, int]
    counts: dict[str, int]
    images: tuple[ImageRecord, ...] = field(repr=False)

    @property
    def gldv2_dir(self) -> str:
        return str(Path(self.out) / "gldv2")

    @property
    def revisitop_dir(self) -> str:
        return str(Path(self.out) / "revisitop" / self.name)

    def to_json(self) -> dict[str, object]:
        """The ``synth.json`` content (no image records, no paths, no timestamps)."""
        return {"seed": self.seed, "name": self.name, "parameters": self.parameters,
                "counts": self.counts}


def visibility_label(visible: float, strength: float) -> str | None:
    """easy / hard / junk for a database view of the query's landmark (None: not visible)."""
    if visible <= 0.0:
        return None
    if visible < JUNK_MAX_VISIBLE:
        return "junk"
    if visible >= EASY_MIN_VISIBLE and strength < STRONG_VIEW:
        return "easy"
    return "hard"


def image_id(seed: int, split: str, index: int) -> str:
    """A 16-hex-character id, as GLDv2 ids look."""
    return hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).hexdigest()


def _params(rng: np.random.Generator, shift: tuple[float, float], strength: tuple[float, float],
            occluders: int) -> ViewParams:
    return ViewParams(zoom=float(np.exp(rng.uniform(-0.35, 0.35))),
                      shift=float(rng.uniform(*shift)),
                      direction=float(rng.uniform(0, 2 * np.pi)),
                      strength=float(rng.uniform(*strength)),
                      rotation_deg=float(rng.uniform(-4, 4)),
                      occluders=int(rng.integers(0, occluders + 1)))


def _train_params(rng: np.random.Generator, _: int) -> ViewParams:
    return _params(rng, (0.0, 0.35), (0.0, 0.8), 2)


def _query_params(rng: np.random.Generator, _: int) -> ViewParams:
    return _params(rng, (0.0, 0.1), (0.0, 0.5), 1)


def _database_params(rng: np.random.Generator, j: int) -> ViewParams:
    """Database views cycle through full, partial and glimpse views; the first is an easy one."""
    if j == 0:
        return ViewParams(1.0, 0.0, 0.0, 0.2, 0.0, 0)
    regime = j % 5
    if regime < 2:
        return _params(rng, (0.0, 0.2), (0.0, 1.0), 2)
    if regime < 4:
        return _params(rng, (0.5, 0.9), (0.0, 1.0), 3)
    return _params(rng, (0.85, 1.2), (0.0, 1.0), 3)


class _Builder:
    """Draws images (deterministic per split and index) and writes their JPEGs."""

    def __init__(self, root: Path, seed: int, size: int, families: int, name: str):
        self.root, self.seed, self.size, self.name = root, seed, size, name
        self.families = [make_family(f, seed, size) for f in range(families)]
        self.records: list[ImageRecord] = []
        self.train_members: list[tuple[str, bytes]] = []
        self._landmarks: dict[int, Landmark] = {}

    def landmark(self, landmark_id: int, family: int) -> Landmark:
        if landmark_id not in self._landmarks:
            self._landmarks[landmark_id] = make_landmark(landmark_id, self.families[family],
                                                         self.seed, self.size)
        return self._landmarks[landmark_id]

    def image(self, split: str, index: int, landmark: Landmark | None,
              params: Callable[[np.random.Generator, int], ViewParams] | None,
              j: int = 0) -> ImageRecord:
        rng = np.random.default_rng([self.seed, 3, SPLITS.index(split), index])
        view: View = render_view(landmark, params(rng, j) if params else None, rng, self.size)
        iid = image_id(self.seed, split, index)
        record = ImageRecord(iid, split, landmark.landmark_id if landmark else -1,
                             landmark.family if landmark else -1,
                             round(view.visible, 6), round(view.strength, 6), view.bbx)
        data = encode_jpeg(view.image, iid)
        member = member_name(iid)
        if split == "train":
            write_bytes(self.root / "gldv2" / "train" / member, data)
            self.train_members.append((member, data))
        else:
            folder = "test" if split in ("query", "test") else "index"
            write_bytes(self.root / "gldv2" / folder / member, data)
            write_bytes(self.root / "revisitop" / self.name / "jpg" / f"{iid}.jpg", data)
        self.records.append(record)
        return record


def _draw_training(b: _Builder, landmarks: int, per_landmark: int,
                   families: int) -> list[ImageRecord]:
    """Training views: landmarks 0 .. landmarks-1, ``per_landmark`` views each."""
    records = []
    for lm in range(landmarks):
        landmark = b.landmark(lm, lm % families)
        records += [b.image("train", lm * per_landmark + j, landmark, _train_params)
                    for j in range(per_landmark)]
    return records


def _draw_benchmark(b: _Builder, first: int, queries: int, per_query_landmark: int,
                    per_landmark: int, distractors: int, families: int
                    ) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """Queries, database (shuffled) and extra test images; landmark ids start at ``first``."""
    bench = math.ceil(queries / per_query_landmark)
    query_records, db_records = [], []
    for k in range(bench):
        landmark = b.landmark(first + k, (first + k) % families)
        for q in range(k * per_query_landmark, min(queries, (k + 1) * per_query_landmark)):
            query_records.append(b.image("query", q, landmark, _query_params))
        db_records += [b.image("database", k * per_landmark + j, landmark, _database_params, j)
                       for j in range(per_landmark)]
    confusers = distractors // 2
    for d in range(distractors):
        if d < confusers:  # ~3 views each of unlisted landmarks of the benchmark's families
            c = d % max(1, confusers // 3)
            landmark = b.landmark(first + bench + c, (first + c % bench) % families)
            db_records.append(b.image("distractor", d, landmark, _train_params))
        else:
            db_records.append(b.image("distractor", d, None, None))
    test_extra = [b.image("test", t, None, None) for t in range(math.ceil(queries / 2))]
    order = np.random.default_rng([b.seed, 4]).permutation(len(db_records))
    return query_records, [db_records[i] for i in order], test_extra


def generate(out: str, seed: int = 0, landmarks: int = 100, images_per_landmark: int = 12,
             queries: int = 50, distractors: int = 350, size: int = 256, *,
             name: str = DEFAULT_NAME, queries_per_landmark: int = 5,
             images_per_shard: int = 500) -> SynthSummary:
    """Generate a training set (GLDv2 format) and a benchmark (revisitop format) under ``out``.

    The benchmark has ``ceil(queries / queries_per_landmark)`` landmarks, each with
    ``3 * images_per_landmark`` database views, plus ``distractors`` database images (half of
    them views of unlisted landmarks of the benchmark's families) and ``ceil(queries / 2)``
    GLDv2 test images without a match. ``out`` must not exist or be empty; it appears complete
    or not at all. Defaults: 1,985 images at 256 px.
    """
    parameters = {"landmarks": landmarks, "images_per_landmark": images_per_landmark,
                  "queries": queries, "distractors": distractors, "size": size,
                  "queries_per_landmark": queries_per_landmark,
                  "images_per_shard": images_per_shard}
    lowest = {"images_per_landmark": 2, "distractors": 0, "size": 64}
    for key, value in parameters.items():
        if value < lowest.get(key, 1):
            raise ValueError(f"{key} must be >= {lowest.get(key, 1)}, got {value}")
    bench = math.ceil(queries / queries_per_landmark)
    families = max(2, math.ceil((landmarks + bench) / LANDMARKS_PER_FAMILY))
    with staged_folder(out) as root:
        b = _Builder(root, seed, size, families, name)
        train = _draw_training(b, landmarks, images_per_landmark, families)
        query_records, db_records, test_extra = _draw_benchmark(
            b, landmarks, queries, queries_per_landmark, 3 * images_per_landmark, distractors,
            families)
        gnd = ground_truth(query_records, db_records)
        _write_revisitop(root / "revisitop" / name, name, query_records, db_records, gnd)
        _write_gldv2(root / "gldv2", train, query_records, db_records, test_extra, gnd,
                     b.train_members, images_per_shard)
        counts = {"train": len(train), "train_landmarks": landmarks, "families": families,
                  "benchmark_landmarks": bench, "queries": len(query_records),
                  "database": len(db_records), "test_distractors": len(test_extra),
                  "images": len(b.records)}
        summary = SynthSummary(str(out), seed, name, parameters, counts, tuple(b.records))
        write_bytes(root / "synth.json",
                    (json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n").encode())
        write_csv(root / "synth_images.csv",
                  ["id", "split", "landmark_id", "family", "visible", "strength"],
                  [(r.image_id, r.split, r.landmark_id, r.family, f"{r.visible:.6f}",
                    f"{r.strength:.6f}") for r in b.records])
    log.info("synthetic collection in %s: %s", out, counts)
    return summary


def ground_truth(queries: list[ImageRecord], database: list[ImageRecord]) -> list[dict]:
    """revisitop ``gnd`` entries (without bbx): easy / hard / junk database indices per query."""
    gnd = []
    for q in queries:
        entry: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for i, r in enumerate(database):
            label = visibility_label(r.visible, r.strength) if r.landmark_id == q.landmark_id else None
            if label:
                entry[label].append(i)
        gnd.append(entry)
    return gnd


def _write_revisitop(folder: Path, name: str, queries: list[ImageRecord],
                     database: list[ImageRecord], ground: list[dict]) -> None:
    gnd = [{"bbx": list(q.bbx or ()), **entry} for q, entry in zip(queries, ground)]
    write_pickle(folder / f"gnd_{name}.pkl", {"imlist": [r.image_id for r in database],
                                             "qimlist": [r.image_id for r in queries], "gnd": gnd})


def _write_gldv2(folder: Path, train: list[ImageRecord], queries: list[ImageRecord],
                 database: list[ImageRecord], test_extra: list[ImageRecord],
                 ground: list[dict], members: list[tuple[str, bytes]], per_shard: int) -> None:
    write_csv(folder / "train.csv", ["id", "url", "landmark_id"],
              [(r.image_id, f"https://synthetic.invalid/train/{r.image_id}.jpg", r.landmark_id)
               for r in train])
    by_landmark: dict[int, list[ImageRecord]] = {}
    for r in train:
        by_landmark.setdefault(r.landmark_id, []).append(r)
    clean = []
    for lid, images in by_landmark.items():
        dropped = min(images, key=lambda r: r.visible)
        clean.append((lid, " ".join(r.image_id for r in images if r is not dropped)))
    write_csv(folder / "train_clean.csv", ["landmark_id", "images"], clean)
    write_csv(folder / "train_label_to_category.csv", ["landmark_id", "category"],
              [(lid, f"http://commons.wikimedia.org/wiki/Category:Synthetic_family_"
                     f"{images[0].family}_landmark_{lid}") for lid, images in by_landmark.items()])
    write_csv(folder / "index.csv", ["id"], [(r.image_id,) for r in database])
    write_csv(folder / "test.csv", ["id"], [(r.image_id,) for r in queries + test_extra])
    write_csv(folder / "index_image_to_landmark.csv", ["id", "landmark_id"],
              [(r.image_id, r.landmark_id) for r in database if r.landmark_id >= 0])
    solution = []
    for qi, (q, entry) in enumerate(zip(queries, ground)):
        matches = sorted(entry["easy"] + entry["hard"])
        solution.append((q.image_id, " ".join(database[i].image_id for i in matches),
                         "Public" if qi % 3 == 0 else "Private"))
    solution += [(r.image_id, "None", "Ignored") for r in test_extra]
    write_csv(folder / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"], solution)
    write_tar_shards(folder / "train", sorted(members), per_shard)
