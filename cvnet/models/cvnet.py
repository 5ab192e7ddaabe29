"""The whole CVNet model with the reference state-dict names (SPEC §3.6).

``encoder_q`` is the global network (:class:`GlobalNet`), ``conv2ds`` the three per-scale
Conv2d(1024, 256) of the re-ranking pyramid and ``cv_learner`` the correlation verifier.
The inference methods take HxWx3 uint8 BGR arrays (as ``cv2.imread`` returns them) and run
in eval mode without gradients, restoring the previous mode afterwards, and run the global
network as an inference copy with BatchNorm folded into the convs (rebuilt when a weight or
buffer of ``encoder_q`` changes; ``encoder_q`` itself, which training uses, is untouched). The
default fp32 is exact (TF32 convolutions off on CUDA); ``precision="bf16"`` (autocast) is an
opt-in fast path.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cvnet.data.images import resize_for_scale
from cvnet.models.global_net import DEFAULT_SCALES, GlobalNet, check_image, multiscale_descriptors, to_batch
from cvnet.models.rerank import CVLearner, RerankFeatures, compute_rerank_features, make_conv2ds
from cvnet.models.precision import precision_context
from cvnet.models.rerank import match_probability as rerank_match_probability
from cvnet.models.resnet import fold_batchnorm


class CVNet(nn.Module):
    """CVNet-Global + CVNet-Rerank; ``CVNet(depth)`` has torch's default random init.

    ``rerank_scale`` is the image scale of the re-ranker's stage-3 maps (the reference: 1.0);
    a re-ranker trained on upscaled crops (the 128 px demo images at 256 px) keeps its scale
    here and in its checkpoint, so extraction, re-ranking and evaluation see what it learned on.
    """

    def __init__(self, depth: int = 50, rerank_scale: float = 1.0):
        super().__init__()
        if rerank_scale <= 0:
            raise ValueError(f"rerank_scale: {rerank_scale} must be > 0")
        self.encoder_q = GlobalNet(depth)
        self.conv2ds = make_conv2ds()
        self.cv_learner = CVLearner()
        self.rerank_scale = float(rerank_scale)

    @property
    def depth(self) -> int:
        return self.encoder_q.depth

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def inference_encoder(self) -> GlobalNet:
        """``encoder_q`` with BatchNorm folded (:func:`fold_batchnorm`), cached until one of its
        tensors is replaced or modified in place (moved, loaded, an optimiser step)."""
        key = tuple((t.data_ptr(), t._version) for t in self.encoder_q.state_dict().values())
        cached = self.__dict__.get("_folded_encoder")
        if cached is None or cached[0] != key:
            cached = (key, fold_batchnorm(self.encoder_q))
            self.__dict__["_folded_encoder"] = cached  # a plain attribute: not a submodule, not in the state dict
        return cached[1]

    @contextmanager
    def _inference(self, precision: str = "fp32") -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), precision_context(self.device, precision):
                yield
        finally:
            self.train(was_training)

    def global_descriptor(self, images: Sequence[np.ndarray], scales: Sequence[float] = DEFAULT_SCALES,
                          batch_size: int = 8, precision: str = "fp32") -> np.ndarray:
        """(N, 2048) float32 multi-scale descriptors, rows L2-normalised, of BGR uint8 images.

        ``precision``: ``"fp32"`` (exact) or ``"bf16"`` (autocast, approximate).
        """
        with self._inference(precision):
            return multiscale_descriptors(self.inference_encoder(), images, scales, batch_size)

    def feature_map_tensor(self, image: np.ndarray) -> torch.Tensor:
        """Pre-ReLU stage-3 map (1024, ceil(H/16), ceil(W/16)) of one image at scale 1.0, on the model's device."""
        check_image(image, 0)
        with self._inference():
            return self.inference_encoder().stage3(to_batch([image], self.device))[0]

    def feature_map(self, image: np.ndarray) -> np.ndarray:
        """:meth:`feature_map_tensor` as a float32 numpy array."""
        return self.feature_map_tensor(image).float().cpu().numpy()

    def rerank_features(self, image: np.ndarray) -> RerankFeatures:
        """The per-image, cacheable re-ranking input (``.to_bytes()`` serialises it), from the
        stage-3 map of the image resized by :attr:`rerank_scale`."""
        check_image(image, 0)
        feature_map = self.feature_map_tensor(resize_for_scale(image, self.rerank_scale))
        with self._inference():
            return compute_rerank_features(feature_map, self.conv2ds)

    def match_probability(self, query_features: RerankFeatures,
                          key_features_list: Sequence[RerankFeatures],
                          precision: str = "fp32") -> np.ndarray:
        """(K,) float32 probability that each key shows the query's landmark; ``precision``:
        ``"fp32"`` (exact) or ``"bf16"`` (autocast, approximate)."""
        with self._inference():
            return rerank_match_probability(self.cv_learner, query_features, key_features_list,
                                            precision=precision)
