"""The synthetic landmark generator: determinism, ground truth that follows visibility, formats."""
from __future__ import annotations

import csv
import hashlib
import json
import pickle
import re
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvnet.data.synthetic import (
    EASY_MIN_VISIBLE,
    JUNK_MAX_VISIBLE,
    STRONG_VIEW,
    SynthSummary,
    generate,
    visibility_label,
)
from cvnet.data.synthetic_scenes import (
    ViewParams,
    make_family,
    make_landmark,
    render_view,
    visible_fraction,
)
from cvnet.data.synthetic_writers import staged_folder, tree_digest
from jobs.cli import main as cli_main

SMALL = dict(landmarks=4, images_per_landmark=4, queries=6, distractors=8, size=96)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> SynthSummary:
    out = tmp_path_factory.mktemp("synth") / "small"
    return generate(str(out), seed=3, **SMALL)


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_same_seed_same_bytes_other_seed_differs(tmp_path, capsys):
    a = generate(str(tmp_path / "a"), seed=7, **SMALL)
    code = cli_main(["synth", "--out", str(tmp_path / "b"), "--seed", "7", "--landmarks", "4",
                     "--images-per-landmark", "4", "--queries", "6", "--distractors", "8",
                     "--size", "96"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"] == a.counts
    generate(str(tmp_path / "c"), seed=8, **SMALL)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    files = [p for p in (tmp_path / "a").rglob("*") if p.is_file()]
    shards = list((tmp_path / "a" / "gldv2" / "train").glob("images_*.tar"))
    train = a.counts["train"]  # train jpgs once; benchmark jpgs in gldv2 and revisitop
    assert len(files) == train + 2 * (a.counts["images"] - train) + 2 * len(shards) + 7 + 1 + 2


def test_labels_follow_measured_visibility(small):
    root = Path(small.revisitop_dir)
    gt = pickle.loads((root / f"gnd_{small.name}.pkl").read_bytes())
    records = {r.image_id: r for r in small.images}
    seen = set()
    for qname, entry in zip(gt["qimlist"], gt["gnd"]):
        query = records[qname]
        for label in ("easy", "hard", "junk"):
            for i in entry[label]:
                r = records[gt["imlist"][i]]
                assert r.landmark_id == query.landmark_id
                seen.add(label)
                if label == "easy":
                    assert r.visible >= EASY_MIN_VISIBLE and r.strength < STRONG_VIEW
                elif label == "hard":
                    assert JUNK_MAX_VISIBLE <= r.visible
                    assert r.visible < EASY_MIN_VISIBLE or r.strength >= STRONG_VIEW
                else:
                    assert 0 < r.visible < JUNK_MAX_VISIBLE
        listed = {gt["imlist"][i] for k in ("easy", "hard", "junk") for i in entry[k]}
        same = {n for n in gt["imlist"] if records[n].landmark_id == query.landmark_id
                and records[n].visible > 0}
        assert listed == same  # every visible view of the landmark is labelled, nothing else
        assert entry["easy"], f"query {qname} has no easy positive"
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2 and all(type(v) is float for v in entry["bbx"])
    assert seen == {"easy", "hard", "junk"}
    # the CSV of records matches what generate returned
    header, rows = _rows(Path(small.out) / "synth_images.csv")
    assert header == ["id", "split", "landmark_id", "family", "visible", "strength"]
    assert {r[0]: float(r[4]) for r in rows} == {r.image_id: r.visible for r in small.images}


def test_visibility_label_thresholds():
    assert visibility_label(0.0, 0.0) is None
    assert visibility_label(0.1, 0.0) == "junk"
    assert visibility_label(0.3, 0.0) == "hard"
    assert visibility_label(0.8, 0.7) == "hard"
    assert visibility_label(0.8, 0.2) == "easy"


def test_visible_fraction_measures_crop_and_occlusion():
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 10:50] = 1
    occluded = np.zeros((40, 60), np.uint8)
    assert visible_fraction(mask, np.eye(3), occluded) == 1.0
    occluded[:, :30] = 1  # the left half of the structure
    assert visible_fraction(mask, np.eye(3), occluded) == pytest.approx(0.5)
    shift = np.array([[1, 0, 40], [0, 1, 0], [0, 0, 1]], np.float64)  # 30 of 40 columns leave
    assert visible_fraction(mask, shift, np.zeros((40, 60), np.uint8)) == pytest.approx(0.25)

    landmark = make_landmark(0, make_family(0, 0, 96), 0, 96)
    def view(shift: float) -> float:
        params = ViewParams(zoom=0.8, shift=shift, direction=0.0, strength=0.0,
                            rotation_deg=0.0, occluders=0)
        return render_view(landmark, params, np.random.default_rng(1), 96).visible
    shifts = [view(s) for s in (0.0, 0.5, 0.8, 1.1, 2.0)]
    assert shifts == sorted(shifts, reverse=True)  # pushed out of frame, less is visible
    assert shifts[0] > 0.95 and 0.15 < shifts[2] < 0.85 and shifts[-1] == 0.0


def test_gldv2_files_and_shards(small):
    root = Path(small.gldv2_dir)
    headers = {"train.csv": ["id", "url", "landmark_id"], "train_clean.csv": ["landmark_id", "images"],
               "train_label_to_category.csv": ["landmark_id", "category"], "index.csv": ["id"],
               "test.csv": ["id"], "index_image_to_landmark.csv": ["id", "landmark_id"],
               "retrieval_solution_v2.1.csv": ["id", "images", "Usage"]}
    tables = {}
    for name, header in headers.items():
        got, rows = _rows(root / name)
        assert got == header, name
        tables[name] = rows
    train_ids = [r[0] for r in tables["train.csv"]]
    assert len(train_ids) == SMALL["landmarks"] * SMALL["images_per_landmark"]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in train_ids)
    clean = [i for r in tables["train_clean.csv"] for i in r[1].split()]
    assert set(clean) < set(train_ids) and len(clean) >= 0.7 * len(train_ids)
    for sub, table in (("train", "train.csv"), ("index", "index.csv"), ("test", "test.csv")):
        for (i, *_) in tables[table]:
            assert (root / sub / i[0] / i[1] / i[2] / f"{i}.jpg").is_file(), (sub, i)
    usage = {r[2] for r in tables["retrieval_solution_v2.1.csv"]}
    assert usage <= {"Public", "Private", "Ignored"} and "Ignored" in usage
    index_ids = {r[0] for r in tables["index.csv"]}
    for qid, images, use in tables["retrieval_solution_v2.1.csv"]:
        assert (images == "None") == (use == "Ignored")
        assert images == "None" or set(images.split()) <= index_ids
    members = {}
    shards = sorted((root / "train").glob("images_*.tar"))
    assert shards
    for shard in shards:
        md5 = (root / "train" / f"md5.{shard.name}.txt".replace(".tar.txt", ".txt")).read_text()
        assert md5 == f"{hashlib.md5(shard.read_bytes()).hexdigest()}  {shard.name}\n"
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert m.mtime == 0 and m.uid == 0 and m.gid == 0
                members[m.name] = tar.extractfile(m).read()
    assert sorted(members) == sorted(f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in train_ids)
    for name, data in members.items():
        assert (root / "train" / name).read_bytes() == data
    image = cv2.imdecode(np.frombuffer(next(iter(members.values())), np.uint8), cv2.IMREAD_COLOR)
    assert max(image.shape[:2]) == SMALL["size"]
    summary = json.loads((Path(small.out) / "synth.json").read_text())
    assert summary == small.to_json() and summary["counts"]["images"] == len(small.images)


