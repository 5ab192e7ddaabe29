"""The stage-2 curriculum: the hard-negative share and the Hide-and-Seek probability by step.

A :class:`Schedule` holds ``start`` for the first ``warmup_steps`` steps, then moves to ``end``:

- ``linear``: straight over ``ramp_steps`` steps;
- ``cosine``: half a cosine over ``ramp_steps`` steps (flat at both ends);
- ``step``: in equal jumps at each of the ``milestones`` (absolute steps, ascending), so the
  value is ``end`` from the last milestone on.

It stays at ``end`` afterwards. ``ramp_steps = 0`` (linear, cosine) jumps to ``end`` right after
the warm-up; ``start == end`` is a constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("linear", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    """A value in ``[0, 1]`` as a function of the step; ``name`` is used in error messages."""

    kind: str = "linear"
    start: float = 0.0
    end: float = 0.0
    warmup_steps: int = 0
    ramp_steps: int = 0
    milestones: tuple[int, ...] = ()
    name: str = "schedule"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}.kind: {self.kind!r} is not one of {KINDS}")
        for key in ("start", "end"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{self.name}.{key}: {value} is outside [0, 1]")
        for key in ("warmup_steps", "ramp_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{self.name}.{key}: {getattr(self, key)} is negative")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.kind == "step":
            if not self.milestones:
                raise ValueError(f"{self.name}.milestones: a step schedule needs at least one")
            if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or self.milestones[0] < 0:
                raise ValueError(f"{self.name}.milestones: {list(self.milestones)} are not "
                                 "non-negative and strictly ascending")

    def __call__(self, step: int) -> float:
        """The value at ``step`` (0-based)."""
        if self.kind == "step":
            passed = sum(step >= m for m in self.milestones)
            return self.start + (self.end - self.start) * passed / len(self.milestones)
        if step < self.warmup_steps:
            return self.start
        if self.ramp_steps == 0:
            return self.end
        progress = min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        if self.kind == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress


@dataclass(frozen=True)
class CurriculumPoint:
    """The curriculum's values at one step."""

    hard_share: float
    has_prob: float


@dataclass(frozen=True)
class Curriculum:
    """The share of hard negatives and the Hide-and-Seek probability over training."""

    hard_share: Schedule = Schedule(name="hard_share")
    has_prob: Schedule = Schedule(name="has_prob")

    def __call__(self, step: int) -> CurriculumPoint:
        return CurriculumPoint(self.hard_share(step), self.has_prob(step))
