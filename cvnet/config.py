"""Typed job configs (pydantic) and their loading: a YAML file, flags and ``key=value`` overrides.

Every job has one model here; the job code receives the validated object. Sources are merged as
defaults < file < flags < overrides (dotted keys for sections, YAML values). Errors name the
offending key: an unknown key, a value of the wrong type, a malformed override. Configs never
hold credentials (those come from the AWS chain / environment). Pure: pydantic and PyYAML only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)

# Multi-scale inference of the reference (SPEC §2): the one definition in the codebase.
DEFAULT_SCALES: tuple[float, ...] = (0.7071, 1.0, 1.4142)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class Section(BaseModel):
    """A config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- train-global ----------------------------------------------------------------------------

class DataConfig(Section):
    root: str = Field("", description="GLDv2-format root (train_clean.csv + train/) or a manifest")
    split: str = Field("train_clean", description="GLDv2 split (or manifest split) to train on")
    image_size: int = Field(224, gt=15, description="square training crop side, pixels")
    crop_scale: tuple[float, float] = Field((0.25, 1.0), description="random-resized-crop area range")
    flip: bool = Field(True, description="random horizontal flips")
    perspective: float = Field(0.0, ge=0, lt=0.5, description="random perspective: each crop "
                               "corner moves inwards by up to this share of the crop's side (0: off)")
    sampling: Literal["uniform", "balanced"] = Field(
        "uniform", description="uniform: epochs over images; balanced: landmark first, then image")


class ModelConfig(Section):
    depth: Literal[50, 101] = Field(50, description="ResNet depth")
    backbone_init: str | None = Field(None, description="ImageNet ResNet checkpoint path/URI")
    init_seed: int = Field(0, description="seed of the deterministic init without backbone_init")
    freeze_stages: int = Field(0, ge=0, le=4, description="freeze stem + s1..sN (0: none)")
    center_head: bool = Field(False, description="fresh runs: centre the descriptors on a first "
                                                "batch via the whitening bias")


class LossConfig(Section):
    margin: float = Field(0.15, description="CurricularFace margin m (both losses)")
    scale: float = Field(30.0, description="logit scale 1/tau (both losses)")
    t_alpha: float = Field(0.01, description="moving-average rate of the adaptive t")
    lambda_cls: float = Field(0.5, description="weight of the classification loss")
    lambda_con: float = Field(0.5, description="weight of the momentum contrastive loss")
    momentum: float = Field(0.999, description="EMA factor of the momentum encoder")
    queue_size: int = Field(8192, ge=1, description="momentum descriptors kept in the queue")


