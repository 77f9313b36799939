"""Two token-probe runs over the same users, compared user by user (``benchmarks/token_probe_pair.py``).

The token probe keeps every probed user's score in every mode (its JSON's ``per_user``, in the order of its
``users``). Two runs with the same dataset, split, ``--probe_seed`` and ``--users`` score the same users on the same
held-out text, so a mode of one run minus a mode of the other, user by user, is a paired difference like those
within a run: e.g. a group's token trained on its own users minus the same group's token trained on as many users
drawn at random (``--group_shuffle``), the shuffled-ID control.
"""

from __future__ import annotations

import numpy as np

from recbole_uip.benchmarking import difference_summary, settings_fingerprint
from recbole_uip.token_probe.report import difference_row


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """``"a:b,c:d"`` as ``[("a", "b"), ("c", "d")]``: the first run's mode before the colon, the second run's after.

    Raises:
        ValueError: an item is not two mode names joined by one colon.
    """
    pairs = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        first, colon, second = item.partition(":")
        if not colon or not first.strip() or not second.strip() or ":" in second:
            raise ValueError(f"a pair is <first run's mode>:<second run's mode>, got {item!r}")
        pairs.append((first.strip(), second.strip()))
    if not pairs:
        raise ValueError("no pair given: name them as <first run's mode>:<second run's mode>, comma-separated")
    return pairs


def per_user_scores(run: dict, mode: str) -> np.ndarray:
    """``(n,)``: a run's scores in ``mode``, in the order of its ``per_user["users"]`` (nan where it kept none)."""
    return np.array(run["per_user"][mode], dtype=float)                    # None (no score) becomes nan


def check_same_users(first: dict, second: dict) -> None:
    """Raises ``ValueError`` unless the two runs scored the same users in the same order, on one dataset and one
    setting (the same held-out text): only then is a difference user by user a paired one."""
    records = first["record"], second["record"]
    if records[0]["dataset"] != records[1]["dataset"]:
        raise ValueError(f"the runs are on different datasets ({records[0]['dataset']}, {records[1]['dataset']})")
    fingerprints = [settings_fingerprint(record["settings"]) for record in records]
    if fingerprints[0] != fingerprints[1]:
        raise ValueError(f"the runs have different settings ({fingerprints[0]}, {fingerprints[1]}): their behaviour "
                         "texts, and so their held-out texts, may differ")
    if first["per_user"]["users"] != second["per_user"]["users"]:
        raise ValueError("the runs scored different users (or in another order): give both the same --probe_seed "
                         "and --users")


def paired_differences(first: dict, second: dict, pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """``{"<a>_minus_<b>": {"mean", "ci", "share_below_zero"}}``: for each pair, the first run's mode ``a`` minus the
    second run's mode ``b``, user by user (``benchmarking.difference_summary``; a user without both is left out);
    each pair also on the rating tokens alone (``rating_<a>_minus_rating_<b>``) where both runs have them.

    Raises:
        ValueError: the runs did not score the same users (:func:`check_same_users`), or a mode is missing.
    """
    check_same_users(first, second)
    differences = {}
    for a, b in pairs:
        missing = [f"{name} ({which})" for name, run, which in ((a, first, "first run"), (b, second, "second run"))
                   if name not in run["per_user"]]
        if missing:
            raise ValueError(f"no per-user scores for {', '.join(missing)}")
        differences[f"{a}_minus_{b}"] = difference_summary(per_user_scores(first, a) - per_user_scores(second, b))
        if "rating_" + a in first["per_user"] and "rating_" + b in second["per_user"]:
            differences[f"rating_{a}_minus_rating_{b}"] = difference_summary(
                per_user_scores(first, "rating_" + a) - per_user_scores(second, "rating_" + b))
    return differences


def same_scores(first: dict, second: dict, mode: str) -> bool | None:
    """Whether both runs scored every user the same in ``mode`` (e.g. ``shared``: the same shift, to the last
    digit); None where a run lacks the mode."""
    if mode not in first["per_user"] or mode not in second["per_user"]:
        return None
    return first["per_user"][mode] == second["per_user"][mode]


def run_facts(name: str, run: dict) -> dict:
    """What a report says of one compared run: its file name, seconds, CPU, threads, LLM and dtype."""
    record = run["record"]
    return {"name": name, "seconds": run["seconds"], **{k: record[k] for k in ("cpu", "threads", "llm", "llm_dtype")}}


def render_pair(data: dict) -> str:
    """The Markdown report of a comparison (``benchmarks/token_probe_pair.py``'s JSON ``data``: its ``record``, the
    runs' :func:`run_facts` as ``first`` and ``second``, ``users``, ``same_shared`` and ``differences``)."""
    record = data["record"]

    def described(run: dict) -> str:
        return (f"`{run['name']}` ({run['seconds']:.0f} s; {run['cpu']}, {run['threads']} threads, {run['llm']} in "
                f"{run['llm_dtype']})")

    lines = [f"# Two token-probe runs compared user by user ({record['dataset']})", "",
             f"Produced by `python {' '.join(record['command'])}`. Settings `{settings_fingerprint(record['settings'])}`."
             f" First run: {described(data['first'])}; second run: {described(data['second'])}. The same "
             f"{data['users']} users' held-out text in both; the shared token scores them "
             + {True: "the same in both, to the last digit (the same shift).",
                False: "differently (the shifts differ: only the differences within each run compare as they are).",
                None: "in one run only."}[data["same_shared"]]
             + " Plain NLL, nats per token (`rating_*`: over the held-out rating tokens alone); the first run's mode "
               "minus the second's, mean over users with its 95% interval.", "",
             "| first run's mode - second run's mode | mean | 95% interval | users below 0 |", "|---|---|---|---|"]
    differences = data["differences"]          # in the order of the pairs (a JSON file keeps its keys sorted)
    lines += [difference_row(key.replace("_minus_", " - "), differences[key]) for a, b in data["pairs"]
              for key in (f"{a}_minus_{b}", f"rating_{a}_minus_rating_{b}") if key in differences]
    return "\n".join(lines)
