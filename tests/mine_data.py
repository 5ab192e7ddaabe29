"""Features tables for mining and audit tests, written directly (no model): random unit
descriptors clustered by landmark, committed with cvnet.tables as an extraction would."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvnet import features
from cvnet.tables import TableWriter, open_or_create, write_table_fragments


def clustered(n: int, landmarks: np.ndarray, seed: int, spread: float = 1.0) -> np.ndarray:
    """(n, 2048) unit rows; rows of one landmark share a centre (none: no centre)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features.DESCRIPTOR_DIM)).astype(np.float32)
    centres = np.random.default_rng(1000).standard_normal((int(landmarks.max()) + 2, features.DESCRIPTOR_DIM))
    x += spread * centres[np.maximum(landmarks, 0)].astype(np.float32) * (landmarks >= 0)[:, None]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_features(folder: str | Path, ids: Sequence[str], X: np.ndarray, landmarks: Sequence[int | None],
                   uris: Sequence[str] | None = None, replace: bool = False) -> int:
    """Commit rows to the features table of the extraction output ``folder`` (created with
    synthetic settings); ``replace`` deletes their ids first. Returns the table version."""
    uri = str(Path(folder) / features.FEATURES)
    settings = features.extraction_settings("0" * 64, (1.0,), False, False)
    writer = TableWriter(open_or_create(uri, features.features_schema(), "features", "image_id", settings), None)
    if replace:
        writer.delete(ids)
    uris = uris or [f"{folder}/img/{i}.jpg" for i in ids]
    rows = [{"image_id": i, "uri": u, "landmark_id": None if lm is None or lm < 0 else int(lm)}
            for i, u, lm in zip(ids, uris, landmarks)]
    return writer.commit(write_table_fragments(uri, features.features_table(rows, X, False)), list(ids))
