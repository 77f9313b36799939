"""The in-context ceiling: how much does a user's own history, read as plain text, help the frozen LLM predict that
user's held-out behaviour, against another user's history of the same length?

    python benchmarks/in_context.py --dataset=ml-100k [--users=300] [--context_tokens=64,128,256,512]
        [--context_from=newest,oldest] [--population=8] [--context_source=history|mult_vae|mult_vae_top]
        [--key=value ...]

The held-out items are the generalisation benchmark's (``held_out_positions``: each user's newest training items
within ``--holdout_tokens``). For each context budget N the frozen LLM reads ``[BOS] <behaviour prefix> <context>
<held-out items>`` and scores the held-out tokens, with the context being:

* ``own``: the user's newest remaining training items, cut to L = min(N, the user's, the other user's) tokens;
* ``other``: the same budget L of another user's remaining items (a fixed random permutation of the users);
* ``none``: no context at all (the prefix, then the held-out items);
* ``population`` (with ``--population=M``): per held-out token, the mean of the LLM's predictive distributions
  given M other users' histories (``other`` and M - 1 more, each cut to the own context's length). It uses nobody's
  history in particular, as the mean token uses nobody's token: ``own - population`` is the in-context analogue of the
  generalisation goal's ``own - mean``, where ``own - other`` is that of ``own - another user's tokens``. A mixture is
  never worse than its members' average (Jensen), so it beats ``other`` on average; it is also an ensemble, better
  calibrated than any one context. Two mixtures that hold the user's history separate what is the user's from
  what is the ensemble's: ``own_in_population``, the same mixture with the user's own history in place of
  ``other``'s (weight 1/M), and ``own_half``, half the user's own prediction, half the mixture's; and its control,
  ``other_half``: half the prediction of one more user (neither the user nor one of the M), half the mixture's.
  ``own_half - other_half`` is what the user's own context adds at weight 1/2 beyond any user's (older result files
  have no ``other_half``).

``--context_source=mult_vae`` reads, in place of each history, a text of items drawn from a Mult-VAE's
distribution over the items the user has not seen (:func:`~recbole_uip.collaborative_text.collaborative_contexts`,
the texts the token probe's ``mult_vae`` fits learn from; the Mult-VAE trained on every user's remaining training
items, no held-out item), and ``mult_vae_top`` the most probable of those items in order: does the frozen LLM take
a collaborative model's prediction for the user, written in its context, onto the user's held-out items? The
``own`` context is the user's prediction, ``other`` and the mixture's members other users'; each cut, as a history
is, to its last L tokens (newest end only).

``--context_from=oldest`` reads the oldest N tokens of both remaining histories instead (the user's history furthest
in time from the held-out items, and another user's oldest); ``--context_from=newest,oldest`` reads both ends in one
run, the same users and held-out text, and compares them user by user: how much of the ``own - other`` gap from the
newest end is left from the oldest. Every user's score per condition is kept in the JSON (``per_user``).

A profile squeezes a user into one soft token per profile; what the same LLM gains from the user's whole recent
history, read in context, bounds what such a profile can carry on this text. Reported per N: nats per token (every
held-out token, and the rating tokens alone where the text marks them), means with 95% intervals across users, and
the paired ``own - other`` difference; with ``--population``, also ``own``, ``own_in_population``, ``own_half`` and
``other_half`` each minus ``population``, and ``own_half - other_half``. No training, forward passes only.

Writes ``results/<dataset>/<settings fingerprint>/in_context[_multvae | _multvae_top][_oldest | _newest_oldest]
[_population<M>][_<variant>].{json,md}``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from recbole_uip.benchmarking import (
    CONTEXT_ENDS, GENERALISATION_GOAL, benchmark_parser, comma_separated, configure, context_positions, finite_or_none,
    common_length, interval_summary, load_held_out_text, matched_contexts, newest_tokens, parse_known_with_overrides,
    publish_benchmark, run_record, settings_table, without_held_out,
)

CONDITIONS = ("own", "other", "none")
CONTEXT_SOURCES = ("history", "mult_vae", "mult_vae_top")


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM", help="whose split defines the training data (default DeepFM)")
    parser.add_argument("--holdout_tokens", type=int, default=64, help="held-out text per user, in tokens")
    parser.add_argument("--context_tokens", default="64,128,256,512", help="context budgets N, in tokens")
    parser.add_argument("--users", type=int, default=300, help="users scored (the first N with held-out items; 0: all)")
    parser.add_argument("--context_from", default="newest",
                        help="which end of each remaining history the context is read from: newest, oldest, or "
                             "newest,oldest (both, compared user by user; default newest)")
    parser.add_argument("--population", type=int, default=0,
                        help="also score the held-out items under the mixture of M other users' histories (the "
                             "in-context analogue of the mean token; M includes the 'other' condition's user; "
                             "M + 1 forward passes per user instead of 2; default 0: off)")
    parser.add_argument("--context_source", choices=CONTEXT_SOURCES, default="history",
                        help="what each context is: the user's remaining history (default), or a text of items drawn "
                             "from a Mult-VAE's prediction of their unseen items (mult_vae), or its most probable "
                             "items in order (mult_vae_top); the Mult-VAE trained on the remaining histories")
    parser.add_argument("--batch_size", type=int, default=8)
    args, overrides = parse_known_with_overrides(parser, argv)
    args.context_tokens = comma_separated(parser, "--context_tokens", args.context_tokens, int)
    if not args.context_tokens or min(args.context_tokens) < 1 or args.holdout_tokens < 1 or args.users < 0 \
            or args.population < 0:
        parser.error("--context_tokens, --holdout_tokens must be positive, --users and --population >= 0")
    args.context_from = [e.strip() for e in args.context_from.split(",") if e.strip()]
    if not args.context_from or len(set(args.context_from)) < len(args.context_from) \
            or not set(args.context_from) <= set(CONTEXT_ENDS):
        parser.error(f"--context_from must name one or both of {', '.join(CONTEXT_ENDS)}, e.g. newest,oldest")
    args.context_from = [e for e in CONTEXT_ENDS if e in args.context_from]      # newest first
    if args.context_source != "history" and args.context_from != ["newest"]:
        parser.error(f"--context_source={args.context_source} writes a prediction, not a history: it has no oldest "
                     f"end (leave --context_from at newest)")
    return args, overrides


@torch.no_grad()
def token_nlls(llm, sequences: list[tuple[list[int], list[int], list[bool] | None]], batch_size: int) -> list[np.ndarray]:
    """Per sequence ``(head, target, rating flags)``, the NLL (nats) of each target token given everything before
    it, ``(len(target),)``.

    Sequences are left-padded so that every target ends the row: only the last ``max target + 1`` positions'
    logits are computed (``logits_to_keep``), and position ids count from each row's first real token.
    """
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    out: list[np.ndarray] = [np.empty(0)] * len(sequences)
    order = np.argsort([len(h) + len(t) for h, t, _ in sequences])     # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(sequences[r][0]) + len(sequences[r][1]) for r in rows)
        keep = max(len(sequences[r][1]) for r in rows) + 1
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            head, target, _ = sequences[r]
            seq = head + target
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = llm.model(input_ids=ids.to(llm.device), attention_mask=mask.to(llm.device),
                           position_ids=positions.to(llm.device), logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).cpu()            # (B, keep - 1, V): predicts the last keep-1
        for i, r in enumerate(rows):
            target = sequences[r][1]
            out[r] = -logp[i, len(logp[i]) - len(target):].gather(1, torch.tensor(target).unsqueeze(1)).squeeze(1).numpy()
    return out


def mean_scores(nlls: list[np.ndarray], flags: list[list[bool] | None]) -> np.ndarray:
    """``(S, 2)``: per sequence, the mean of its token NLLs ``nlls[s]`` and their mean over the rating tokens
    ``flags[s]`` (nan without flags or rating tokens)."""
    out = np.full((len(nlls), 2), np.nan)
    for r, (nll, f) in enumerate(zip(nlls, flags)):
        out[r, 0] = nll.mean()
        if f is not None and any(f):
            out[r, 1] = nll[np.asarray(f, dtype=bool)].mean()
    return out


def score(llm, sequences: list[tuple[list[int], list[int], list[bool] | None]], batch_size: int) -> np.ndarray:
    """``(S, 2)``: per sequence ``(head, target, rating flags)``, the mean NLL (nats) of the target tokens given
    everything before them, and the mean over the target's rating tokens (nan without flags or rating tokens);
    :func:`token_nlls`, averaged."""
    return mean_scores(token_nlls(llm, sequences, batch_size), [f for _, _, f in sequences])


def mixture_nlls(members: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per sequence, the NLL of each target token under the equal mixture of M predictive distributions:
    ``-log(mean_m exp(-nll[m][s][t]))``. ``members``: M lists (one per member) of per-sequence token NLLs, aligned."""
    from scipy.special import logsumexp

    count = len(members)
    return [-(logsumexp(-np.stack(column), axis=0) - np.log(count)) for column in zip(*members)]


