"""A collaborative model's reference for the generalisation goal: how many nats per token of a user's held-out text
their own history predicts beyond a population model, with no LLM at all.

    python benchmarks/count_reference.py --dataset=ml-100k [--users=0,150,300] [--holdout_tokens=64] [--key=value ...]

The held-out items are the generalisation and in-context benchmarks' (``held_out_positions``: each user's newest
training items within ``--holdout_tokens`` tokens of the LLM's tokenizer). Each held-out item's text and rating are
scored by models fitted on the remaining histories only (``recbole_uip.count_reference``): a population model
(popularity; the ratings overall and given the item's text) and three nested user models that add the user's own
history: as a set (their texts, popularity over the items they have not seen, item-to-item cosine and EASE, a
Mult-VAE, their rating habits), then the same from their newest items, then the items that followed their last ones
in other histories. Each is a mixture whose weights are fitted on the other half of the users. A user model's gain
over the population's, summed over a user's held-out items and divided by the tokens of those items' text, is in the
unit of the goal (own tokens 0.05 nats/token below the mean token) and of the in-context reference's
``own - population``, with the sign flipped.

Reported per set of users (all, and the first N of the in-context runs) and user model: the gain per token on every
held-out token (items' text and ratings together), its two parts, and the rating part per rating token, each a mean
over users with its 95% interval; each model's NLL per held-out item; where the data has timestamps, each model's
gain per item for the items rated within an hour of the user's newest remaining item and for the later ones; the
largest model's mixture weights. The tokenizer is the LLM's (``uip_llm``), so per-token figures are that LLM's;
nothing else of the LLM is used.

Writes ``results/<dataset>/<settings fingerprint>/count_reference[_<variant>].{json,md}``.
"""

from __future__ import annotations

import time

import numpy as np

from recbole_uip.benchmarking import (
    GENERALISATION_GOAL, benchmark_parser, comma_separated, configure, finite_or_none, interval_summary,
    load_held_out_text, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)
from recbole_uip.count_reference import (
    MODELS, SESSION_GAP, count_reference, gains_by_gap, gains_per_token, held_out_data, held_out_token_counts,
    model_components, per_count,
)

USER_MODELS = MODELS[1:]     # set, recent, sequence
GAINS = ("gain_per_token", "text_gain_per_token", "rating_gain_per_token", "rating_gain_per_rating_token")


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM", help="whose split defines the training data (default DeepFM)")
    parser.add_argument("--holdout_tokens", type=int, default=64, help="held-out text per user, in tokens")
    parser.add_argument("--users", default="0,150,300",
                        help="the sets of users reported: the first N with held-out items, 0 for all (default "
                             "0,150,300: all, and the users of the in-context runs); the models are fitted on all")
    args, overrides = parse_known_with_overrides(parser, argv)
    args.users = comma_separated(parser, "--users", args.users, int)
    if not args.users or min(args.users) < 0 or args.holdout_tokens < 1:
        parser.error("--users must name one or more counts >= 0 and --holdout_tokens must be positive")
    return args, overrides


def per_user_measures(reference, tokens: np.ndarray, rating_tokens: np.ndarray, items: np.ndarray) -> dict:
    """``{model: {measure: (U,)}}`` from a :class:`~recbole_uip.count_reference.CountReference` and each user's
    held-out tokens, rating tokens and items (nan where a user has none): per user model, :data:`GAINS`; per model
    (the population's too), ``text_nll_per_item`` and ``rating_nll_per_item``."""
    out, gains = {}, gains_per_token(reference, tokens)
    text_nll, rating_nll = reference.text_nll, reference.rating_nll          # each built once, for every model
    for model in MODELS:
        out[model] = {"text_nll_per_item": per_count(text_nll[model], items)}
        if rating_nll:
            out[model]["rating_nll_per_item"] = per_count(rating_nll[model], items)
        if model == "population":
            continue
        text, rating = reference.gain(model)
        out[model].update({"gain_per_token": gains[model], "text_gain_per_token": per_count(text, tokens),
                           "rating_gain_per_token": per_count(rating, tokens),
                           "rating_gain_per_rating_token": per_count(rating, rating_tokens)})
    return out


