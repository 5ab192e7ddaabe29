"""Checkpoints: official CVNet ``.pyth`` files, our own format, ImageNet ResNet backbones.

Accepted layouts of a CVNet checkpoint: a bare state dict or ``{"model_state": ...}``; keys
may carry the official variant's ``globalmodel.`` prefix (ours: ``encoder_q.``) or DDP's
``module.``. Our format adds ``"cvnet": {"format": 1, "depth": ..., **metadata}``. Files are
read with ``torch.load(weights_only=True)`` from a local path or any URI of
:func:`cvnet.storage.filesystem`; a bad file raises :class:`CheckpointError`.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cvnet import storage
from cvnet.models.cvnet import CVNet
from cvnet.models.resnet import STAGE_DEPTHS, STAGES

FORMAT_VERSION = 1
StateDict = dict[str, torch.Tensor]
Source = str | os.PathLike | Mapping[str, Any]
_SHOWN = 5


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOWN else ''})"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; names the file, the reason and the missing/unexpected keys."""

    def __init__(self, source: str, reason: str, missing: list[str] | None = None,
                 unexpected: list[str] | None = None):
        self.source = source
        self.missing = sorted(missing or [])
        self.unexpected = sorted(unexpected or [])
        message = f"checkpoint {source}: {reason}"
        if self.missing:
            message += f"; missing keys: {_preview(self.missing)}"
        if self.unexpected:
            message += f"; unexpected keys: {_preview(self.unexpected)}"
        super().__init__(message)


def source_name(source: Source) -> str:
    """A printable, credential-free name for a checkpoint source."""
    return storage.redact(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "<state dict>"


def read_checkpoint(uri: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of a local path or URI, on the CPU."""
    name = source_name(uri)
    fs, path = storage.filesystem(os.fspath(uri))
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(name, "no such file") from None
    except OSError as err:
        raise CheckpointError(name, f"cannot read ({type(err).__name__}: {err})") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        reason = f"not a readable torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        raise CheckpointError(name, reason) from None


def submodule_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` (e.g. ``"conv2ds."``), with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _rename(key: str) -> str:
    key = key.removeprefix("module.")
    if key.startswith("globalmodel."):
        return "encoder_q." + key[len("globalmodel."):]
    return key


def state_dict_of(checkpoint: Any, name: str) -> StateDict:
    """The tensors of a loaded checkpoint: unwraps ``model_state`` and renames prefixes."""
    if isinstance(checkpoint, Mapping) and "model_state" in checkpoint:
        checkpoint = checkpoint["model_state"]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(name, f"expected a state dict, got {type(checkpoint).__name__}")
    bad = [str(k) for k, v in checkpoint.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(name, f"{len(bad)} entries are not tensors: {', '.join(bad[:_SHOWN])}")
    return {_rename(k): v for k, v in checkpoint.items()}


def load_state(source: Source) -> StateDict:
    """The (renamed) state dict of a checkpoint path/URI or of an in-memory (wrapped) state dict."""
    name = source_name(source)
    checkpoint = source if isinstance(source, Mapping) else read_checkpoint(source)
    return state_dict_of(checkpoint, name)


def infer_depth(state: Mapping[str, torch.Tensor], name: str = "<state dict>") -> int:
    """ResNet depth from the number of stage-3 blocks (6 -> 50, 23 -> 101)."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder_q\.s3\.b(\d+)\.", k))}
    by_count = {depths[2]: depth for depth, depths in STAGE_DEPTHS.items()}
    count = max(blocks, default=0)
    if count not in by_count:
        raise CheckpointError(name, f"cannot infer the ResNet depth: {count} stage-3 blocks "
                                    f"(expected {sorted(by_count)}); not a CVNet checkpoint?")
    return by_count[count]


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], name: str,
               optional: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes; keys ending in ``optional`` may be absent."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(name, "keys do not match the model", missing, unexpected)
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(name, f"{len(wrong)} tensors have the wrong shape: {', '.join(wrong[:_SHOWN])}")
    module.load_state_dict(state, strict=not optional)


def load_model(source: Source, depth: int | None = None, device: str | torch.device = "cpu") -> CVNet:
    """A CVNet in eval mode from a checkpoint path/URI or a state dict; depth inferred from the keys.

    The global network is put in channels_last memory format: still fp32, within 1e-7 of
    contiguous, and about 1.4x faster on the CPU (bench/extract.py).
    """
    from cvnet.registry import resolve_checkpoint  # models:/NAME@ALIAS and models:/NAME/VERSION
    source = resolve_checkpoint(source)
    name = source_name(source)
    checkpoint = source if isinstance(source, Mapping) else read_checkpoint(source)
    state = state_dict_of(checkpoint, name)
    model = CVNet(depth or infer_depth(state, name), checkpoint_rerank_scale(checkpoint))
    load_exact(model, state, name)
    model.encoder_q.to(memory_format=torch.channels_last)
    return model.to(device).eval()