class OptimConfig(Section):
    lr: float = Field(0.01, gt=0, description="SGD learning rate (warm-up, then cosine to 0)")
    head_lr_mult: float = Field(1.0, gt=0, description="lr factor for the whitening FC + class weights")
    momentum: float = Field(0.9, description="SGD momentum")
    weight_decay: float = Field(1e-4, description="SGD weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    max_steps: int = Field(1000, ge=1, description="training steps in all")
    batch_size: int = Field(16, ge=2, description="images per worker per step")
    clip_grad_norm: float | None = Field(None, gt=0, description="max global gradient norm (None: no clipping)")


class ScalingSection(Section):
    num_workers: int = Field(2, ge=0, description="DDP workers (0: local mode in the driver)")
    use_gpu: bool = Field(False, description="one GPU per worker (nccl), else gloo on CPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (and torch threads)")
    bf16: bool = Field(False, description="bf16 autocast for the forward pass")


class CheckpointSection(Section):
    every_steps: int = Field(100, ge=1, description="checkpoint every N steps")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept in the store")
    max_failures: int = Field(3, ge=0, description="worker-group restarts before the run fails")
    controller_failure_limit: int = Field(2, ge=0, description="Ray Train controller failures allowed")


class LoaderSection(Section):
    workers: int = Field(2, ge=0, description="loader processes per training worker making batches "
                                              "ahead (0: synchronous, in the training loop)")
    prefetch_factor: int = Field(2, ge=1, description="batches each loader process makes ahead")
    context: Literal["forkserver", "spawn"] = Field("forkserver", description="how loader processes start")


class EvalConfig(Section):
    benchmark: str | None = Field(None, description="revisitop-format dataset dir (gnd_<name>.pkl + jpg/)")
    scales: tuple[float, ...] = Field(DEFAULT_SCALES, description="multi-scale inference scales")


class TrainingRun(Section):
    """The fields every training job shares; each stage adds its name, MLflow experiment and
    registered model name, with its own defaults."""

    store: str | None = Field(None, description="store root (default CVNET_STORE or ./cvnet-store)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the store)")
    seed: int = Field(0, description="sampling, augmentation and Hide-and-Seek seed")
    log_every: int = Field(10, ge=1, description="log metrics every N steps")


class TrainGlobalConfig(TrainingRun):
    name: str = Field("stage1", description="run name: rerunning the same name resumes it")
    experiment: str = Field("cvnet-stage1", description="MLflow experiment")
    register_as: str | None = Field("cvnet-global", description="registered model name (None: do not register)")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    loader: LoaderSection = LoaderSection()
    eval: EvalConfig = EvalConfig()


# ---- extract ---------------------------------------------------------------------------------

class ExtractConfig(Section):
    """``cvnet extract``: what to extract (identity of the output) and how to run it."""

    manifest: str = Field(..., description="image manifest URI (Parquet or CSV)")
    model: str = Field(..., description="CVNet checkpoint URI")
    store: str | None = Field(None, description="store root (default CVNET_STORE or ./cvnet-store)")
    output: str | None = Field(None, description="feature table URI (None: derived from the store and model)")
    rerank_features: bool = Field(False, description="also store the rerank pyramid features")
    float16: bool = Field(False, description="store features as float16")
    scales: tuple[float, ...] = Field(DEFAULT_SCALES, min_length=1,
                                      description="multi-scale inference scales")
    shard_size: int = Field(1000, ge=1, description="manifest rows per commit")
    refresh_changed: bool = Field(False, description="re-extract known image_ids whose uri changed")
    retry_bad_inputs: bool = Field(False, description="reprocess the recorded bad inputs")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="fail the run (after committing) "
                                                                 "above this fraction of bad inputs")
    transient_retries: int = Field(3, ge=0, description="retries (with backoff) of a transient read/model failure")
    lease_ttl_s: float = Field(60, gt=0, description="seconds a run's lease on the output lives unless renewed")
    num_actors: int = Field(1, ge=1, description="model actors")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs reserved per actor")
    actor_gpus: float = Field(0, ge=0, description="GPUs per actor (0: CPU actors)")
    torch_threads: int = Field(1, ge=1, description="torch threads per actor")
    batch_size: int = Field(8, ge=1, description="images per forward pass")
    part_rows: int = Field(64, ge=1, description="images per actor call")
    read_rows: int = Field(16, ge=1, description="images per decode task")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else a local Ray)")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (sets AWS_ENDPOINT_URL)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the store)")
    experiment: str = Field("extract", description="MLflow experiment")


# ---- loading ---------------------------------------------------------------------------------

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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (empty file: ``{}``)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path}: {err}") from err
    if not isinstance(loaded, (dict, type(None))):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return loaded or {}


