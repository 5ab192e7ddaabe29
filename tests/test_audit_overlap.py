"""`cvnet audit-overlap` on a synthetic set where some benchmark images copy training images."""
from __future__ import annotations

import re

import cv2
import numpy as np

from cvnet import features
from cvnet.eval.overlap import TABLE
from cvnet.tables import Table
from mine_data import write_features

N_TRAIN, N_BENCH, COPIED = 120, 30, (3, 7, 11, 20, 26)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, features.DESCRIPTOR_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_audit_finds_every_copy_and_flags_nothing_else(tmp_path):
    import mlflow

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    train_ids = [f"t{i:03d}" for i in range(N_TRAIN)]
    train_x = unit(rng, N_TRAIN)
    for i in train_ids:
        cv2.imwrite(str(tmp_path / "img" / f"{i}.jpg"), rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    source = {b: int(s) for b, s in zip(COPIED, rng.choice(N_TRAIN, len(COPIED), replace=False))}
    bench_x = unit(rng, N_BENCH)
    bench_uris = [str(tmp_path / "img" / f"b{i:03d}.jpg") for i in range(N_BENCH)]
    for b, s in source.items():  # a re-encoded copy: a near-identical descriptor, the same picture
        bench_x[b] = train_x[s] + 0.01 * unit(rng, 1)[0]
        bench_uris[b] = str(tmp_path / "img" / f"{train_ids[s]}.jpg")
    bench_x /= np.linalg.norm(bench_x, axis=1, keepdims=True)
    write_features(tmp_path / "train", train_ids, train_x, [i % 7 for i in range(N_TRAIN)],
                   [str(tmp_path / "img" / f"{i}.jpg") for i in train_ids])
    write_features(tmp_path / "bench", [f"b{i:03d}" for i in range(N_BENCH)], bench_x, [-1] * N_BENCH, bench_uris)

    from jobs.cli import build_parser

    out = tmp_path / "audit"
    args = ["audit-overlap", "--train", str(tmp_path / "train"), "--benchmark", str(tmp_path / "bench"),
            "--threshold", "0.9", "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "block_rows=50"]  # the training set searched in three blocks
    before = mlflow.get_tracking_uri()
    parsed = build_parser().parse_args(args)
    try:
        assert parsed._run(parsed) == 0
    finally:
        mlflow.set_tracking_uri(before)
    rows = {r["image_id"]: r for r in Table.open(str(out / TABLE)).read().to_pylist()}
    assert len(rows) == N_BENCH  # every benchmark image has its row
    flagged = {i: r["train_ids"] for i, r in rows.items() if r["train_ids"]}
    assert flagged == {f"b{b:03d}": [train_ids[s]] for b, s in source.items()}
    assert all(s > 0.99 for i in flagged for s in rows[i]["scores"])
    report = (out / "report.html").read_text()
    assert len(re.findall(r'<td class="benchmark"><img src="data:image/jpeg;base64,', report)) == len(COPIED)
    assert len(re.findall(r'<td class="train"><img src="data:image/jpeg;base64,', report)) == len(COPIED)
    assert f"{len(COPIED)} of {N_BENCH} benchmark images" in report
    parsed = build_parser().parse_args(args)  # a rerun finds every row committed: nothing redone
    try:
        assert parsed._run(parsed) == 0
    finally:
        mlflow.set_tracking_uri(before)
    assert Table.open(str(out / TABLE)).num_rows() == N_BENCH
