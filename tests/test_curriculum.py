"""Stage-2 curriculum schedules: values at the start, middle and end of each kind."""
from __future__ import annotations

import math

import pytest

from cvnet.training.curriculum import Curriculum, CurriculumPoint, Schedule


def test_linear_holds_during_warmup_then_ramps_to_end():
    s = Schedule("linear", start=0.1, end=0.9, warmup_steps=10, ramp_steps=20)
    assert [s(0), s(9), s(10)] == [0.1, 0.1, 0.1]
    assert s(15) == pytest.approx(0.3)
    assert s(20) == pytest.approx(0.5)  # middle of the ramp
    assert s(30) == pytest.approx(0.9) and s(10_000) == pytest.approx(0.9)


def test_cosine_is_half_a_cosine_flat_at_both_ends():
    s = Schedule("cosine", start=0.0, end=0.8, warmup_steps=10, ramp_steps=20)
    assert s(10) == 0.0
    assert s(15) == pytest.approx(0.8 * 0.5 * (1 - math.cos(math.pi / 4)))  # 0.117, below linear 0.2
    assert s(20) == pytest.approx(0.4)
    assert s(25) == pytest.approx(0.8 * 0.5 * (1 - math.cos(3 * math.pi / 4)))
    assert s(30) == pytest.approx(0.8) and s(99) == pytest.approx(0.8)


def test_step_jumps_in_equal_parts_at_each_milestone():
    s = Schedule("step", start=0.2, end=1.0, milestones=(10, 20, 40))
    assert [s(0), s(9)] == [0.2, 0.2]
    assert [s(10), s(19)] == pytest.approx([0.2 + 0.8 / 3] * 2)
    assert s(20) == pytest.approx(0.2 + 1.6 / 3)
    assert [s(40), s(1000)] == pytest.approx([1.0, 1.0])


def test_decreasing_constant_and_instant_schedules():
    assert Schedule("linear", start=0.6, end=0.2, ramp_steps=4)(2) == pytest.approx(0.4)
    assert {Schedule("cosine", 0.3, 0.3, ramp_steps=5)(t) for t in range(8)} == {0.3}
    jump = Schedule("linear", 0.0, 1.0, warmup_steps=3, ramp_steps=0)
    assert [jump(2), jump(3)] == [0.0, 1.0]


def test_curriculum_gives_both_values_at_a_step():
    c = Curriculum(Schedule("linear", 0.0, 1.0, ramp_steps=10, name="hard_share"),
                   Schedule("step", 0.0, 0.5, milestones=(5,), name="has_prob"))
    assert c(0) == CurriculumPoint(0.0, 0.0)
    assert c(5) == CurriculumPoint(pytest.approx(0.5), 0.5)
    assert c(20) == CurriculumPoint(1.0, 0.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "exp"}, r"has_prob\.kind"),
    ({"end": 1.5}, r"has_prob\.end: 1.5 is outside"),
    ({"start": -0.1}, r"has_prob\.start"),
    ({"ramp_steps": -1}, r"has_prob\.ramp_steps"),
    ({"kind": "step"}, r"has_prob\.milestones: a step schedule needs"),
    ({"kind": "step", "milestones": (5, 5)}, r"has_prob\.milestones: \[5, 5\]"),
])
def test_bad_schedules_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(name="has_prob", **kwargs)
