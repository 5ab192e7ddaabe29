"""A synthetic distractor set of any size, R1M-style: images that match no benchmark query.

Half of them (``confusers``) are views of landmarks that no benchmark lists, drawn from the same
families as the synthetic benchmark of the same ``seed`` (similar globally, no local match: what
re-ranking should push down); the rest are scenes without a landmark. Written one image at a time
(constant memory) under ``<out>/jpg/`` with the manifest ``<out>/distractors.parquet`` (split
``distractor``); the folder appears complete or not at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cvnet.data.manifest import manifest_table, write_manifest
from cvnet.data.synthetic import _train_params
from cvnet.data.synthetic_scenes import make_family, make_landmark, render_view
from cvnet.data.synthetic_writers import encode_jpeg, staged_folder, write_bytes

MANIFEST = "distractors.parquet"
FIRST_LANDMARK = 1_000_000  # landmark ids of the confusers: far from any benchmark's
VIEWS_PER_CONFUSER = 3


def distractor_id(seed: int, index: int) -> str:
    return f"distractor-{seed}-{index:08d}"


def generate_distractors(out: str, count: int, seed: int = 0, size: int = 256, families: int = 2,
                         confuser_share: float = 0.5) -> str:
    """Write ``count`` distractor images and their manifest under ``out``; returns the manifest path."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 0 <= confuser_share <= 1:
        raise ValueError(f"confuser_share must be in [0, 1], got {confuser_share}")
    kinds = [make_family(f, seed, size) for f in range(max(1, families))]
    confusers = int(count * confuser_share)
    ids, uris = [], []
    with staged_folder(out) as root:
        landmark = None
        for i in range(count):
            rng = np.random.default_rng([seed, 7, i])
            if i < confusers:
                if i % VIEWS_PER_CONFUSER == 0:
                    lm = FIRST_LANDMARK + i // VIEWS_PER_CONFUSER
                    landmark = make_landmark(lm, kinds[lm % len(kinds)], seed, size)
                view = render_view(landmark, _train_params(rng, 0), rng, size)
            else:
                view = render_view(None, None, rng, size)
            iid = distractor_id(seed, i)
            write_bytes(root / "jpg" / f"{iid}.jpg", encode_jpeg(view.image, iid))
            ids.append(iid)
            uris.append(str(Path(out).resolve() / "jpg" / f"{iid}.jpg"))
        write_manifest(manifest_table(ids, uris, "distractor"), str(root / MANIFEST))
    return str(Path(out) / MANIFEST)
