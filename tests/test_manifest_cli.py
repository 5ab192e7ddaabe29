"""``cvnet manifest gldv2 | revisitop | folder`` on a tiny synthetic collection: absolute URIs
from relative roots, the rows, query boxes that crop as the reference does, and the counts of
files found but not listed / listed but missing."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvnet.data.gldv2 import gldv2_manifest
from cvnet.data.images import crop_query, decode_image
from cvnet.data.manifest import (ManifestError, folder_manifest, read_image_bytes, read_manifest,
                                 split_tar_uri)
from cvnet.data.revisitop import load_ground_truth, load_query_image
from jobs.cli import main as cvnet


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cvnet.data.synthetic import generate

    out = tmp_path_factory.mktemp("manifest") / "synth"
    generate(str(out), seed=5, landmarks=3, images_per_landmark=3, queries=4, distractors=2, size=64)
    return out


@pytest.fixture
def copy(synth, tmp_path, monkeypatch) -> Path:
    """A private copy of the collection; the working directory is its parent (relative roots)."""
    shutil.copytree(synth, tmp_path / "synth")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "synth"


def _run(capsys, *argv: str) -> str:
    assert cvnet(["manifest", *argv]) == 0
    return capsys.readouterr().out


def _counts(out: str) -> tuple[int, int, int, int]:
    """(rows written, files found, found but not in the manifest, listed without a file)."""
    written = re.search(r"wrote (\d+) images", out)
    found = re.search(r"found (\d+) files under \S+; (\d+) not in the manifest", out)
    missing = re.search(r"(\d+) listed images without a file", out)
    return int(written[1]), int(found[1]), int(found[2]), int(missing[1])


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_gldv2_from_a_relative_root_writes_absolute_uris(copy, capsys, layout):
    out = _run(capsys, "gldv2", "--root", "synth/gldv2", "--split", "train", "--layout", layout,
               "--out", "m/train.parquet")
    table = read_manifest(str(copy.parent / "m" / "train.parquet"))
    expected = gldv2_manifest(str(copy / "gldv2"), "train", layout)
    assert table.equals(expected)
    files = [(split_tar_uri(u) or (u,))[0] for u in table["uri"].to_pylist()]
    assert all(f.startswith(str(copy / "gldv2" / "train")) for f in files)
    assert _counts(out) == (table.num_rows, table.num_rows, 0, 0)
    image = decode_image(read_image_bytes(table["uri"][0].as_py()))
    assert image.ndim == 3


def test_gldv2_counts_unlisted_and_missing_files(copy, capsys):
    clean = gldv2_manifest(str(copy / "gldv2"), "train_clean")
    train = gldv2_manifest(str(copy / "gldv2"), "train")
    stray = copy / "gldv2" / "train" / "z" / "z" / "z" / "zzz0000000000000.jpg"
    stray.parent.mkdir(parents=True)
    shutil.copy(train["uri"][0].as_py(), stray)
    Path(clean["uri"][1].as_py()).unlink()
    out = _run(capsys, "gldv2", "--root", "synth/gldv2", "--out", "clean.parquet")
    unlisted = train.num_rows - clean.num_rows + 1  # the rest of train.csv and the stray file
    assert _counts(out) == (clean.num_rows, train.num_rows, unlisted, 1)
    assert out.endswith(f"without a file: {clean['uri'][1].as_py()}\n")
    assert read_manifest("clean.parquet")["image_id"].to_pylist() == clean["image_id"].to_pylist()


def test_revisitop_db_queries_with_boxes_and_distractors(copy, capsys):
    bench = copy / "revisitop" / "roxsynth"
    gt = load_ground_truth(str(bench / "gnd_roxsynth.pkl"))
    n_db, n_q = len(gt["imlist"]), len(gt["qimlist"])
    out = _run(capsys, "revisitop", "--root", "synth/revisitop/roxsynth", "--name", "roxsynth",
               "--out", "db.parquet")
    db = read_manifest("db.parquet")
    assert db["image_id"].to_pylist() == gt["imlist"] and db["bbx"].null_count == n_db
    files = len(list((bench / "jpg").iterdir()))
    assert _counts(out) == (n_db, files, files - n_db, 0)  # the queries' files are not listed

    r1m = copy / "r1m"
    (r1m / "jpg").mkdir(parents=True)
    for i in range(2):
        shutil.copy(bench / "jpg" / f"{gt['imlist'][i]}.jpg", r1m / "jpg" / f"d{i}.jpg")
    (r1m / "revisitop1m.txt").write_text("d0.jpg\nd1.jpg\n")
    out = _run(capsys, "revisitop", "--root", "synth/revisitop/roxsynth", "--name", "roxsynth",
               "--queries", "--distractors", "synth/r1m/revisitop1m.txt", "--out", "all.parquet")
    table = read_manifest("all.parquet")
    assert table["split"].value_counts().to_pylist() == [
        {"values": "db", "counts": n_db}, {"values": "query", "counts": n_q},
        {"values": "distractor", "counts": 2}]
    assert _counts(out) == (n_db + n_q + 2, files + 2, files - n_db - n_q, 0)
    queries = table.filter(np.array(table["split"].to_pylist()) == "query")
    assert queries["image_id"].to_pylist() == gt["qimlist"]
    for q, row in enumerate(queries.to_pylist()):
        assert row["bbx"] == [float(v) for v in gt["gnd"][q]["bbx"]]
        assert row["uri"].startswith(str(bench))
        crop = crop_query(decode_image(read_image_bytes(row["uri"])), row["bbx"])
        assert np.array_equal(crop, load_query_image(str(bench), gt, q))  # as the reference crops
    assert table["uri"].to_pylist()[-1] == str(r1m / "jpg" / "d1.jpg")


def test_folder_ids_from_relative_paths(copy, capsys):
    root = copy / "revisitop"
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "b").mkdir(parents=True)
    cv2.imwrite(str(root / "a" / "b" / "c.png"), np.zeros((8, 8, 3), np.uint8))
    out = _run(capsys, "folder", "--root", "synth/revisitop", "--out", "f.parquet")
    table = read_manifest("f.parquet")
    ids = dict(zip(table["image_id"].to_pylist(), table["uri"].to_pylist()))
    assert ids["a/b/c"] == str(root / "a" / "b" / "c.png")
    assert all(i.startswith("roxsynth/jpg/") for i in ids if i != "a/b/c")
    assert set(table["split"].to_pylist()) == {"folder"}
    assert _counts(out) == (len(ids), len(ids) + 2, 2, 0)  # the .pkl and the .txt
    assert "notes.txt" in out
    cv2.imwrite(str(root / "a" / "b" / "c.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ManifestError, match=r"image id 'a/b/c' from both .*c\.jpg and .*c\.png"):
        folder_manifest(str(root))
    assert cvnet(["manifest", "folder", "--root", str(root), "--out", "g.parquet"]) == 1
    assert not Path("g.parquet").exists()