def _interval(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


MODEL_LABELS = {"set": "the history as a set", "recent": "+ its newest items", "sequence": "+ what followed its last items"}


def render(data: dict) -> str:
    record = data["record"]
    lines = [f"# A collaborative model's reference on {record['dataset']}: what a user's own history predicts of their "
             f"held-out items, per token", "",
             f"Each user's newest training items within {data['holdout_tokens']} tokens are held out (the "
             f"generalisation and in-context benchmarks' items: {data['held_out_tokens_mean']:.1f} tokens and "
             f"{data['held_out_items_mean']:.1f} items per user on average, {data['item_tokens_mean']:.1f} tokens per "
             f"item). Their texts and ratings are scored by models fitted on the remaining histories only: a "
             f"population model, and user models that add the user's history as a set (their texts, popularity over "
             f"the items they have not seen, item-to-item cosine, EASE and a Mult-VAE), then the same from their "
             f"newest {data['recent']} items, then the items that followed their last items in other histories; each a "
             f"mixture whose weights are fitted on the other half of the users (`recbole_uip/count_reference.py`). "
             f"The gain is a user model's log-likelihood minus the population's, per token of the held-out text: "
             f"the unit of the generalisation goal ({GENERALISATION_GOAL} nats/token, own tokens below the mean token) "
             f"and of the in-context reference's own - population, sign flipped. It is a reference, not a bound: a "
             f"better model can gain more. No LLM is run; its tokenizer counts the tokens. Means over users with 95% "
             f"intervals.", "",
             "| users | user model | gain per token (text and rating) | text part | rating part | rating part per "
             "rating token | text NLL per item | rating NLL per item |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in data["summaries"]:
        population = entry["models"]["population"]
        lines.append(f"| {entry['label']} ({entry['users']}) | population | | | | | "
                     f"{population['text_nll_per_item']['mean']:.3f} | "
                     f"{population.get('rating_nll_per_item', {}).get('mean', float('nan')):.3f} |")
        for model in USER_MODELS:
            s = entry["models"][model]
            rating = s.get("rating_gain_per_rating_token")
            lines.append(f"| | {MODEL_LABELS[model]} | {_interval(s['gain_per_token'])} | "
                         f"{_interval(s['text_gain_per_token'])} | {_interval(s['rating_gain_per_token'])} | "
                         f"{_interval(rating) if rating else 'n/a'} | {s['text_nll_per_item']['mean']:.3f} | "
                         f"{s.get('rating_nll_per_item', {}).get('mean', float('nan')):.3f} |")
    if data.get("by_gap"):
        by_gap = data["by_gap"]
        within, after = (by_gap[USER_MODELS[0]][k]["items"] for k in ("within", "after"))
        lines += ["", f"Per held-out item (all users; text and rating), by when it was rated: within "
                      f"{data['session_gap'] / 3600:g} h of the user's newest remaining item ({within} items: mostly the "
                      f"same rating session) or later ({after} items). Means over items.", "",
                  "| user model | gain per item, within | gain per item, later |", "|---|---|---|"]
        for model in USER_MODELS:
            cells = [by_gap[model][k]["gain_per_item"] for k in ("within", "after")]
            lines.append(f"| {MODEL_LABELS[model]} | " + " | ".join("n/a" if c is None else f"{c:+.3f}" for c in cells)
                         + " |")
    lines += ["", "Mixture weights of the largest model (fold 0, fold 1; each fitted on the other fold's users; "
              "components below 0.01 in both folds left out):", ""]
    for part, weights in (("text", data["text_weights"]), ("rating", data["rating_weights"])):
        if not weights:
            continue
        names, per_fold = weights["components"], weights["weights"]
        lines.append(f"- {part}: " + "; ".join(f"{n} {per_fold[0][k]:.3f}, {per_fold[1][k]:.3f}"
                                               for k, n in enumerate(names) if max(per_fold[0][k], per_fold[1][k]) >= 0.01))
    lines += ["", "## Run", "", settings_table(record)]
    return "\n".join(lines)


def main(argv=None) -> int:
    from recbole_uip.count_reference import RECENT

    args, overrides = parse_args(argv)
    config, settings, logger = configure(args.model, args.dataset, overrides)
    histories, _, text, held = load_held_out_text(config, settings, logger, args.holdout_tokens)
    start = time.perf_counter()
    data = held_out_data(histories, held)
    reference = count_reference(data)
    tokens, rating_tokens = held_out_token_counts(text, held)
    items = np.array([len(h) for h in held], dtype=float)
    measures = per_user_measures(reference, tokens, rating_tokens, items)
    with_held = np.flatnonzero(items > 0)
    result = {"holdout_tokens": args.holdout_tokens, "recent": RECENT, "users_with_held_out": int(len(with_held)),
              "held_out_tokens_mean": float(tokens[with_held].mean()),
              "held_out_items_mean": float(items[with_held].mean()),
              "item_tokens_mean": float(tokens[with_held].sum() / items[with_held].sum()),
              "texts": int(data.num_texts), "items": int(data.num_items), "summaries": []}
    for count in args.users:
        chosen = with_held[:count] if count else with_held
        models = {model: interval_summary({k: v[chosen] for k, v in values.items() if np.isfinite(v[chosen]).any()},
                                          ())[0] for model, values in measures.items()}
        result["summaries"].append({"label": f"first {count}" if count else "all", "users": int(len(chosen)),
                                    "models": models})
        logger.info(f"count reference, {result['summaries'][-1]['label']} users: gain per token " + ", ".join(
            f"{model} {models[model]['gain_per_token']['mean']:+.4f}" for model in USER_MODELS))
    largest = MODELS[-1]
    text_components, rating_components = model_components(largest)
    result["text_weights"] = {"components": list(text_components),
                              "weights": reference.text_weights[largest].tolist()}
    result["rating_weights"] = ({"components": list(rating_components),
                                 "weights": reference.rating_weights[largest].tolist()} if reference.rating_weights else {})
    result["session_gap"] = SESSION_GAP
    result["by_gap"] = gains_by_gap(reference, data)
    result["per_user"] = {"users": with_held.tolist(), "tokens": tokens[with_held].tolist(),
                          **{f"{model}_{k}": finite_or_none(v[with_held]) for model, values in measures.items()
                             for k, v in values.items()}}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["record"] = run_record(config, settings, ["benchmarks/count_reference.py", *args.argv])
    publish_benchmark(args, "count_reference", result, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
