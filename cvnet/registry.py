"""The MLflow model registry for cvnet: versions, the aliases that mark them, and ``models:/`` URIs.

Aliases, not stages: ``champion`` is the version in use, ``challenger`` the latest candidate,
``previous`` the champion before the current one (what :func:`rollback` restores). Every move
records its reason and time as tags of the versions concerned (``cvnet.<event>.reason`` /
``cvnet.<event>.at``, events ``promoted``, ``demoted``, ``challenger``, ``restored``,
``rolled_back``). :func:`decide_promotion` is the pure gate a refresh applies through
:func:`gate`.

``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` resolve to the version's CVNet checkpoint,
downloaded once per machine (:func:`resolve_checkpoint`, used by ``load_model``). The registry
is the tracking server's: ``MLFLOW_TRACKING_URI`` / ``mlflow.set_tracking_uri``, else the
default store's SQLite file (:func:`cvnet.tracking.resolve_tracking_uri`).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)
MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))/?")
CACHE_ENV = "CVNET_MODEL_CACHE"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says what to do instead."""


@dataclass(frozen=True)
class PromotionDecision:
    """Whether the candidate should become champion, and why (one line)."""

    promote: bool
    reason: str


@dataclass(frozen=True)
class Aliases:
    """The versions the aliases of one registered model point at (None: alias not set)."""

    name: str
    champion: str | None
    challenger: str | None
    previous: str | None

    def __str__(self) -> str:
        return f"{self.name}: " + ", ".join(f"{a} {getattr(self, a) or '-'}" for a in ALIASES)


def decide_promotion(candidate_metrics: Mapping[str, float], champion_metrics: Mapping[str, float] | None,
                     metric: str, min_gain: float) -> PromotionDecision:
    """Promote when the candidate's ``metric`` beats the champion's by at least ``min_gain``
    (higher is better; no champion: promote). A metric the candidate lacks is an error; one the
    champion lacks means no automatic promotion."""
    if metric not in candidate_metrics or not math.isfinite(candidate_metrics[metric]):
        raise ValueError(f"candidate has no finite metric {metric!r} (has {sorted(candidate_metrics)})")
    new = float(candidate_metrics[metric])
    if champion_metrics is None:
        return PromotionDecision(True, f"no champion yet; candidate {metric}={new:.4g}")
    if metric not in champion_metrics or not math.isfinite(champion_metrics[metric]):
        return PromotionDecision(False, f"champion has no {metric!r} to compare with; not promoting "
                                        "automatically (cvnet promote NAME VERSION does it by hand)")
    old = float(champion_metrics[metric])
    gain = new - old
    verdict = "promote" if gain >= min_gain else "keep the champion"
    return PromotionDecision(gain >= min_gain, f"{metric} {new:.4g} vs champion {old:.4g}: gain {gain:+.4g} "
                                               f"{'>=' if gain >= min_gain else '<'} min_gain {min_gain:g}; {verdict}")


def _client(client: Any = None) -> Any:
    if client is not None:
        return client
    from mlflow.tracking import MlflowClient

    return MlflowClient(registry_tracking_uri())


def registry_tracking_uri() -> str:
    """The tracking URI that registry look-ups use (see the module docstring)."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    from cvnet.storage import default_store
    from cvnet.tracking import resolve_tracking_uri

    return mlflow.get_tracking_uri() if is_tracking_uri_set() else resolve_tracking_uri(default_store())


def connect(store: str | None = None, tracking_uri: str | None = None) -> str:
    """Point MLflow at the registry of a job's ``--store`` / ``--tracking-uri``; returns its URI."""
    import mlflow

    from cvnet.storage import default_store
    from cvnet.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(store or default_store(), tracking_uri)
    mlflow.set_tracking_uri(uri)
    return uri


def aliases(name: str, client: Any = None) -> Aliases:
    """Where ``champion`` / ``challenger`` / ``previous`` of ``name`` point now."""
    found = _client(client).get_registered_model(name).aliases  # MLflow gives versions as int
    return Aliases(name, *(None if found.get(alias) is None else str(found[alias]) for alias in ALIASES))


def _record(client: Any, name: str, version: str, event: str, reason: str) -> None:
    client.set_model_version_tag(name, version, f"cvnet.{event}.reason", reason[:4000])
    client.set_model_version_tag(name, version, f"cvnet.{event}.at",
                                 datetime.now(timezone.utc).isoformat(timespec="seconds"))


def set_challenger(name: str, version: str, reason: str, client: Any = None) -> Aliases:
    """Point ``challenger`` at ``version``."""
    client = _client(client)
    client.get_model_version(name, str(version))  # fails clearly on an unknown version
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    _record(client, name, str(version), "challenger", reason)
    return aliases(name, client)