def outside_users(users: np.ndarray, members: np.ndarray, seed: int = 2) -> np.ndarray:
    """``(U,)``: per user, one more user from ``users``, neither the user nor one of their ``members[i]`` (drawn
    with ``seed``): the ``other_half`` control's."""
    if members.shape[1] > len(users) - 2:
        raise ValueError(f"a user outside a mixture of {members.shape[1]} needs more than {members.shape[1] + 1} "
                         f"users, got {len(users)}")
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(users[(users != user) & ~np.isin(users, row)]) for user, row in zip(users, members)])


def population_members(users: np.ndarray, other: np.ndarray, size: int, seed: int = 1) -> np.ndarray:
    """``(U, size)``: per user, ``size`` distinct other users from ``users``, the first being ``other``'s (the
    ``other`` condition), the rest drawn at random (``seed``); never the user themself."""
    if size > len(users) - 1:
        raise ValueError(f"--population={size} needs more than {size} users, got {len(users)}")
    rng = np.random.default_rng(seed)
    members = np.empty((len(users), size), dtype=users.dtype)
    for i, (user, first) in enumerate(zip(users, other)):
        candidates = users[(users != user) & (users != first)]
        members[i] = np.concatenate([[first], rng.choice(candidates, size - 1, replace=False)])
    return members


