"""GLDv2 readers and the image manifest, on a generated GLDv2-format tree (local and moto S3)."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pytest

from cvnet.data import manifest as manifest_mod
from cvnet.data.gldv2 import (
    CSV_SPECS, GLDv2FormatError, ShardChecksumError, gldv2_manifest, member_name, parse_gldv2_csv,
    read_gldv2_csv,
)
from cvnet.data.manifest import (
    MANIFEST_SCHEMA, ImageReadError, ManifestError, clear_tar_cache, read_image_bytes,
    read_manifest, tar_member_uri, write_manifest,
)

TRAIN = {f"{i:016x}"[::-1]: i % 3 for i in range(1, 10)}  # id -> landmark (ids start differently)
CLEAN = {0: ["3000000000000000", "6000000000000000"], 2: ["2000000000000000"]}
INDEX = {"aaa0000000000001": 0, "bbb0000000000002": 2, "ccc0000000000003": None}
TEST = ["ddd0000000000004", "eee0000000000005"]


def _jpeg(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (8 + seed, 10, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def _write_subset(root: Path, subset: str, ids: list[str], shards: int) -> dict[str, bytes]:
    """Write ids as the folder layout and as ``shards`` tar shards with md5 lists."""
    data = {image_id: _jpeg(n) for n, image_id in enumerate(ids)}
    for image_id, blob in data.items():
        path = root / subset / member_name(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    for s in range(shards):
        tar_path = root / subset / f"images_{s:03d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for image_id in ids[s::shards]:
                tar.add(root / subset / member_name(image_id), arcname=member_name(image_id))
        md5 = hashlib.md5(tar_path.read_bytes()).hexdigest()
        (root / subset / f"md5.images_{s:03d}.txt").write_text(f"{md5}  images_{s:03d}.tar\n")
    return data


@pytest.fixture
def gldv2_root(workdir: Path) -> tuple[Path, dict[str, bytes]]:
    root = workdir / "gldv2"
    root.mkdir()
    (root / "train.csv").write_text("id,url,landmark_id\n" + "".join(
        f"{i},http://example.com/{i}.jpg,{lm}\n" for i, lm in TRAIN.items()))
    (root / "train_clean.csv").write_text("landmark_id,images\n" + "".join(
        f"{lm},{' '.join(ids)}\n" for lm, ids in CLEAN.items()))
    (root / "train_label_to_category.csv").write_text(
        "landmark_id,category\n0,http://commons/a\n1,http://commons/b\n2,\"http://commons/c,d\"\n")
    (root / "index.csv").write_text("id\n" + "".join(f"{i}\n" for i in INDEX))
    (root / "index_image_to_landmark.csv").write_text("id,landmark_id\n" + "".join(
        f"{i},{lm}\n" for i, lm in INDEX.items() if lm is not None))
    (root / "test.csv").write_text("id\n" + "".join(f"{i}\n" for i in TEST))
    (root / "retrieval_solution_v2.1.csv").write_text(
        f"id,images,Usage\n{TEST[0]},aaa0000000000001 bbb0000000000002,Public\n{TEST[1]},None,Ignored\n")
    blobs = _write_subset(root, "train", list(TRAIN), shards=2)
    blobs |= _write_subset(root, "index", list(INDEX), shards=1)
    blobs |= _write_subset(root, "test", TEST, shards=1)
    clear_tar_cache()
    return root, blobs


def test_csvs_read_into_typed_tables(gldv2_root):
    root, _ = gldv2_root
    train = read_gldv2_csv(str(root / "train.csv"))
    assert train.schema.field("landmark_id").type == pa.int64()
    assert dict(zip(train["id"].to_pylist(), train["landmark_id"].to_pylist())) == TRAIN
    clean = read_gldv2_csv(str(root / "train_clean.csv"))
    assert clean["images"].to_pylist() == list(CLEAN.values())
    categories = read_gldv2_csv(str(root / "train_label_to_category.csv"))
    assert categories["category"].to_pylist()[2] == "http://commons/c,d"
    solution = read_gldv2_csv(str(root / "retrieval_solution_v2.1.csv"))
    assert solution["images"].to_pylist() == [["aaa0000000000001", "bbb0000000000002"], None]
    assert solution["Usage"].to_pylist() == ["Public", "Ignored"]


def test_fast_and_row_by_row_parsers_agree(gldv2_root):
    root, _ = gldv2_root
    for name in CSV_SPECS:
        path = str(root / name)
        with open(path, newline="") as stream:
            slow = parse_gldv2_csv(stream, path, CSV_SPECS[name])
        assert read_gldv2_csv(path).equals(slow), name


@pytest.mark.parametrize("text, expected", [
    ("id,url,landmark_id\n1000000000000000,u,7\n2000000000000000,u,seven\n", ["line 3", "seven"]),
    ("id,url,landmark_id\n1000000000000000,u,7\n1000000000000000,u,8\n", ["line 3", "duplicate id"]),
    ("id,url,landmark_id\n1000000000000000,u\n", ["line 2", "2 fields"]),
    ("id,url,landmark_id\nx/,u,1\n", ["line 2", "bad image id"]),
    ("identifier,url\n", ["line 1", "lacks column"]),
    ("", ["empty file"]),
])
def test_malformed_rows_name_file_and_line(workdir, text, expected):
    path = workdir / "train.csv"
    path.write_text(text)
    with pytest.raises(GLDv2FormatError) as info:
        read_gldv2_csv(str(path))
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_all_bad_rows_counted(workdir):
    path = workdir / "index.csv"
    path.write_text("id\n" + "".join("?\n" for _ in range(30)))
    with pytest.raises(GLDv2FormatError) as info:
        read_gldv2_csv(str(path))
    assert info.value.total == 30 and len(info.value.problems) == 20
    assert "and 10 more" in str(info.value)


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_manifests_of_every_split(gldv2_root, layout):
    root, blobs = gldv2_root
    expected = {
        "train": TRAIN,
        "train_clean": {i: lm for lm, ids in CLEAN.items() for i in ids},
        "index": INDEX,
        "test": dict.fromkeys(TEST),
    }
    for split, labels in expected.items():
        table = gldv2_manifest(str(root), split, layout)
        assert table.schema == MANIFEST_SCHEMA
        assert dict(zip(table["image_id"].to_pylist(), table["landmark_id"].to_pylist())) == labels
        assert set(table["split"].to_pylist()) == {split}
        for image_id, uri in zip(table["image_id"].to_pylist(), table["uri"].to_pylist()):
            assert uri.startswith("tar://") == (layout == "tar")
            assert read_image_bytes(uri) == blobs[image_id]
        with fsspec.open(uri, "rb") as f:  # the URIs are plain fsspec (chained) URLs too
            assert f.read() == blobs[image_id]


def test_tar_members_read_without_rescanning(gldv2_root, monkeypatch):
    root, blobs = gldv2_root
    calls = []
    real_scan = manifest_mod.scan_tar
    monkeypatch.setattr(manifest_mod, "scan_tar", lambda *a, **k: (calls.append(a[1]), real_scan(*a, **k))[1])
    shard = str(root / "train" / "images_000.tar")
    ids = list(TRAIN)[0::2]
    for image_id in ids:
        assert read_image_bytes(tar_member_uri(shard, member_name(image_id))) == blobs[image_id]
    assert calls == [shard]
    monkeypatch.setattr(manifest_mod, "TAR_CACHE_SHARDS", 1)  # a second shard evicts the first
    other = str(root / "train" / "images_001.tar")
    read_image_bytes(tar_member_uri(other, member_name(list(TRAIN)[1])))
    read_image_bytes(tar_member_uri(shard, member_name(ids[0])))
    assert calls == [shard, other, shard]


def test_shard_md5_mismatch_is_refused(gldv2_root):
    root, _ = gldv2_root
    (root / "train" / "md5.images_001.txt").write_text(f"{'0' * 32} images_001.tar\n")
    with pytest.raises(ShardChecksumError, match="images_001.tar"):
        gldv2_manifest(str(root), "train", "tar")
    clear_tar_cache()
    assert gldv2_manifest(str(root), "train", "tar", verify_md5=False).num_rows == len(TRAIN)


def test_image_missing_from_shards_is_reported(gldv2_root):
    root, _ = gldv2_root
    with open(root / "test.csv", "a") as f:
        f.write("fff0000000000009\n")
    with pytest.raises(GLDv2FormatError, match="fff0000000000009.*in no images_"):
        gldv2_manifest(str(root), "test", "tar")


def test_read_errors_name_the_uri(gldv2_root):
    root, _ = gldv2_root
    missing = str(root / "train" / "nope.jpg")
    with pytest.raises(ImageReadError) as info:
        read_image_bytes(missing)
    assert info.value.uri == missing and "not found" in info.value.reason
    member = tar_member_uri(str(root / "test" / "images_000.tar"), "a/b/c/abc.jpg")
    with pytest.raises(ImageReadError, match="no member 'a/b/c/abc.jpg'"):
        read_image_bytes(member)
    with pytest.raises(ImageReadError, match="shard not found"):
        read_image_bytes(tar_member_uri(str(root / "absent.tar"), "x.jpg"))
    shard_path = root / "train" / "images_000.tar"
    with tarfile.open(shard_path) as tar:
        last = tar.getmembers()[-1]
    shard = shard_path.read_bytes()
    broken = root / "broken.tar"  # a shard cut short by an interrupted copy
    for cut in (last.offset + 100, last.offset_data + 1, last.offset_data + last.size):
        broken.write_bytes(shard[:cut])
        clear_tar_cache()
        with pytest.raises(ImageReadError, match="broken.tar: (truncated tar shard|not a readable)"):
            read_image_bytes(tar_member_uri(str(broken), member_name(list(TRAIN)[0])))


def test_errors_never_show_credentials_in_uris():
    uri = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/train/x.jpg"
    for error in (ImageReadError(uri, "file not found"), ManifestError(uri, "bad"),
                  GLDv2FormatError(uri, [(3, "bad row")])):
        assert "wJalrXUtnFEMI" not in str(error) and "bucket/train/x.jpg" in str(error)


def test_manifest_roundtrip_and_validation(gldv2_root, workdir):
    root, _ = gldv2_root
    table = gldv2_manifest(str(root), "index")
    out = str(workdir / "out" / "manifest.parquet")
    write_manifest(table, out)
    assert read_manifest(out).equals(table)
    assert [p.name for p in (workdir / "out").iterdir()] == ["manifest.parquet"]  # no temp left
    folder = workdir / "shards"  # a folder of Parquet shards reads as one manifest
    write_manifest(table.slice(0, 1), str(folder / "part-0.parquet"))
    write_manifest(table.slice(1), str(folder / "part-1.parquet"))
    assert read_manifest(str(folder)).sort_by("image_id").equals(table.sort_by("image_id"))
    csv_path = workdir / "m.csv"
    csv_path.write_text("image_id,uri,landmark_id,split\na,/x/a.jpg,3,train\nb,/x/b.jpg,,train\n")
    assert read_manifest(str(csv_path))["landmark_id"].to_pylist() == [3, None]
    with pytest.raises(ManifestError, match="missing column.*split"):
        write_manifest(table.drop_columns(["split"]), out)
    csv_path.write_text("image_id,uri,landmark_id,split\na,,3,train\n")
    with pytest.raises(ManifestError, match="'uri' has 1 null"):
        read_manifest(str(csv_path))


def test_readers_through_s3(gldv2_root, s3_bucket):
    import s3fs

    root, blobs = gldv2_root
    fs = s3fs.S3FileSystem()
    fs.put(str(root), f"{s3_bucket[5:]}/gldv2", recursive=True)
    s3_root = f"{s3_bucket}/gldv2"
    clear_tar_cache()
    for layout in ("folder", "tar"):
        table = gldv2_manifest(s3_root, "train_clean", layout)
        assert table["image_id"].to_pylist() == [i for ids in CLEAN.values() for i in ids]
        for image_id, uri in zip(table["image_id"].to_pylist(), table["uri"].to_pylist()):
            assert uri.startswith("tar://" if layout == "tar" else "s3://")
            assert read_image_bytes(uri) == blobs[image_id]
    out = f"{s3_bucket}/datasets/train_clean.parquet"
    write_manifest(table, out)
    assert read_manifest(out).equals(table)
    with pytest.raises(ImageReadError, match="not found"):
        read_image_bytes(f"{s3_bucket}/gldv2/missing.jpg")


def test_relative_uris_resolve_against_the_manifest_folder(gldv2_root, workdir, monkeypatch, caplog):
    """A manifest with relative paths (written by hand, not by write_manifest) reads with its
    images found from any working directory: paths resolve against the manifest's folder."""
    import pyarrow.parquet as pq

    root, blobs = gldv2_root
    table = gldv2_manifest(str(root), "index")
    ids = table["image_id"].to_pylist()
    relative = [f"gldv2/index/{member_name(i)}" for i in ids[:-1]]
    relative.append(tar_member_uri("gldv2/index/images_000.tar", member_name(ids[-1])))
    pq.write_table(table.set_column(1, "uri", pa.array(relative)).drop_columns(["bbx"]),
                   workdir / "rel.parquet")  # also an old manifest: no bbx column
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    read = read_manifest("../rel.parquet")
    assert read["uri"].to_pylist()[:-1] == [str(root / "index" / member_name(i)) for i in ids[:-1]]
    assert read["uri"][-1].as_py() == tar_member_uri(str(root / "index" / "images_000.tar"),
                                                     member_name(ids[-1]))
    assert [read_image_bytes(u) for u in read["uri"].to_pylist()] == [blobs[i] for i in ids]
    assert read["bbx"].null_count == len(ids)
    assert f"{len(ids)} relative image path(s) resolved against its folder {workdir}" in caplog.text
    # writers store absolute paths: relative ones resolve against the writer's working directory
    write_manifest(table.set_column(1, "uri", pa.array([f"x/{i}.jpg" for i in ids])), "w.parquet")
    stored = pq.read_table(elsewhere / "w.parquet")["uri"].to_pylist()
    assert stored == [str(elsewhere / "x" / f"{i}.jpg") for i in ids]


def test_query_boxes_are_validated(gldv2_root, workdir):
    root, _ = gldv2_root
    table = gldv2_manifest(str(root), "test")
    boxes = pa.array([[1.0, 2.0, 30.0, 40.0], [1.0, 2.0, 3.0]], pa.list_(pa.float64()))
    with pytest.raises(ManifestError, match="'bbx' has 1 box"):
        write_manifest(table.set_column(4, "bbx", boxes), str(workdir / "m.parquet"))
    write_manifest(table.set_column(4, "bbx", pa.array([[1, 2, 30, 40], None], boxes.type)),
                   str(workdir / "m.parquet"))
    assert read_manifest(str(workdir / "m.parquet"))["bbx"].to_pylist() == [[1, 2, 30, 40], None]
