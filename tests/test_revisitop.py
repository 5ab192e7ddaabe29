"""Revisitop ground truth (safe loading), manifests, query crops, R1M list and shortlists."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvnet.data.images import crop_query, decode_image
from cvnet.data.manifest import read_image_bytes
from cvnet.data.revisitop import (
    GroundTruthError, load_ground_truth, load_query_image, r1m_manifest, revisitop_manifest,
    shortlist_gt_aware, shortlist_topk,
)

REVISITOP = Path(__file__).parent / "fixtures" / "revisitop"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name, n_db", [("roxford5k", 4993), ("rparis6k", 6322)])
def test_real_ground_truth_loads(name, n_db):
    gt = load_ground_truth(str(REVISITOP / f"gnd_{name}.pkl"))
    assert len(gt["imlist"]) == n_db and len(gt["qimlist"]) == 70 and len(gt["gnd"]) == 70
    assert set(gt["gnd"][0]) == {"bbx", "easy", "hard", "junk"}
    assert max(max(e["easy"] + e["hard"] + e["junk"]) for e in gt["gnd"]) < n_db


def test_malicious_pickle_is_refused(workdir):
    marker = workdir / "pwned"
    path = workdir / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_RunsCode(marker)]}))
    with pytest.raises(GroundTruthError, match=r"refused pickle global (posix|os|nt)\.system"):
        load_ground_truth(str(path))
    assert not marker.exists()


def test_numpy_and_other_globals_are_refused(workdir):
    path = workdir / "gnd_np.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"],
                                   "gnd": [{"easy": np.array([0]), "hard": [], "junk": []}]}))
    with pytest.raises(GroundTruthError, match="refused pickle global numpy"):
        load_ground_truth(str(path))


def test_sets_allowed_but_structure_checked(workdir):
    path = workdir / "gnd_set.pkl"
    gt = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"easy": [1], "hard": [], "junk": []}],
          "tags": {"x", "y"}}
    path.write_bytes(pickle.dumps(gt, protocol=2))  # protocol 2 rebuilds sets via builtins.set
    assert load_ground_truth(str(path))["tags"] == {"x", "y"}
    gt["gnd"][0]["junk"] = [7]
    path.write_bytes(pickle.dumps(gt))
    with pytest.raises(GroundTruthError, match=r"gnd\[0\]\['junk'\] has indices outside \[0, 2\)"):
        load_ground_truth(str(path))
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(GroundTruthError, match="top level is list"):
        load_ground_truth(str(path))
    path.write_bytes(b"not a pickle")
    with pytest.raises(GroundTruthError, match="not a readable pickle"):
        load_ground_truth(str(path))


def test_manifest_and_query_crop(workdir):
    root = workdir / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    shutil.copy(REVISITOP / "gnd_roxford5k.pkl", root)
    table = revisitop_manifest(str(root), "roxford5k")
    gt = load_ground_truth(str(root / "gnd_roxford5k.pkl"))
    assert table.num_rows == 4993 + 70
    assert table["split"].value_counts().to_pylist() == [
        {"values": "db", "counts": 4993}, {"values": "query", "counts": 70}]
    assert table["uri"][0].as_py() == str(root / "jpg" / f"{gt['imlist'][0]}.jpg")
    assert table["image_id"][4993].as_py() == gt["qimlist"][0]
    assert table["bbx"][4993].as_py() == [float(v) for v in gt["gnd"][0]["bbx"]]
    assert table["bbx"].null_count == 4993  # database rows are whole images
    assert revisitop_manifest(str(root), "roxford5k", queries=False).num_rows == 4993
    # query 0's image (PNG bytes behind the .jpg name): pixel value encodes the column
    x1, y1, x2, y2 = gt["gnd"][0]["bbx"]
    image = np.tile((np.arange(int(x2) + 5) % 251).astype(np.uint8)[None, :, None], (int(y2) + 5, 1, 3))
    (root / "jpg" / f"{gt['qimlist'][0]}.jpg").write_bytes(cv2.imencode(".png", image)[1].tobytes())
    crop = load_query_image(str(root), gt, 0)
    assert crop.shape == (int(y2) - int(y1), int(x2) - int(x1), 3)
    assert crop[0, 0, 0] == int(x1) % 251
    # a manifest row crops the same way: crop_query(image, row["bbx"])
    row = table.slice(4993, 1).to_pylist()[0]
    assert np.array_equal(crop_query(decode_image(read_image_bytes(row["uri"])), row["bbx"]), crop)


def test_r1m_manifest(workdir):
    (workdir / "revisitop1m.txt").write_text("a/b.jpg\n")
    with pytest.raises(GroundTruthError, match="unsafe distractor names"):
        r1m_manifest(str(workdir))
    (workdir / "revisitop1m.txt").write_text("img_000001.jpg\nimg_000002.jpg\n\n")
    table = r1m_manifest(str(workdir))
    assert table["image_id"].to_pylist() == ["img_000001", "img_000002"]
    assert table["uri"].to_pylist()[1] == f"{workdir}/jpg/img_000002.jpg"
    assert set(table["split"].to_pylist()) == {"distractor"}


def test_shortlists():
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [3], "hard": [4], "junk": []}]
    ranks = np.array([[2, 4], [1, 3], [5, 2], [0, 1], [6, 0]])
    # easy: hard counts as junk; hard: easy counts as junk; medium: only junk is removed
    assert shortlist_gt_aware(ranks, gnd, "easy", k=3).tolist() == [[5, 3], [0, 2], [6, 1]]
    assert shortlist_gt_aware(ranks, gnd, "hard", k=3).tolist() == [[1, 4], [5, 2], [6, 1]]
    assert shortlist_gt_aware(ranks, {"gnd": gnd}, "medium", k=4).tolist() == [
        [1, 4], [5, 3], [0, 2], [6, 1]]
    with pytest.raises(ValueError, match="query 0: only 4 non-junk candidates"):
        shortlist_gt_aware(ranks, gnd, "medium", k=5)
    with pytest.raises(ValueError, match="unknown protocol"):
        shortlist_gt_aware(ranks, gnd, "extreme", k=2)
    assert shortlist_topk(ranks, k=2).tolist() == [[2, 4], [1, 3]]
    with pytest.raises(ValueError, match="fewer than k=6"):
        shortlist_topk(ranks, k=6)
