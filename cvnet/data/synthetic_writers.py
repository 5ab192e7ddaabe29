"""Byte-reproducible writers for the synthetic collections: JPEG, CSV, tar shards, pickle.

Nothing written here carries a timestamp, a user name or a process-dependent value: JPEGs use
a fixed quality, tar members have mtime 0, uid/gid 0 and a fixed order, CSVs use ``\\n`` line
ends, and the output folder appears in one ``rename`` once everything is written.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import pickle
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

JPEG_QUALITY = 90


def encode_jpeg(image: np.ndarray, name: str) -> bytes:
    """BGR uint8 -> JPEG bytes at a fixed quality (the same bytes every run)."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"{name}: JPEG encoding failed for an image of shape {image.shape}")
    return buf.tobytes()


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A CSV with ``header`` and ``\\n`` line ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_pickle(path: Path, obj: object) -> None:
    """Pickle ``obj`` (plain containers only) with a fixed protocol."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=4))


def tar_shard(members: Sequence[tuple[str, bytes]]) -> bytes:
    """An uncompressed ustar archive of ``(name, data)`` members in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar_shards(folder: Path, members: Sequence[tuple[str, bytes]],
                     per_shard: int) -> list[str]:
    """Write ``images_NNN.tar`` shards plus ``md5.images_NNN.txt`` lists; returns shard names."""
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    names = []
    for shard, start in enumerate(range(0, len(members), per_shard)):
        name = f"images_{shard:03d}.tar"
        data = tar_shard(members[start:start + per_shard])
        write_bytes(folder / name, data)
        write_bytes(folder / f"md5.images_{shard:03d}.txt",
                    f"{hashlib.md5(data).hexdigest()}  {name}\n".encode())
        names.append(name)
    return names


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder that becomes ``out`` only if the block finishes.

    ``out`` must not exist or be an empty folder; on error the staging folder is removed, so a
    failed run leaves nothing half-written behind.
    """
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: output folder exists and is not empty")
    stage = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if target.exists():
        target.rmdir()
    stage.rename(target)


def tree_digest(root: str | os.PathLike) -> str:
    """sha256 over every file's relative path and bytes under ``root``, in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
