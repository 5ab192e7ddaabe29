"""CVNet as MLflow models (pyfunc): ``cvnet-global`` gives descriptors, ``cvnet-rerank`` match probabilities.

Inputs are pandas DataFrames of encoded images (JPEG / PNG / WebP ... bytes, decoded as
``cv2.imread`` would, see :func:`cvnet.data.images.decode_image`):

- ``global``: column ``image``; ``predict`` returns an (N, 2048) float32 array of multi-scale
  descriptors (scales 0.7071, 1, 1.4142; rows L2-normalised).
- ``rerank``: columns ``query`` (the query image, already cropped to its box) and
  ``candidate``; ``predict`` returns an (N,) float32 array, the probability that each candidate
  shows the query's landmark. An image that occurs in several pairs is featurised once.

The CVNet checkpoint is the model's artifact ``checkpoint``; the ``cvnet`` package travels with
the model (``code_paths``), so ``mlflow.pyfunc.load_model(uri)`` needs only torch, numpy,
OpenCV and mlflow in the loading process.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from cvnet.data.images import decode_image
from cvnet.models.global_net import DEFAULT_SCALES, DESCRIPTOR_DIM

KINDS = ("global", "rerank")
CHECKPOINT = "checkpoint"
SIGNATURES = {
    "global": ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                             outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, DESCRIPTOR_DIM))])),
    "rerank": ModelSignature(inputs=Schema([ColSpec("binary", "query"), ColSpec("binary", "candidate")]),
                             outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))])),
}


class _CVNetModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from cvnet.models.checkpoints import load_model

        self.model = load_model(context.artifacts[CHECKPOINT])


class GlobalModel(_CVNetModel):
    """``predict(DataFrame[image]) -> (N, 2048) float32`` global descriptors."""

    def predict(self, context, model_input, params=None):  # noqa: ARG002 (pyfunc interface)
        images = [decode_image(bytes(data), f"image row {i}") for i, data in enumerate(model_input["image"])]
        return self.model.global_descriptor(images, DEFAULT_SCALES)


class RerankModel(_CVNetModel):
    """``predict(DataFrame[query, candidate]) -> (N,) float32`` match probabilities."""

    def predict(self, context, model_input, params=None):  # noqa: ARG002 (pyfunc interface)
        queries, candidates = (list(map(bytes, model_input[c])) for c in ("query", "candidate"))
        features = {}
        for column, values in (("query", queries), ("candidate", candidates)):
            for i, data in enumerate(values):
                if data not in features:
                    features[data] = self.model.rerank_features(decode_image(data, f"{column} row {i}"))
        out = np.empty(len(queries), dtype=np.float32)
        for query in dict.fromkeys(queries):
            rows = [i for i, q in enumerate(queries) if q == query]
            out[rows] = self.model.match_probability(features[query],
                                                     [features[candidates[i]] for i in rows])
        return out


MODEL_CLASSES = {"global": GlobalModel, "rerank": RerankModel}


def pip_requirements() -> list[str]:
    """What the loading process needs besides the bundled ``cvnet`` code (this process's versions)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("torch", "numpy", "opencv-python-headless", "mlflow")]


def log_cvnet_model(checkpoint: str, kind: str, name: str = "model") -> Any:
    """Log ``checkpoint`` (a CVNet checkpoint path or URI) as a pyfunc model of ``kind``
    (``global`` or ``rerank``) in the active run; returns MLflow's ``ModelInfo``."""
    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r}: expected one of {KINDS}")
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        code = shutil.copytree(package, Path(tmp) / package.name,
                               ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name=name, python_model=MODEL_CLASSES[kind](), artifacts={CHECKPOINT: checkpoint},
            code_paths=[str(code)], signature=SIGNATURES[kind], pip_requirements=pip_requirements(),
            metadata={"cvnet_kind": kind, "scales": list(DEFAULT_SCALES)})