def test_round_trip_through_the_readers(small):
    from cvnet.data.gldv2 import CSV_SPECS, gldv2_manifest, read_gldv2_csv
    from cvnet.data.revisitop import load_ground_truth

    tables = {name: read_gldv2_csv(str(Path(small.gldv2_dir) / name)) for name in CSV_SPECS}
    solution = tables["retrieval_solution_v2.1.csv"]
    unmatched = [u for u, ids in zip(solution.column("Usage").to_pylist(),
                                     solution.column("images").to_pylist()) if ids is None]
    assert unmatched and set(unmatched) == {"Ignored"}
    assert gldv2_manifest(small.gldv2_dir, "test").num_rows == solution.num_rows

    train = gldv2_manifest(small.gldv2_dir, "train", layout="tar")
    folder = gldv2_manifest(small.gldv2_dir, "train", layout="folder")
    records = {r.image_id: r for r in small.images}
    assert train.column("image_id").to_pylist() == folder.column("image_id").to_pylist()
    assert all(records[i].landmark_id == lid for i, lid in
               zip(train.column("image_id").to_pylist(), train.column("landmark_id").to_pylist()))
    clean = gldv2_manifest(small.gldv2_dir, "train_clean")
    assert 0 < clean.num_rows < train.num_rows
    index = gldv2_manifest(small.gldv2_dir, "index")
    assert index.num_rows == small.counts["database"]
    gt = load_ground_truth(str(Path(small.revisitop_dir) / f"gnd_{small.name}.pkl"))
    assert len(gt["qimlist"]) == SMALL["queries"] and len(gt["imlist"]) == small.counts["database"]


def test_bad_arguments_and_failed_runs_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="landmarks must be >= 1"):
        generate(str(tmp_path / "x"), landmarks=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="full"):
        generate(str(tmp_path / "full"), **SMALL)
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "half") as stage:
            (stage / "part.csv").write_text("id\n")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