def load_config(model: type[M], path: str | Path | None = None,
                overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> M:
    """Build ``model`` from defaults < YAML file ``path`` < ``values`` (flags) < ``overrides``."""
    data = read_config_file(path) if path is not None else {}
    data = _merge(_merge(data, values or {}), parse_overrides(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
        source = f" (file {path})" if path else ""
        raise ConfigError(f"invalid config{source}: {problems}") from None


def describe_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, description)`` of every key, sections flattened to ``section.key``."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            rows += describe_keys(kind, f"{key}.")
            continue
        default = "required" if field.is_required() else repr(field.default)
        rows.append((key, default, field.description or ""))
    return rows


# ---- rerank / evaluate -----------------------------------------------------------------------

class RerankConfig(Section):
    """``cvnet rerank``: global shortlists, CVNet re-ranking and fused rankings on Ray."""

    gallery: str = Field(..., description="extraction output of the gallery (features URI)")
    queries: str | None = Field(None, description="extraction output of the queries (None: the gallery itself, "
                                                  "all-vs-all, each image's own id excluded)")
    model: str = Field(..., description="CVNet checkpoint URI (its cv_learner scores the shortlists)")
    k: int = Field(100, ge=1, description="shortlist length re-ranked per query")
    rerank: bool = Field(True, description="re-rank the shortlists (False: global rankings only)")
    depth: int | None = Field(None, ge=1, description="global list length kept per query (>= k; None: k)")
    weight: float = Field(0.5, description="fused score = global + weight * match probability")
    index: Literal["flat", "ivf", "ivfpq"] = Field("flat", description="global search: exact, faiss IVF or IVF-PQ")
    nlist: int = Field(1024, ge=1, description="IVF lists per search shard (capped at shard rows / 39)")
    nprobe: int = Field(16, ge=1, description="IVF lists probed per query")
    pq_m: int = Field(64, ge=1, description="IVF-PQ sub-quantisers (divides 2048)")
    recall_queries: int = Field(100, ge=1, description="queries per wave whose IVF recall@k vs exact is measured")
    rerank_from: Literal["cached", "recompute"] = Field(
        "cached", description="cached: the gallery's stored rerank features; recompute: from its images")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="re-ranking precision (bf16: approximate)")
    out: str | None = Field(None, description="rankings table URI (None: <store>/rankings/<name>)")
    name: str = Field("rerank", description="run name (default output folder)")
    store: str | None = Field(None, description="store root (default CVNET_STORE or ./cvnet-store)")
    wave_queries: int = Field(500, ge=1, description="queries per wave (search + re-rank + commit); "
                                                     "per-image work is shared within a wave")
    commit_queries: int = Field(100, ge=1, description="queries per commit of the rankings")
    search_shards: int | None = Field(None, ge=1, description="gallery shards of the global search (None: num_actors)")
    part_images: int = Field(16, ge=1, description="gallery images per re-rank actor call")
    num_actors: int = Field(1, ge=1, description="search and re-rank actors")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs reserved per actor")
    actor_gpus: float = Field(0, ge=0, description="GPUs per actor (0: CPU actors)")
    torch_threads: int = Field(1, ge=1, description="torch threads per actor")
    lease_ttl_s: float = Field(60, gt=0, description="seconds a run's lease on the output lives unless renewed")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else a local Ray)")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (sets AWS_ENDPOINT_URL)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the store)")
    experiment: str = Field("rerank", description="MLflow experiment")


class EvaluateConfig(Section):
    """``cvnet evaluate``: extraction -> rankings -> revisitop metrics on a benchmark, on Ray."""

    benchmark: str = Field(..., description="revisitop dataset folder (gnd_<name>.pkl + jpg/)")
    model: str = Field(..., description="CVNet checkpoint URI")
    rerank: bool = Field(False, description="also re-rank the shortlists (both shortlist rules)")
    k: int = Field(100, ge=1, description="shortlist length re-ranked per query")
    weight: float = Field(0.5, description="fused score = global + weight * match probability")
    distractors: str | None = Field(None, description="distractor manifest added to the database (R1M-style)")
    rerank_from: Literal["cached", "recompute"] = Field("cached", description="rerank features stored or recomputed")
    depth: int | None = Field(None, ge=1, description="global list length per query (None: the whole database "
                                                      "up to 10000 images, else max(1000, k + most junk))")
    scales: tuple[float, ...] = Field(DEFAULT_SCALES, min_length=1, description="multi-scale inference scales")
    store: str | None = Field(None, description="store root (default CVNET_STORE or ./cvnet-store)")
    num_actors: int = Field(1, ge=1, description="model / search / re-rank actors")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs reserved per actor")
    actor_gpus: float = Field(0, ge=0, description="GPUs per actor (0: CPU actors)")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else a local Ray)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the store)")
    experiment: str = Field("evaluate", description="MLflow experiment")


# ---- train-rerank ----------------------------------------------------------------------------

class RerankModelConfig(Section):
    init: str | None = Field(None, description="CVNet checkpoint URI to start from: a released one "
                                               "or a stage-1 export (None: random init under init_seed)")
    init_seed: int = Field(0, description="seed of the random init when init is None")
    depth: Literal[50, 101] = Field(50, description="ResNet depth of the random init (init sets its own)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="re-ranker forward: exact fp32 "
                                                                   "or bf16 autocast (GPU)")
    maps_precision: Literal["fp32", "bf16"] = Field("fp32", description="frozen backbone's stage-3 maps")
    rerank_scale: float | None = Field(None, gt=0, description="image scale of the re-ranker's stage-3 "
                                       "maps at inference, kept in the exported checkpoint; set it to "
                                       "about data.image_size / the images' side (None: the init's, "
                                       "1.0 for released and stage-1 checkpoints)")