def promote(name: str, version: str, reason: str, client: Any = None) -> Aliases:
    """Make ``version`` the champion; the champion it replaces becomes ``previous``."""
    client = _client(client)
    version = str(version)
    client.get_model_version(name, version)
    current = aliases(name, client).champion
    if current == version:
        return aliases(name, client)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
        _record(client, name, current, "demoted", f"replaced by version {version}: {reason}")
    client.set_registered_model_alias(name, CHAMPION, version)
    _record(client, name, version, "promoted", reason)
    return aliases(name, client)


def rollback(name: str, reason: str, client: Any = None) -> Aliases:
    """Make ``previous`` the champion again; ``previous`` is then unset (a second rollback
    needs an explicit ``promote``)."""
    client = _client(client)
    now = aliases(name, client)
    if now.previous is None:
        raise RegistryError(f"{name} has no '{PREVIOUS}' version to roll back to; "
                            f"promote one instead: cvnet promote {name} VERSION")
    client.set_registered_model_alias(name, CHAMPION, now.previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    _record(client, name, now.previous, "restored", reason)
    if now.champion is not None:
        _record(client, name, now.champion, "rolled_back", f"version {now.previous} restored: {reason}")
    return aliases(name, client)


def version_metrics(name: str, version: str, client: Any = None) -> dict[str, float]:
    """The numeric tags of a version (the metrics recorded at registration)."""
    out = {}
    for key, value in _client(client).get_model_version(name, str(version)).tags.items():
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def gate(name: str, version: str, candidate_metrics: Mapping[str, float], metric: str, min_gain: float,
         champion_metrics: Mapping[str, float] | None = None, client: Any = None) -> PromotionDecision:
    """The refresh's gate: ``version`` becomes challenger, and champion when
    :func:`decide_promotion` says so. ``champion_metrics`` default: the champion version's
    numeric tags. Rerunning it for the same version changes nothing."""
    client = _client(client)
    version = str(version)
    champion = aliases(name, client).champion
    if champion == version:
        return PromotionDecision(True, f"version {version} is already the champion")
    if champion is not None and champion_metrics is None:
        champion_metrics = version_metrics(name, champion, client)
    decision = decide_promotion(candidate_metrics, champion_metrics if champion else None, metric, min_gain)
    set_challenger(name, version, decision.reason, client)
    if decision.promote:
        promote(name, version, decision.reason, client)
    return decision


def find_version(name: str, tag: str, value: str, client: Any = None) -> str | None:
    """The version of ``name`` tagged ``tag = value`` (registered by an earlier try of the same
    job, so that a rerun does not register it twice), or None."""
    for version in _client(client).search_model_versions(f"name = '{name}'"):
        if version.tags.get(tag) == value:
            return str(version.version)
    return None


def register_model(name: str, model_uri: str, tags: Mapping[str, Any] | None = None) -> str:
    """Register the logged MLflow model ``model_uri`` as a new version of ``name`` (created if
    needed); the version becomes ``challenger``, and ``champion`` when ``name`` has none.
    Returns the version number."""
    import mlflow

    version = str(mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()}).version)
    client = _client()
    if aliases(name, client).champion is None:
        promote(name, version, "first version of the model", client)
    set_challenger(name, version, "newly registered", client)
    return version


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    match = MODELS_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def pin_version(uri: str, client: Any = None) -> str:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (the version the alias points at now),
    so that every worker of one job loads the same version; other URIs unchanged."""
    if not uri.startswith("models:/"):
        return uri
    name, alias, version = parse_models_uri(uri)
    if alias is not None:
        version = _client(client).get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


def resolve_checkpoint(source: Any) -> Any:
    """The local path of the CVNet checkpoint of a ``models:/`` URI (downloaded once into
    ``$CVNET_MODEL_CACHE``, default ``<tmp>/cvnet-models``); any other source unchanged."""
    if not (isinstance(source, str) and source.startswith("models:/")):
        return source
    from mlflow.models import Model

    from cvnet.pyfunc import CHECKPOINT

    from mlflow.tracking import MlflowClient

    tracking_uri = registry_tracking_uri()
    client = MlflowClient(tracking_uri)
    name, _, version = parse_models_uri(pin_version(source, client))
    info = client.get_model_version(name, version)
    key = hashlib.sha256(f"{tracking_uri}|{info.source}|{info.creation_timestamp}".encode()).hexdigest()[:16]
    root = os.path.join(os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "cvnet-models"),
                        re.sub(r"[^A-Za-z0-9_.-]", "_", name), f"{version}-{key}")
    if not os.path.exists(root):
        _download(f"models:/{name}/{version}", root, tracking_uri)
    artifact = Model.load(root).flavors["python_function"]["artifacts"][CHECKPOINT]["path"]
    return os.path.join(root, artifact)


def _download(uri: str, root: str, tracking_uri: str) -> None:
    """Download a model version into ``root`` atomically (concurrent callers on one machine)."""
    import mlflow

    os.makedirs(os.path.dirname(root), exist_ok=True)
    partial = f"{root}.partial-{uuid.uuid4().hex[:8]}"
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=partial, tracking_uri=tracking_uri)
        os.rename(partial, root)
    except OSError:
        if not os.path.exists(root):  # not another caller winning the race
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
