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


def features_at(uris: dict[str, str]) -> pa.Table:
    """The ``image_id``, ``uri`` of the features at an earlier version."""
    return pa.table({"image_id": list(uris), "uri": list(uris.values())})


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
    previous = {3: features_at({"a": "u/a", "b": "u/b", "c": "u/c", "d": "u/d", "e": "u/e", "f": "u/f", "g": "u/g",
                                "x": "u/x"})}
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


def test_plan_of_two_stored_versions_null_landmarks_and_chunked_tables():
    """Each stored version is its own incremental group with its own delta; a missing landmark
    equals a missing one; a negative that left the features means a full search; tables in
    several chunks (as Lance reads them) give the same plan."""
    now = pa.concat_tables([current([("a", "u/a", None), ("b", "u/b", 1), ("c", "u/c", None), ("d", "u/d", 2)]),
                            current([("e", "u/e", 2), ("h", "u/h", 3), ("i", "u/i", 4), ("j", "u/j", 7),
                                     ("k", "u/k", 5)])])
    mined = pa.concat_tables([stored([("a", None, ["c"], 2),       # unchanged, no landmark then or now
                                      ("c", None, ["a", "d"], 2),  # incremental
                                      ("d", 2, ["z"], 2),          # lists z, which left: full
                                      ("j", None, [], 2)]),        # landmark None -> 7: full
                              stored([("b", 1, ["e"], 3),          # lists e, whose URI changed: full
                                      ("e", 2, ["b"], 3),          # own URI changed: full
                                      ("i", 4, ["b"], 3),          # incremental, against version 3's delta
                                      ("x", 1, [], 3),             # left: removed
                                      ("k", 5, [], 5)])])          # done
    previous = {2: features_at({"a": "u/a", "c": "u/c", "d": "u/d", "j": "u/j", "z": "u/z"}),
                3: features_at({"a": "u/a", "b": "u/b", "e": "u/e-old", "i": "u/i", "x": "u/x"})}
    plan = mining.plan_update(now, 5, mined, previous)
    ids = now.column("image_id").to_pylist()
    name = lambda rows: [ids[r] for r in rows]  # noqa: E731
    assert name(plan.full) == ["b", "d", "e", "h", "j"]
    assert sorted(plan.incremental) == [2, 3]
    assert [name(part) for part in plan.incremental[2]] == [["a", "c"], ["b", "e", "h", "i", "j", "k"]]
    assert [name(part) for part in plan.incremental[3]] == [["i"], ["a", "c", "d", "e", "h", "j", "k"]]
    assert plan.remove == ["x"] and plan.done == 1
    assert plan.pairs == 5 * 9 + 2 * 6 + 1 * 7 and plan.rows == 8
    assert all(a.dtype == np.int64 for a in (plan.full, *plan.incremental[2], *plan.incremental[3]))
