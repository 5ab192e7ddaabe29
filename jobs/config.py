"""Typed job configs: a YAML file plus ``key=value`` overrides (dotted keys, YAML values).

Errors name the offending key: an unknown key, a value of the wrong type, a malformed
override. Configs never hold credentials (those come from the AWS chain / environment).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str = Field("", description="GLDv2-format root (train_clean.csv + train/) or a manifest")
    split: str = "train_clean"
    image_size: int = Field(224, gt=15, description="square training crop side, pixels")
    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip: bool = True
    sampling: Literal["uniform", "balanced"] = "uniform"


class ModelConfig(_Section):
    depth: Literal[50, 101] = 50
    backbone_init: str | None = Field(None, description="ImageNet ResNet checkpoint path/URI")
    init_seed: int = Field(0, description="seed of the deterministic init without backbone_init")
    freeze_stages: int = Field(0, ge=0, le=4, description="freeze stem + s1..sN (0: none)")
    center_head: bool = Field(False, description="fresh runs: centre the descriptors on a first "
                                                "batch via the whitening bias")


class LossConfig(_Section):
    margin: float = 0.15
    scale: float = 30.0
    t_alpha: float = 0.01
    lambda_cls: float = 0.5
    lambda_con: float = 0.5
    momentum: float = 0.999
    queue_size: int = Field(8192, ge=1)


class OptimConfig(_Section):
    lr: float = Field(0.01, gt=0)
    head_lr_mult: float = Field(1.0, gt=0, description="lr factor for the whitening FC + class weights")
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=2, description="images per worker per step")
    clip_grad_norm: float | None = Field(None, gt=0, description="max global gradient norm (None: no clipping)")


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=0, description="DDP workers (0: local mode in the driver)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    bf16: bool = False


class CheckpointSection(_Section):
    every_steps: int = Field(100, ge=1)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0)
    controller_failure_limit: int = Field(2, ge=0)


class EvalConfig(_Section):
    benchmark: str | None = Field(None, description="revisitop-format dataset dir (gnd_<name>.pkl + jpg/)")
    scales: tuple[float, ...] = (0.7071, 1.0, 1.4142)


class TrainGlobalConfig(_Section):
    name: str = Field("stage1", description="run name: rerunning the same name resumes it")
    store: str | None = None
    tracking_uri: str | None = None
    experiment: str = "cvnet-stage1"
    register_as: str | None = "cvnet-global"
    seed: int = 0
    log_every: int = Field(10, ge=1)
    fault_injection_step: int | None = Field(None, description="tests: raise once at this step")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalConfig = EvalConfig()


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "data.flip=false"]`` -> a nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key!r}: value {raw!r} is not valid YAML ({err})")
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(model: type[M], path: str | Path | None = None,
                overrides: list[str] | None = None) -> M:
    """Build ``model`` from a YAML file (optional) and ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"config file {path}: {err}") from err
        if not isinstance(loaded, (dict, type(None))):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
        source = f" (file {path})" if path else ""
        raise ConfigError(f"invalid config{source}: {problems}") from None
