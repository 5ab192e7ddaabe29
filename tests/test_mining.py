"""The hard-negatives table and the incremental plan (pure: no Ray)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from cvnet import mining
from cvnet.search import TopK


def current(rows: list[tuple[str, str, int | None]]) -> pa.Table:
    ids, uris, lms = zip(*rows)
    return pa.table({"image_id": list(ids), "uri": list(uris), "landmark_id": pa.array(lms, pa.int64())})


def stored(rows: list[tuple[str, int | None, list[str], int]]) -> pa.Table:
    ids, lms, negs, versions = zip(*rows)
    return pa.table({"image_id": list(ids), "landmark_id": pa.array(lms, pa.int64()),
                     "negative_ids": pa.array(list(negs), pa.list_(pa.string())),
                     "mined_from_version": pa.array(versions, pa.int64())})


def test_table_rows_drop_padding_and_read_back():
    result = TopK(np.array(["a", "b"]), np.array([["c", "d"], ["a", ""]]),
                  np.array([[0.5, 0.25], [0.75, -np.inf]], np.float32))
    table = mining.negatives_table(result, [3, -1], version=7)
    assert table.schema == mining.SCHEMA
    assert table.to_pylist() == [
        {"image_id": "a", "landmark_id": 3, "negative_ids": ["c", "d"], "negative_scores": [0.5, 0.25],
         "mined_from_version": 7},
        {"image_id": "b", "landmark_id": None, "negative_ids": ["a"], "negative_scores": [0.75],
         "mined_from_version": 7}]
    back = mining.stored_topk(["a", "b"], table.column("negative_ids").to_pylist(),
                              table.column("negative_scores").to_pylist(), keep=2)
    np.testing.assert_array_equal(back.ids, result.ids)
    np.testing.assert_array_equal(back.scores, result.scores)


def test_plan_searches_only_new_work_and_redoes_what_changed():
    now = current([("a", "u/a", 1), ("b", "u/b", 1), ("c", "u/c", 2), ("d", "u/d2", 2), ("e", "u/e", 3),
                   ("f", "u/f", 9), ("g", "u/g", 4), ("n", "u/n", 5)])
    mined = stored([("a", 1, ["c", "e"], 3),   # unchanged with unchanged negatives: incremental
                    ("b", 1, ["d"], 3),        # lists d, whose URI changed: full
                    ("c", 2, ["a"], 3),        # incremental
                    ("d", 2, ["a"], 3),        # own URI changed: full
                    ("e", 3, ["f"], 3),        # lists f, whose landmark changed: full
                    ("f", 8, ["a"], 3),        # own landmark changed: full
                    ("x", 1, ["a"], 3),        # left the features: removed
                    ("g", 4, ["a"], 5)])       # mined at the current version already: done
    previous = {3: {"a": "u/a", "b": "u/b", "c": "u/c", "d": "u/d", "e": "u/e", "f": "u/f", "g": "u/g", "x": "u/x"}}
    plan = mining.plan_update(now, 5, mined, previous)
    ids = now.column("image_id").to_pylist()
    assert [ids[r] for r in plan.full] == ["b", "d", "e", "f", "n"]  # n: new
    rows, delta = plan.incremental[3]
    assert [ids[r] for r in rows] == ["a", "c"]
    assert [ids[r] for r in delta] == ["d", "f", "g", "n"]  # g: its row is of another version
    assert plan.remove == ["x"] and plan.done == 1
    assert plan.pairs == 5 * 8 + 2 * 4 and plan.rows == 7


def test_unreadable_previous_version_means_a_full_re_mine():
    now = current([("a", "u/a", 1), ("b", "u/b", 2)])
    plan = mining.plan_update(now, 4, stored([("a", 1, ["b"], 2), ("b", 2, ["a"], 2)]), {2: None})
    assert list(plan.full) == [0, 1] and not plan.incremental and plan.pairs == 4
