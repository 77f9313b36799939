"""Compare two token-probe runs over the same users, user by user.

``benchmarks/token_probe.py`` keeps each probed user's score in every mode. Two runs on the same dataset and
setting with the same ``--probe_seed`` and ``--users`` score the same users on the same held-out text, so a mode of
the first run minus a mode of the second is a paired difference, as within one run. The use it was built for: a
group's token trained on its own users (``--group_by=mult_vae``) against the same group's token trained on as many
users drawn at random (``--group_shuffle=true``, the shuffled-ID control)::

    python benchmarks/token_probe_pair.py --first=results/ml-100k/<fp>/token_probe_groups8_..._joint_<variant>.json \\
        --second=results/ml-100k/<fp>/token_probe_groups8_..._joint_shuffled_<variant>.json \\
        --pairs=group_own:group_own,group_own:group_any,group_any:group_any --name=groups8_vs_shuffled

Writes ``token_probe_pair_<name>.{json,md}`` beside the first run (both runs' results folder: they must share one
setting). No model is run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recbole_uip.benchmarking import publish_result
from recbole_uip.token_probe.paired import (
    paired_differences, parse_pairs, render_pair, run_facts, same_scores)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--first", required=True, help="a token probe's JSON")
    parser.add_argument("--second", required=True, help="another token probe's JSON over the same users")
    parser.add_argument("--pairs", required=True,
                        help="comma-separated <first run's mode>:<second run's mode>, e.g. group_own:group_own")
    parser.add_argument("--name", required=True, help="the result is written as token_probe_pair_<name>.{json,md}")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args.pairs = parse_pairs(args.pairs)
    except ValueError as error:
        parser.error(f"--pairs: {error}")
    if not args.name or "/" in args.name or args.name.startswith("."):
        parser.error("--name is a plain file-name part (no '/')")
    return args


def load_run(path: str) -> dict:
    """A token probe's JSON, or a clear exit."""
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot read the token probe's JSON {path}: {error}")
    if not isinstance(run, dict) or not {"per_user", "record", "seconds"} <= run.keys():
        raise SystemExit(f"{path} is not a token probe's JSON (no per_user, record or seconds)")
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    first, second = load_run(args.first), load_run(args.second)
    try:
        differences = paired_differences(first, second, args.pairs)
    except ValueError as error:
        raise SystemExit(f"cannot pair {Path(args.first).name} with {Path(args.second).name}: {error}")
    command = ["benchmarks/token_probe_pair.py", *(f"--{key}=.../{Path(getattr(args, key)).name}"
                                                   for key in ("first", "second")),
               *(arg for arg in args.argv if not arg.startswith(("--first", "--second")))]
    data = {"first": run_facts(Path(args.first).stem, first), "second": run_facts(Path(args.second).stem, second),
            "users": len(first["per_user"]["users"]), "pairs": [list(pair) for pair in args.pairs],
            "same_shared": same_scores(first, second, "shared"), "differences": differences,
            # the first run's record (both runs share its dataset and setting), with this command
            "record": {**first["record"], "command": command}}
    publish_result(Path(args.first).resolve().parent, f"token_probe_pair_{args.name}", data, render_pair(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
