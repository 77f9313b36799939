"""Generalisation, not memorisation: do a user's own soft tokens explain behaviour they never showed the model?

    python benchmarks/generalisation.py --dataset=ml-100k [--holdout_tokens=64] [--key=value ...]

For every user with two or more training interactions, the newest training items within ``--holdout_tokens``
tokens (at least one, never all) are held out of everything: no encoder reads them, no M-step scores them, no
statistic is fitted on them. Profile inference runs on the rest, exactly as ``--uip=true`` runs it (``--key=value``
sets any RecBole or ``uip_*`` key, e.g. the paper's setting). The frozen LLM then scores each user's held-out text
(nats per token, every token counted once) with:

* ``own``: the user's own soft tokens (their encoder reading their remaining training items);
* ``mean``: the mean of those tokens over the users (the same shift, no user information);
* ``other_user``: another user's tokens (a fixed random permutation);
* ``no_profile``: no profile tokens at all (later positions do not see the soft slots);
* ``codes``: the user's profile IDs, i.e. the codes they are quantised to.

Writes ``results/<dataset>/<settings fingerprint>/generalisation.{json,md}``: means with 95% intervals across users, the paired
differences, where the text marks ratings the rating-weighted NLL and the NLL of the rating tokens alone (``rating_tokens``:
the part of the text a user's taste should predict best), the inference log and the resolved settings. For scale,
``count_reference``: how many nats per token collaborative models (counts, EASE, a Mult-VAE) of the same remaining
histories gain over their population model on the same held-out items (``recbole_uip.count_reference``; no LLM, about
half a minute).
"""

from __future__ import annotations

import time

import numpy as np

from recbole_uip.benchmarking import (
    HeldOutInference, benchmark_parser, configure, goal_verdict, interval_summary, parse_known_with_overrides, publish_benchmark, run_record, settings_fingerprint, settings_table,
)
from recbole_uip.count_reference import count_reference, gains_per_token, held_out_data, held_out_token_counts

MODES = {"own": "own", "mean": "mean", "other_user": "other", "no_profile": "none", "codes": "code"}


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM", help="whose split defines the training data (default DeepFM: random 8:1:1)")
    parser.add_argument("--holdout_tokens", type=int, default=64, help="held-out text per user, in tokens")
    return parse_known_with_overrides(parser, argv)


def summarise(scores: dict[str, np.ndarray], prefix: str = "") -> dict:
    """Means with intervals per mode, and the paired differences that matter."""
    values = {name: scores[prefix + mode] for name, mode in MODES.items() if prefix + mode in scores}
    pairs = [(a, b) for a, b in (("own", "mean"), ("own", "other_user"), ("own", "no_profile"), ("codes", "mean"),
                                 ("mean", "no_profile")) if a in values and b in values]
    modes, differences = interval_summary(values, pairs)
    return {"modes": modes, "differences": differences}


def render(data: dict) -> str:
    lines = [f"# Generalisation on {data['record']['dataset']}: held-out behaviour scored with each user's own tokens",
             "", f"Settings `{settings_fingerprint(data['record']['settings'])}`. {data['users_evaluated']} users; each user's newest training items within "
             f"{data['holdout_tokens']} tokens ({data['held_out_tokens_mean']:.1f} tokens on average) were held out of "
             f"profile inference and scored afterwards by the frozen LLM. Nats per token, mean over users with its 95% "
             f"interval.", "", "| tokens | own | mean token | another user's | no profile tokens | codes |",
             "|---|---|---|---|---|---|"]
    for key, label in (("plain", "plain NLL"), ("rating_weighted", "rating-weighted"),
                       ("rating_tokens", "rating tokens alone")):
        if key in data:
            cells = [f"{data[key]['modes'][m]['mean']:.4f} [{data[key]['modes'][m]['ci'][0]:.4f}, {data[key]['modes'][m]['ci'][1]:.4f}]"
                     if m in data[key]["modes"] else "" for m in MODES]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (("plain", "plain NLL"), ("rating_tokens", "the held-out rating tokens alone")):
        if key not in data:
            continue
        lines += ["", f"| paired difference ({label}) | mean | 95% interval | users below 0 |", "|---|---|---|---|"]
        for name, d in data[key]["differences"].items():
            lines.append(f"| {name.replace('_minus_', ' - ')} | {d['mean']:+.4f} | [{d['ci'][0]:+.4f}, "
                         f"{d['ci'][1]:+.4f}] | {100 * d['share_below_zero']:.0f}% |")
    own_minus_other = data["plain"]["differences"].get("own_minus_other_user")
    lines += ["", goal_verdict(data["own_minus_mean"], own_minus_other=own_minus_other)]
    if "count_reference" in data:
        gains = {m: f"{d['mean']:.4f} [{d['ci'][0]:.4f}, {d['ci'][1]:.4f}]" for m, d in data["count_reference"].items()}
        lines += ["", f"For scale, collaborative models of the same remaining histories (counts, EASE, a Mult-VAE; no "
                      f"LLM; `benchmarks/count_reference.py`) predict these held-out items better than their population "
                      f"model by {gains['set']} nats/token from the history as a set, {gains['recent']} with its newest "
                      f"items weighted, and {gains['sequence']} with what followed its last items in other histories."]
    lines += ["",
              f"Inference on the remaining history took {data['inference_seconds']:.0f} s; the encoder's line search "
              f"chose steps {[r.get('line_search', {}).get('step') for r in data['inference_history'][1:]]} (relative to "
              f"the mean token-embedding norm).", "", "## Run", "", settings_table(data["record"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    config, settings, logger = configure(args.model, args.dataset, overrides)
    run = HeldOutInference.build(config, settings, logger, args.holdout_tokens)
    start = time.perf_counter()
    trainer = run.trainer
    result = trainer.fit()
    seconds = time.perf_counter() - start

    targets = run.held_out_targets(run.users())
    texts = targets.texts
    scores = trainer.score(targets, with_ratings=targets.flags is not None)
    plain = summarise(scores)
    data = {
        "holdout_tokens": args.holdout_tokens, "users_evaluated": int(len(targets.users)),
        "held_out_tokens_mean": float(np.mean([len(t) for t in texts])),
        **{name: plain["modes"][name]["mean"] for name in MODES},
        "own_minus_mean_ci": plain["differences"]["own_minus_mean"]["ci"],
        "own_minus_mean": plain["differences"]["own_minus_mean"],
        "plain": plain, "inference_seconds": round(seconds, 1), "inference_history": result.history,
        "record": run_record(config, settings, ["benchmarks/generalisation.py", *args.argv]),
    }
    if "weighted_own" in scores:
        data["rating_weighted"] = summarise(scores, "weighted_")
    if "rating_own" in scores:
        data["rating_tokens"] = summarise(scores, "rating_")
    reference = count_reference(held_out_data(run.full_text.histories, run.held))
    gains = gains_per_token(reference, held_out_token_counts(run.full_text, run.held)[0])
    data["count_reference"] = interval_summary({m: g[targets.users] for m, g in gains.items()}, ())[0]
    publish_benchmark(args, "generalisation", data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