class PositivesConfig(Section):
    self_share: float = Field(0.0, ge=0, le=1, description="share of positives that are another augmented "
                                                         "view of the anchor image itself (ours; 0: another "
                                                         "image of its landmark, the paper's)")


class NegativesConfig(Section):
    table: str | None = Field(None, description="hard-negatives table URI (image_id, landmark_id, "
                                                "negative_ids, negative_scores); None: random negatives")
    version: int | None = Field(None, description="table version (None: the latest, pinned by the driver)")
    per_anchor: int = Field(1, ge=1, description="negatives per anchor")
    top_k: int = Field(10, ge=1, description="hard negatives drawn from the first top_k of the mined list")


class ScheduleSection(Section):
    kind: Literal["linear", "cosine", "step"] = Field("linear", description="ramp shape")
    start: float = Field(0.0, ge=0, le=1, description="value during the warm-up")
    end: float = Field(0.0, ge=0, le=1, description="value after the ramp")
    warmup_steps: int = Field(0, ge=0, description="steps at start")
    ramp_steps: int = Field(0, ge=0, description="steps from start to end (linear, cosine)")
    milestones: tuple[int, ...] = Field((), description="steps of the equal jumps (step)")


class CurriculumSection(Section):
    hard_share: ScheduleSection = ScheduleSection()
    has_prob: ScheduleSection = ScheduleSection()


class HideAndSeekSection(Section):
    cell_size: int | None = Field(None, ge=1, description="cell side in map positions (or grid)")
    grid: int | None = Field(4, ge=1, description="cells per side (used when cell_size is None)")
    fill: str | float = Field("zero", description="zero, mean or a number")


class RerankOptimConfig(Section):
    name: Literal["adamw", "sgd"] = Field("adamw", description="optimizer")
    lr: float = Field(1e-3, gt=0, description="learning rate (warm-up, then cosine to 0)")
    momentum: float = Field(0.9, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    max_steps: int = Field(1000, ge=1, description="training steps in all")
    batch_size: int = Field(8, ge=1, description="anchors per worker per step")
    clip_grad_norm: float | None = Field(None, gt=0, description="max global gradient norm")


class MapCacheSection(Section):
    views: int = Field(0, ge=0, description="fixed augmented views per training image whose stage-3 "
                                            "maps each worker computes once and keeps (float16, ~0.5 MB "
                                            "a 16x16 map); 0: fresh views, maps on the fly every step")


class RerankEvalConfig(Section):
    benchmark: str | None = Field(None, description="revisitop-format dataset dir to evaluate on")
    k: int = Field(100, ge=1, description="global shortlist re-ranked")
    scales: tuple[float, ...] = Field(DEFAULT_SCALES, description="multi-scale global inference scales")


class TrainRerankConfig(TrainingRun):
    name: str = Field("stage2", description="run name: rerunning the same name resumes it")
    experiment: str = Field("cvnet-stage2", description="MLflow experiment")
    register_as: str | None = Field("cvnet-rerank", description="registered model name (None: do not register)")
    data: DataConfig = DataConfig()
    model: RerankModelConfig = RerankModelConfig()
    positives: PositivesConfig = PositivesConfig()
    negatives: NegativesConfig = NegativesConfig()
    curriculum: CurriculumSection = CurriculumSection()
    hide_and_seek: HideAndSeekSection = HideAndSeekSection()
    map_cache: MapCacheSection = MapCacheSection()
    optim: RerankOptimConfig = RerankOptimConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    loader: LoaderSection = LoaderSection()
    eval: RerankEvalConfig = RerankEvalConfig()

    @model_validator(mode="after")
    def _self_positives_need_two_views(self) -> TrainRerankConfig:
        if self.positives.self_share > 0 and self.map_cache.views == 1:
            raise ValueError("map_cache.views: 1 fixed view would give a self positive the anchor's "
                             "own maps; use 0 (fresh views) or >= 2 with positives.self_share > 0")
        return self


# ---- mine ------------------------------------------------------------------------------------

class MineConfig(Section):
    """``cvnet mine``: hard negatives of a features table (what to mine, and how to run it)."""

    features: str = Field(..., description="extraction output URI (holds features.lance)")
    manifest: str | None = Field(None, description="take landmark ids from this manifest, not the features")
    k: int = Field(10, ge=1, description="negatives stage 2 draws per image by default (logged; recall@k)")
    keep: int = Field(32, ge=1, description="negatives stored per image (top keep, best first)")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="tile precision: fp32 exact; fp16/bf16 choose candidates in half precision")
    store: str | None = Field(None, description="store root (default CVNET_STORE or ./cvnet-store)")
    output: str | None = Field(None, description="mining output URI (None: <store>/mining/<features>-keep<keep>-<precision>)")
    num_actors: int = Field(1, ge=1, description="search actors (query shards)")
    actor_cpus: float = Field(1, gt=0, description="CPUs reserved per actor (and its torch threads)")
    actor_gpus: float = Field(0, ge=0, description="GPUs per actor (0: CPU actors)")
    query_rows: int = Field(512, ge=1, description="queries per actor call")
    gallery_block_rows: int = Field(262144, ge=1, description="gallery rows per object-store block "
                                                              "(an actor holds one block at a time)")
    memory_budget_mb: int = Field(512, ge=16, description="working memory of one search call, MiB (tiles)")
    shard_size: int = Field(4096, ge=1, description="rows per commit")
    lease_ttl_s: float = Field(60, gt=0, description="seconds a run's lease on the output lives unless renewed")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else a local Ray)")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (sets AWS_ENDPOINT_URL)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the store)")
    experiment: str = Field("mine", description="MLflow experiment")