def summarise(values: dict[str, np.ndarray]) -> dict:
    """Means with intervals per condition, and the paired ``own - other`` and ``own - none`` (users with a value)."""
    means, differences = interval_summary(values, (("own", "other"), ("own", "none"), ("other", "none")))
    return {**means, **differences}


POPULATION_PAIRS = (("own", "population"), ("own_in_population", "population"), ("own_half", "population"),
                    ("other_half", "population"), ("own_half", "other_half"),
                    ("population", "other"))


def summarise_population(values: dict[str, np.ndarray]) -> dict:
    """Means with intervals of ``own``, ``other``, ``others_mean`` (the M members' scores averaged), ``population``
    (their mixture), ``own_in_population`` and ``own_half`` (the module's docstring), and the paired differences
    :data:`POPULATION_PAIRS`."""
    means, differences = interval_summary(values, POPULATION_PAIRS)
    return {**means, **differences}


def compare_ends(newest: tuple[np.ndarray, np.ndarray], oldest: tuple[np.ndarray, np.ndarray]) -> dict:
    """The two ends of the history compared user by user at one budget: ``own``, ``other`` and the gap ``own -
    other``, each newest minus oldest. ``newest``, ``oldest``: the ``(own, other)`` scores, ``(U, 2)`` each
    (:func:`score`'s columns). Returns ``{"plain": ..., "rating": ...}``, each the paired differences of
    :func:`~recbole_uip.benchmarking.interval_summary` (``rating`` only where there are rating tokens)."""
    out = {}
    for column, key in ((0, "plain"), (1, "rating")):
        own_n, other_n = (scores[:, column] for scores in newest)
        own_o, other_o = (scores[:, column] for scores in oldest)
        if not np.isfinite(own_n).any():
            continue
        values = {"own_newest": own_n, "own_oldest": own_o, "other_newest": other_n, "other_oldest": other_o,
                  "gap_newest": own_n - other_n, "gap_oldest": own_o - other_o}
        _, out[key] = interval_summary(values, (("own_newest", "own_oldest"), ("other_newest", "other_oldest"),
                                                ("gap_newest", "gap_oldest")))
    return out


