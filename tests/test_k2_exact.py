"""scripts/k2_exact_table.py --quick: the structure of the K2 vs preset table on the exact posteriors (issue 11).

The numbers at this size are noise; what is tested is what the table claims about its rows: K2 never uses more
levels than the preset, the same-count preset row has exactly K2's level count (and so the same network
evaluations: each level costs the same), every K2 level has one decision, and all numbers are finite.
"""
import math

import pytest

import scripts.k2_exact_table as K


@pytest.fixture(scope="module")
def quick(one_thread):
    return K.main(["--quick"])


def by_schedule(rows, schedule, measurements):
    (row,) = [r for r in rows if r["schedule"] == schedule and r["measurements"] == measurements]
    return row


def test_k2_rows_use_no_more_levels_and_the_same_count_preset_matches(quick):
    cfg = K.QUICK
    preset = by_schedule(quick, "preset T", "-")
    assert preset["levels"] == [cfg["levels"]] * cfg["runs"]
    for profile in K.PROFILES:
        for m in cfg["measurements"]:
            k2 = by_schedule(quick, f"K2 {profile}", str(m))
            same = by_schedule(quick, f"preset at K2 {profile}'s count", str(m))
            assert len(k2["levels"]) == cfg["runs"] and all(n <= cfg["levels"] for n in k2["levels"])
            assert same["levels"] == k2["levels"] and same["network_evals"] == k2["network_evals"]
            assert all(sum(k2[d][r] for d in K.DECISIONS) == k2["levels"][r] for r in range(cfg["runs"]))
            assert all(k2["warm"][r] == K.warm_steps(cfg["levels"]) and k2["stop"][r] == 1 for r in range(cfg["runs"]))
    assert any(n < cfg["levels"] for r in quick if r["schedule"].startswith("K2") for n in r["levels"]), \
        "at this size K2 should save levels somewhere, or the comparison is empty"


def test_numbers_are_finite_and_the_table_prints(quick):
    for r in quick:
        for key in K.METRICS:
            assert r[key] and all(math.isfinite(v) for v in r[key]), (r["schedule"], key)
        assert all(n == 0 for n in r.get("nonfinite", []))
    assert all(math.isfinite(v) for r in quick if "cess" in r for v in r["cess_median"] + r["capped_share"])
    rows = K.markdown(quick, K.QUICK).splitlines()
    assert "| problem | schedule | measurements | levels | network evals | mean err | cov err | modes TV |" in rows
    assert sum(line.startswith("| inpainting |") for line in rows) == len(quick) + 2 * len(K.QUICK["measurements"])