# ---- audit-overlap ---------------------------------------------------------------------------

class AuditOverlapConfig(Section):
    """``cvnet audit-overlap``: benchmark images with near-copies among the training images."""

    train: str = Field(..., description="training extraction output URI (holds features.lance)")
    benchmark: str = Field(..., description="benchmark extraction output URI (queries and database)")
    threshold: float = Field(0.9, description="flag training images scoring at least this (cosine)")
    k: int = Field(5, ge=1, description="training matches listed per benchmark image at most")
    store: str | None = Field(None, description="store root (default CVNET_STORE or ./cvnet-store)")
    output: str | None = Field(None, description="audit output URI (None: <store>/audits/<train>-v<version>-vs-<benchmark>)")
    block_rows: int = Field(262144, ge=1, description="training rows searched at a time")
    lease_ttl_s: float = Field(60, gt=0, description="seconds a run's lease on the output lives unless renewed")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the store)")
    experiment: str = Field("audit-overlap", description="MLflow experiment")


# ---- refresh ---------------------------------------------------------------------------------

class PromoteSection(Section):
    metric: str = Field("rerank_gt_aware_medium_map", description="evaluation metric the gate compares "
                                                                  "(<label>_<protocol>_<metric>, x100)")
    min_gain: float = Field(0.0, description="champion moves when the candidate beats it by at least this")


class RefreshConfig(Section):
    """``cvnet refresh``: extract new images -> re-mine -> retrain stage 2 -> evaluate -> gate.

    ``extract`` / ``mine`` / ``train`` / ``evaluate`` are keys of the step's own config
    (ExtractConfig, MineConfig, TrainRerankConfig, EvaluateConfig), minus those the refresh sets."""

    manifests: list[str] = Field(..., min_length=1, description="image manifests of the collection (the current ones)")
    benchmark: str = Field(..., description="revisitop benchmark folder the candidate and champion are evaluated on")
    global_model: str = Field("models:/cvnet-global@champion", description="global model (pinned to one version)")
    rerank_model: str = Field("models:/cvnet-rerank@champion", description="re-ranker fine-tuned from and gated against")
    register_as: str = Field("cvnet-rerank", description="registered model name of the candidate")
    promote: PromoteSection = PromoteSection()
    extract: dict[str, Any] = Field({}, description="ExtractConfig keys of the extraction step")
    mine: dict[str, Any] = Field({}, description="MineConfig keys of the mining step")
    train: dict[str, Any] = Field({}, description="TrainRerankConfig keys of stage 2 (data.root at least)")
    evaluate: dict[str, Any] = Field({}, description="EvaluateConfig keys of the evaluation step")
    store: str | None = Field(None, description="store root (default CVNET_STORE or ./cvnet-store)")
    lease_ttl_s: float = Field(60, gt=0, description="seconds the refresh lease lives unless renewed")
    address: str | None = Field(None, description="Ray address (default RAY_ADDRESS, else a local Ray)")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (sets AWS_ENDPOINT_URL)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the store)")
    experiment: str = Field("refresh", description="MLflow experiment")
