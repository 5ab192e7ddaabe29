"""cvnet report: the page and its PNGs from a committed rankings table, rendered in headless Chromium."""
from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pytest

from cvnet.data.revisitop import load_ground_truth
from cvnet.data.synthetic import generate
from cvnet.eval.report import pr_curve
from cvnet.retrieval import RANKINGS_SCHEMA, fuse
from cvnet.search import TopK
from cvnet.tables import TableWriter, open_or_create, write_table_fragments

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_pr_curve_of_a_list():
    curve = pr_curve(np.array(["a", "j", "x", "b"]), {"a", "b"}, {"j"})  # junk removed: a x b
    assert curve[0] == 1.0 and curve[-1] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A committed rankings table over a tiny synthetic benchmark (random global scores, a
    probability that favours positives), and the report written from it by the CLI."""
    folder = tmp_path_factory.mktemp("report")
    generate(str(folder / "synth"), seed=1, landmarks=2, images_per_landmark=2, queries=4, distractors=4, size=64)
    root = str(folder / "synth" / "revisitop" / "roxsynth")
    gt = load_ground_truth(f"{root}/gnd_roxsynth.pkl")
    rng = np.random.default_rng(0)
    names = np.array(gt["imlist"])
    ids = np.stack([rng.permutation(names) for _ in gt["qimlist"]])
    scores = -np.sort(-rng.random(ids.shape), axis=1).astype(np.float32)
    positives = [set(names[e["easy"] + e["hard"]]) for e in gt["gnd"]]
    p = np.array([[float(i in positives[q]) for i in row[:5]] for q, row in enumerate(ids)], np.float32)
    rows = fuse(TopK(np.array(gt["qimlist"]), ids, scores), p)
    uri = str(folder / "rankings")
    writer = TableWriter(open_or_create(uri, RANKINGS_SCHEMA, "rankings", "query_id", {}), None)
    writer.commit(write_table_fragments(uri, rows), list(gt["qimlist"]))
    from jobs.cli import main

    out = folder / "out"
    assert main(["report", uri, "--benchmark", root, "--out", str(out),
                 "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]) == 0
    return out


def test_report_files(report):
    page = (report / "index.html").read_text()
    for name in ("ap_scatter.png", "pr.png", "worst.png", "improved.png"):
        image = cv2.imread(str(report / name))
        assert image is not None and image.std() > 5, name  # a drawn figure, not a blank
        assert f'src="{name}"' in page
    assert "<td>global</td>" in page and "<td>re-ranked</td>" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,2600", f"file://{report / 'index.html'}"],
                   check=True, timeout=120, capture_output=True)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (2600, 1000)
    # the figures were loaded: far more than text on white (coloured frames, plotted pixels)
    coloured = (image.max(axis=2).astype(int) - image.min(axis=2)) > 60
    assert coloured.mean() > 0.002
