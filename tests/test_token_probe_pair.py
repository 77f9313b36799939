"""Two token-probe runs compared user by user (``benchmarks/token_probe_pair.py``, ``recbole_uip.token_probe.paired``):
synthetic runs with a planted difference, no model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from conftest import import_benchmark
from recbole_uip.token_probe.paired import paired_differences, parse_pairs, render_pair


def synthetic_run(users: list[int], scores: dict[str, np.ndarray], seconds: float = 10.0) -> dict:
    """A token probe's JSON as far as the comparison reads it: the per-user scores, the run record and seconds."""
    record = {"command": ["benchmarks/token_probe.py"], "dataset": "ml-100k", "cpu": "Test CPU", "threads": 2,
              "llm": "bundled-smollm2", "llm_dtype": "bfloat16", "settings": {"profiles": ["hobby", "background"]}}
    per_user = {"users": users, **{mode: [None if not np.isfinite(v) else float(v) for v in values]
                                   for mode, values in scores.items()}}
    return {"per_user": per_user, "record": record, "seconds": seconds}


def planted_runs(n: int = 40, gap: float = 0.05) -> tuple[dict, dict]:
    """Two runs over the same ``n`` users: the first's ``group_own`` below the second's by ``gap`` for every user
    (plus noise), ``shared`` the same in both; the rating tokens with a user who has none (nan)."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(2.5, 0.3, n)
    shared = difficulty + 0.1
    second_own = difficulty + rng.normal(0, 0.01, n)
    first_own = second_own - gap + rng.normal(0, 0.01, n)
    rating_second = rng.normal(0.6, 0.1, n)
    rating_second[3] = np.nan
    users = list(range(100, 100 + n))
    first = synthetic_run(users, {"shared": shared, "group_own": first_own, "group_any": first_own + 0.02,
                                  "rating_group_own": rating_second - 0.01, "rating_group_any": rating_second})
    second = synthetic_run(users, {"shared": shared, "group_own": second_own, "group_any": second_own + 0.02,
                                   "rating_group_own": rating_second, "rating_group_any": rating_second}, 20.0)
    return first, second


def test_a_planted_gap_between_two_runs_is_found_user_by_user_and_on_the_rating_tokens():
    first, second = planted_runs()
    differences = paired_differences(first, second, [("group_own", "group_own"), ("group_own", "group_any")])
    own = differences["group_own_minus_group_own"]
    assert own["mean"] == pytest.approx(-0.05, abs=0.005) and own["ci"][1] < 0 and own["share_below_zero"] == 1.0
    assert differences["group_own_minus_group_any"]["mean"] == pytest.approx(-0.07, abs=0.005)
    rating = differences["rating_group_own_minus_rating_group_own"]
    assert rating["mean"] == pytest.approx(-0.01) and rating["share_below_zero"] == 1.0    # 39 users, nan left out
    swapped = paired_differences(second, first, [("group_own", "group_own")])["group_own_minus_group_own"]
    assert swapped["mean"] == pytest.approx(-own["mean"])


def test_runs_over_other_users_or_settings_or_without_a_mode_are_refused():
    first, second = planted_runs()
    reordered = copy.deepcopy(second)
    reordered["per_user"]["users"] = reordered["per_user"]["users"][::-1]
    other_setting = copy.deepcopy(second)
    other_setting["record"]["settings"] = {"profiles": ["hobby"]}
    other_data = copy.deepcopy(second)
    other_data["record"]["dataset"] = "ml-1m"
    for run, message in ((reordered, "different users"), (other_setting, "different settings"),
                         (other_data, "different datasets")):
        with pytest.raises(ValueError, match=message):
            paired_differences(first, run, [("group_own", "group_own")])
    with pytest.raises(ValueError, match="group_relative"):
        paired_differences(first, second, [("group_relative", "group_own")])


@pytest.mark.parametrize("spec", ["", "group_own", "group_own:", ":group_own", "a:b:c", "group_own:group_own,x"])
def test_a_pair_is_two_modes_joined_by_one_colon(spec):
    with pytest.raises(ValueError):
        parse_pairs(spec)


def test_the_pair_benchmark_writes_its_report_beside_the_first_run_and_refuses_bad_input(tmp_path):
    token_probe_pair = import_benchmark("token_probe_pair")
    folder = tmp_path / "results" / "ml-100k" / "abc"
    folder.mkdir(parents=True)
    first, second = planted_runs()
    (folder / "first.json").write_text(json.dumps(first))
    (folder / "second.json").write_text(json.dumps(second))
    argv = [f"--first={folder / 'first.json'}", f"--second={folder / 'second.json'}",
            "--pairs=group_own:group_own,group_any:group_any", "--name=planted"]
    assert token_probe_pair.main(argv) == 0
    data = json.loads((folder / "token_probe_pair_planted.json").read_text())
    assert data["same_shared"] is True and data["users"] == 40
    assert data["first"]["name"] == "first" and data["second"]["seconds"] == 20.0
    assert data["differences"]["group_own_minus_group_own"]["ci"][1] < 0
    assert str(tmp_path) not in json.dumps(data["record"]["command"])                  # no machine paths
    report = (folder / "token_probe_pair_planted.md").read_text()
    assert "| group_own - group_own | -0.05" in report and "the same in both, to the last digit" in report
    assert render_pair(data) == report.rstrip("\n")      # the JSON (keys sorted) renders the report, rows in order
    assert (folder / "settings.json").exists()
    shifted = copy.deepcopy(second)
    shifted["per_user"]["shared"] = [v + 0.1 for v in shifted["per_user"]["shared"]]
    (folder / "shifted.json").write_text(json.dumps(shifted))
    assert token_probe_pair.main([*argv[:1], f"--second={folder / 'shifted.json'}", *argv[2:3], "--name=shifted"]) == 0
    assert "the shifts differ" in (folder / "token_probe_pair_shifted.md").read_text()
    bad = copy.deepcopy(second)
    bad["per_user"]["users"] = bad["per_user"]["users"][1:] + [999]
    (folder / "bad.json").write_text(json.dumps(bad))
    (folder / "broken.json").write_text("{not json")
    for changed in ([*argv[:1], f"--second={folder / 'bad.json'}", *argv[2:]],
                    [*argv[:1], f"--second={folder / 'broken.json'}", *argv[2:]],
                    [*argv[:1], f"--second={folder / 'missing.json'}", *argv[2:]],
                    [*argv[:2], "--pairs=group_own", "--name=planted"],
                    [*argv[:3], "--name=../planted"]):
        with pytest.raises(SystemExit):
            token_probe_pair.main(changed)
    assert not list(folder.glob("token_probe_pair_*bad*")) and (folder / "token_probe_pair_planted.json").exists()