def extractor_sha256(source: Source) -> str:
    """The identity of what a CVNet checkpoint extracts: a SHA-256 of its global network's
    tensors (``encoder_q``, whose stages also give the re-ranker's maps) and the settings the
    extraction reads from it. Checkpoints that differ only in the re-ranker (a stage-2 model
    and the one it was fine-tuned from, backbone frozen) extract the same features, so their
    extraction outputs are shared. A local file is hashed once per (path, size, mtime): the
    steps of one job that each ask for it load the checkpoint once."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        stat = os.stat(source)
        return _file_extractor_sha256(os.path.abspath(source), stat.st_size, stat.st_mtime_ns)
    return _extractor_digest(load_model(source))


@functools.lru_cache(maxsize=16)
def _file_extractor_sha256(path: str, size: int, mtime_ns: int) -> str:
    return _extractor_digest(load_model(path))


def _extractor_digest(model: CVNet) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps({"depth": model.depth, "rerank_scale": model.rerank_scale},
                                       sort_keys=True).encode())
    for name, tensor in sorted(model.encoder_q.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_rerank_scale(checkpoint: Any) -> float:
    """The re-ranker's image scale recorded in a loaded checkpoint of our format (1.0 otherwise:
    released checkpoints and state dicts)."""
    meta = checkpoint.get("cvnet") if isinstance(checkpoint, Mapping) else None
    return float(meta.get("rerank_scale", 1.0)) if isinstance(meta, Mapping) else 1.0


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    reserved = {"format", "depth", "rerank_scale"} & set(metadata)
    if reserved:
        raise ValueError(f"checkpoint metadata may not set the reserved keys {sorted(reserved)}")
    try:
        json.dumps(metadata)
    except TypeError as err:
        raise ValueError(f"checkpoint metadata must be JSON-like (str, numbers, lists, dicts): {err}") from None


def save_checkpoint(model: CVNet, uri: str, metadata: dict | None = None) -> None:
    """Save ``{"model_state": ..., "cvnet": {"format": 1, "depth": ..., **metadata}}`` atomically;
    a re-ranker scale other than the reference 1.0 is kept as ``"rerank_scale"``."""
    metadata = dict(metadata or {})
    _check_metadata(metadata)
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.rerank_scale != 1.0:
        metadata["rerank_scale"] = model.rerank_scale
    torch.save({"model_state": state, "cvnet": {"format": FORMAT_VERSION, "depth": model.depth, **metadata}}, buffer)
    storage.put_atomic(os.fspath(uri), buffer.getvalue())


_TORCHVISION_LEAVES = {"conv1": "f.a", "bn1": "f.a_bn", "conv2": "f.b", "bn2": "f.b_bn", "conv3": "f.c",
                       "bn3": "f.c_bn", "downsample.0": "proj", "downsample.1": "bn"}
_TORCHVISION_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)")


def torchvision_to_pycls(key: str) -> str | None:
    """The pycls name of a torchvision ResNet key; None for the classifier ``fc.*``."""
    if key.startswith("fc."):
        return None
    if key.startswith(("conv1.", "bn1.")):
        module, leaf = key.split(".", 1)
        return f"stem.{'conv' if module == 'conv1' else 'bn'}.{leaf}"
    m = _TORCHVISION_BLOCK.fullmatch(key)
    if not m:
        return key  # reported as unexpected by the caller
    stage, block, module, leaf = m.groups()
    return f"s{stage}.b{int(block) + 1}.{_TORCHVISION_LEAVES[module]}.{leaf}"


def load_imagenet_backbone(global_net: nn.Module, source: Source) -> None:
    """Load ImageNet ResNet weights (torchvision or pycls names) into the trunk of ``global_net``.

    The classifier (``fc.*`` / ``head.*``) is ignored and ``global_net.head`` keeps its values;
    every trunk tensor must be present (``num_batches_tracked`` may be absent).
    """
    name = source_name(source)
    state = load_state(source)
    if "conv1.weight" in state:
        renamed = {torchvision_to_pycls(k): v for k, v in state.items()}
        state = {k: v for k, v in renamed.items() if k is not None}
        name += " (torchvision names; missing keys named as pycls)"
    else:
        state = {k.removeprefix("encoder_q."): v for k, v in state.items() if not k.startswith("head.")}
    trunk = nn.Module()
    for child in STAGES:
        trunk.add_module(child, getattr(global_net, child))
    load_exact(trunk, state, name, optional=("num_batches_tracked",))