def _interval(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def render(data: dict) -> str:
    ends = data.get("context_from", ["newest"])
    described = " or ".join(ends)
    source = data.get("context_source", "history")
    if source == "history":
        title = "a user's own history as text, against another user's"
        context = (f"the {described} N tokens of the user's own remaining items, the same number of tokens of another "
                   f"user's (from the same end), or nothing")
    else:
        title = "a collaborative model's prediction for the user as text, against another user's"
        context = ("the last N tokens of a text of the items a Mult-VAE predicts for the user among those they have "
                   "not seen, " + ("most probable first" if source == "mult_vae_top" else "drawn from its distribution")
                   + " (the Mult-VAE trained on every user's remaining training items, no held-out item), the same "
                   "number of tokens of another user's such text, or "
                   "nothing (\"own\" and \"another user's\" below are these predictions, not histories)")
    lines = [f"# The in-context ceiling on {data['record']['dataset']}: {title}", "",
             f"{data['users_evaluated']} users; each user's newest training items within {data['holdout_tokens']} tokens "
             f"({data['held_out_tokens_mean']:.1f} on average) are scored by the frozen LLM after `[BOS] <behaviour "
             f"prefix> <context>`, the context being {context}. Nats per token, mean over users with its 95% "
             f"interval.", ""]
    end_column = ends != ["newest"]
    for key, label in (("plain", "every held-out token"), ("rating", "the rating tokens alone")):
        if not data["budgets"] or key not in data["budgets"][0]:
            continue
        lines += [f"## {label.capitalize()}", "",
                  "| context budget N |" + (" history end |" if end_column else "") + " mean context tokens | own | "
                  "another user's | none | own - other (95% interval) | users below 0 |",
                  "|---|---|---|---|---|---|---|" + ("---|" if end_column else "")]
        for b in data["budgets"]:
            s = b[key]
            d = s["own_minus_other"]
            lines.append(f"| {b['budget']} |" + (f" {b.get('context_from', 'newest')} |" if end_column else "") +
                         f" {b['context_tokens_mean']:.0f} | {s['own']['mean']:.4f} | "
                         f"{s['other']['mean']:.4f} | {s['none']['mean']:.4f} | {_interval(d)} | "
                         f"{d['share_below_zero']:.0%} |")
        lines.append("")
    if data.get("ends"):
        lines += ["## The newest end against the oldest, user by user", "",
                  "Each user's score with the newest N tokens in context minus their score with the oldest N "
                  "(negative: the newest end predicts the held-out items better), for their own history and for "
                  "another user's, and the gap own - other from the newest end minus the same gap from the oldest: "
                  "the part of the newest end's gap that the oldest end does not have. Means over users with 95% "
                  "intervals.", "",
                  "| tokens | context budget N | own: newest - oldest | another user's: newest - oldest | "
                  "(own - other) newest - (own - other) oldest |", "|---|---|---|---|---|"]
        for key, label in (("plain", "every held-out token"), ("rating", "the rating tokens")):
            for e in data["ends"]:
                if key in e:
                    d = e[key]
                    lines.append(f"| {label} | {e['budget']} | {_interval(d['own_newest_minus_own_oldest'])} | "
                                 f"{_interval(d['other_newest_minus_other_oldest'])} | "
                                 f"{_interval(d['gap_newest_minus_gap_oldest'])} |")
        lines.append("")
    if data.get("population"):
        size = data["population"]
        lines += [f"## Against a mixture of {size} other users' histories", "",
                  f"Each held-out token scored under the equal mixture of the LLM's predictive distributions given {size} "
                  f"other users' histories (the first is another user's above; each cut to the user's own context's "
                  f"length): a prediction that uses nobody's history in particular, as the mean token uses nobody's "
                  f"token, and an ensemble, better calibrated than one context. `own - mixture` is the in-context "
                  f"analogue of the generalisation goal's `own - mean` (the goal: {GENERALISATION_GOAL} nats/token "
                  f"below it). Two mixtures hold the user's own history: *own among {size}*, the mixture with the "
                  f"user's history in place of another user's (weight 1/{size}), and *own and mixture*, half the "
                  f"user's own prediction and half the mixture's; their gain over the mixture is the user's, with "
                  f"the ensemble's calibration on both sides." +
                  (f" *One more user's and mixture*, half the prediction given the context of a user outside the "
                   f"{size} and half the mixture's, is the control of *own and mixture*: what any one more context "
                   f"adds at that weight." if any("other_half_minus_population" in b.get("population", {}).get(
                       "plain", {}) for b in data["budgets"]) else "") +
                  " Means over users with 95% intervals.", ""]
        for key, label in (("plain", "Every held-out token"), ("rating", "The rating tokens")):
            rows = [b for b in data["budgets"] if key in b.get("population", {})]
            if not rows:
                continue
            names = {"own": "own", "population": "mixture", "own_in_population": f"own among {size}",
                     "own_half": "own and mixture", "other_half": "one more user's and mixture",
                     "other": "another user's"}
            pairs = [(a, b_) for a, b_ in POPULATION_PAIRS if f"{a}_minus_{b_}" in rows[0]["population"][key]]
            lines += [f"### {label}", "",
                      "| context budget N |" + (" history end |" if end_column else "") + " own | another user's | "
                      f"{size} others' average | mixture | " + " | ".join(f"{names[a]} - {names[b_]}" for a, b_ in pairs)
                      + " |", "|---|---|---|---|---|" + "---|" * len(pairs) + ("---|" if end_column else "")]
            for b in rows:
                s = b["population"][key]
                lines.append(f"| {b['budget']} |" + (f" {b['context_from']} |" if end_column else "") +
                             f" {s['own']['mean']:.4f} | {s['other']['mean']:.4f} | {s['others_mean']['mean']:.4f} | "
                             f"{s['population']['mean']:.4f} | " +
                             " | ".join(_interval(s[f"{a}_minus_{b_}"]) for a, b_ in pairs) + " |")
            lines.append("")
    lines += ["## Run", "", settings_table(data["record"])]
    return "\n".join(lines)


def collaborative_source(histories, held: list[np.ndarray], settings, tokenizer, logger, users,
                         most_likely_first: bool):
    """``--context_source=mult_vae`` (``most_likely_first``: ``mult_vae_top``): a function ``(user, budget) ->
    token ids`` writing each of ``users``' contexts from a Mult-VAE trained on every user's histories without their
    held-out positions ``held[u]`` (:func:`~recbole_uip.collaborative_text.collaborative_contexts`)."""
    from recbole_uip.collaborative_text import collaborative_contexts
    from recbole_uip.data.behaviour_text import BehaviourText

    remaining = without_held_out(histories, held)
    logger.info(f"in context: contexts written from a Mult-VAE trained on {len(remaining.items)} users' remaining "
                f"training items" + (", its most probable items first" if most_likely_first else ", drawn"))
    return collaborative_contexts(BehaviourText(remaining, settings, tokenizer, logger), users,
                                  most_likely_first=most_likely_first)


def main(argv=None) -> int:
    from recbole_uip.inference.prompt import leading_bos

    args, overrides = parse_args(argv)
    config, settings, logger = configure(args.model, args.dataset, overrides)
    torch.set_num_threads(settings.num_threads or torch.get_num_threads())
    histories, llm, text, held = load_held_out_text(config, settings, logger, args.holdout_tokens)
    users = np.array([u for u, h in enumerate(held) if len(h)])
    users = users[:args.users] if args.users else users
    other = users[np.random.default_rng(0).permutation(len(users))]
    other = np.where(other == users, np.roll(other, 1), other)           # never the user themself
    members = population_members(users, other, args.population) if args.population else other[:, None]
    outside = outside_users(users, members) if args.population else None
    everyone = np.union1d(users, members if outside is None else np.column_stack([members, outside]))
    rest = {u: np.setdiff1d(np.arange(len(text.user_pieces[u])), held[u]) for u in everyone}
    predicted = None if args.context_source == "history" else collaborative_source(
        histories, held, settings, llm.tokenizer, logger, everyone, args.context_source == "mult_vae_top")
    head = leading_bos(llm.tokenizer) + list(llm.tokenizer(settings.behaviour_prefix, add_special_tokens=False)["input_ids"])
    targets = [text.tokens(u, held[u]) for u in users]
    flags = [f for _, f in targets]

    def read(contexts: list[list[int]]) -> list[np.ndarray]:
        """Each user's held-out token NLLs after ``[BOS] <prefix> <their context>`` (:func:`token_nlls`)."""
        return token_nlls(llm, [(head + c, t, f) for c, (t, f) in zip(contexts, targets)], args.batch_size)

    start = time.perf_counter()
    data = {"holdout_tokens": args.holdout_tokens, "users_evaluated": int(len(users)),
            "held_out_tokens_mean": float(np.mean([len(t) for t, _ in targets])), "context_from": args.context_from,
            "population": args.population, "budgets": []}
    none = score(llm, [(head, t, f) for t, f in targets], args.batch_size)
    per_user = {"users": users.tolist(), "none": finite_or_none(none[:, 0]),
                "rating_none": finite_or_none(none[:, 1])}
    scores = {}                                                          # (end, budget) -> (own, other), (U, 2) each
    for budget in args.context_tokens:
        for end in args.context_from:
            positions = context_positions(text, everyone, rest, budget, end)
            if predicted is None:
                own_ctx, other_ctx = matched_contexts(text, users, other, positions, budget)

                def context_of(user, length):
                    return newest_tokens(text, user, positions[user], length)
            else:
                own_ctx, other_ctx = map(list, zip(*(common_length(predicted(u, budget), predicted(o, budget))
                                                     for u, o in zip(users, other))))

                def context_of(user, length, budget=budget):
                    ids = predicted(user, budget)
                    return ids[len(ids) - length:] if length > 0 else []
            own_nlls = read(own_ctx)
            own = mean_scores(own_nlls, flags)
            member_nlls = [read(other_ctx)]
            theirs = mean_scores(member_nlls[0], flags)
            scores[end, budget] = (own, theirs)
            entry = {"budget": budget, "context_from": end,
                     "context_tokens_mean": float(np.mean([len(c) for c in own_ctx])),
                     "plain": summarise({"own": own[:, 0], "other": theirs[:, 0], "none": none[:, 0]})}
            if np.isfinite(own[:, 1]).any():
                entry["rating"] = summarise({"own": own[:, 1], "other": theirs[:, 1], "none": none[:, 1]})
            data["budgets"].append(entry)
            modes = [("own", own), ("other", theirs)]
            for m in range(1, args.population):     # the mixture's other members, each cut to the own context's length
                member_nlls.append(read([context_of(members[i, m], len(c)) for i, c in enumerate(own_ctx)]))
            if args.population:
                mixture_tokens = mixture_nlls(member_nlls)
                values = {"own": own, "other": theirs, "population": mean_scores(mixture_tokens, flags),
                          "others_mean": np.mean([mean_scores(m, flags) for m in member_nlls], axis=0),
                          "own_in_population": mean_scores(mixture_nlls([own_nlls, *member_nlls[1:]]), flags),
                          "own_half": mean_scores(mixture_nlls([own_nlls, mixture_tokens]), flags)}
                outside_nlls = read([context_of(outside[i], len(c)) for i, c in enumerate(own_ctx)])
                values["other_half"] = mean_scores(mixture_nlls([outside_nlls, mixture_tokens]), flags)
                entry["population"] = {key: summarise_population({k: v[:, c] for k, v in values.items()})
                                       for c, key in ((0, "plain"), (1, "rating")) if np.isfinite(own[:, c]).any()}
                modes += [(k, values[k]) for k in ("population", "own_in_population", "own_half", "other_half")]
            for mode, values in modes:
                per_user[f"{end}{budget}_{mode}"] = finite_or_none(values[:, 0])
                per_user[f"rating_{end}{budget}_{mode}"] = finite_or_none(values[:, 1])
            logger.info(f"in context: N={budget}, {end} end: own - other "
                        f"{entry['plain']['own_minus_other']['mean']:+.4f} nats/token" +
                        (f", own - mixture of {args.population} "
                         f"{entry['population']['plain']['own_minus_population']['mean']:+.4f}"
                         if args.population else ""))
    if len(args.context_from) == 2:
        data["ends"] = [{"budget": budget, **compare_ends(scores["newest", budget], scores["oldest", budget])}
                        for budget in args.context_tokens]
    data["per_user"] = per_user
    data["seconds"] = round(time.perf_counter() - start, 1)
    data["record"] = run_record(config, settings, ["benchmarks/in_context.py", *args.argv])
    data["context_source"] = args.context_source
    name = "in_context" + {"history": "", "mult_vae": "_multvae", "mult_vae_top": "_multvae_top"}[args.context_source] \
        + "".join(f"_{end}" for end in args.context_from if args.context_from != ["newest"]) \
        + (f"_population{args.population}" if args.population else "")
    publish_benchmark(args, name, data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
