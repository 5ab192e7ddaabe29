"""TEMPORARY (lead's branch): replaced by the config branch's typed configs at merge."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SCALES = (0.7071, 1.0, 1.4142)


class ExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str
    model: str
    store: str | None = None
    output: str | None = None
    rerank_features: bool = False
    float16: bool = False
    scales: tuple[float, ...] = DEFAULT_SCALES
    shard_size: int = Field(1000, ge=1)
    refresh_changed: bool = False
    retry_bad_inputs: bool = False
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    transient_retries: int = Field(3, ge=0)
    lease_ttl_s: float = Field(60.0, gt=0)
    num_actors: int = Field(1, ge=1)
    actor_cpus: float = 0.5
    actor_gpus: float = 0.0
    torch_threads: int = 1
    batch_size: int = 8
    part_rows: int = 64
    read_rows: int = 16
    address: str | None = None
    endpoint_url: str | None = None
    tracking_uri: str | None = None
    experiment: str = "extract"
