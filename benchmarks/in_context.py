"""The in-context ceiling: how much does a user's own history, read as plain text, help the frozen LLM predict that
user's held-out behaviour, against another user's history of the same length?

    python benchmarks/in_context.py --dataset=ml-100k [--users=300] [--context_tokens=64,128,256,512] [--key=value ...]

The held-out items are the generalisation benchmark's (``held_out_positions``: each user's newest training items
within ``--holdout_tokens``). For each context budget N the frozen LLM reads ``[BOS] <behaviour prefix> <context>
<held-out items>`` and scores the held-out tokens, with the context being:

* ``own``: the user's newest remaining training items, cut to L = min(N, the user's, the other user's) tokens;
* ``other``: the same budget L of another user's remaining items (a fixed random permutation of the users);
* ``none``: no context at all (the prefix, then the held-out items).

A profile squeezes a user into one soft token per profile; what the same LLM gains from the user's whole recent
history, read in context, bounds what such a profile can carry on this text. Reported per N: nats per token (every
held-out token, and the rating tokens alone where the text marks them), means with 95% intervals across users, and
the paired ``own - other`` difference. No training, forward passes only.

Writes ``results/<dataset>/<settings fingerprint>/in_context.{json,md}``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from recbole_uip.benchmarking import (
    benchmark_parser, configure, held_out_positions, interval_summary, matched_contexts, parse_known_with_overrides,
    publish_benchmark, run_record, settings_table,
)

CONDITIONS = ("own", "other", "none")


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM", help="whose split defines the training data (default DeepFM)")
    parser.add_argument("--holdout_tokens", type=int, default=64, help="held-out text per user, in tokens")
    parser.add_argument("--context_tokens", default="64,128,256,512", help="context budgets N, in tokens")
    parser.add_argument("--users", type=int, default=300, help="users scored (the first N with held-out items; 0: all)")
    parser.add_argument("--batch_size", type=int, default=8)
    args, overrides = parse_known_with_overrides(parser, argv)
    args.context_tokens = [int(n) for n in args.context_tokens.split(",") if n.strip()]
    if not args.context_tokens or min(args.context_tokens) < 1 or args.holdout_tokens < 1 or args.users < 0:
        parser.error("--context_tokens, --holdout_tokens must be positive and --users >= 0")
    return args, overrides


@torch.no_grad()
def score(llm, sequences: list[tuple[list[int], list[int], list[bool] | None]], batch_size: int) -> np.ndarray:
    """``(S, 2)``: per sequence ``(head, target, rating flags)``, the mean NLL (nats) of the target tokens given
    everything before them, and the mean over the target's rating tokens (nan without flags or rating tokens).

    Sequences are left-padded so that every target ends the row: only the last ``max target + 1`` positions'
    logits are computed (``logits_to_keep``), and position ids count from each row's first real token.
    """
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    out = np.full((len(sequences), 2), np.nan)
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
            _, target, flags = sequences[r]
            n = len(target)
            nll = -logp[i, -n:].gather(1, torch.tensor(target).unsqueeze(1)).squeeze(1).numpy()
            out[r, 0] = nll.mean()
            if flags is not None and any(flags):
                out[r, 1] = nll[np.asarray(flags, dtype=bool)].mean()
    return out


def summarise(values: dict[str, np.ndarray]) -> dict:
    """Means with intervals per condition, and the paired ``own - other`` and ``own - none`` (users with a value)."""
    means, differences = interval_summary(values, (("own", "other"), ("own", "none"), ("other", "none")))
    return {**means, **differences}


def render(data: dict) -> str:
    lines = [f"# The in-context ceiling on {data['record']['dataset']}: a user's own history as text, against another "
             f"user's", "",
             f"{data['users_evaluated']} users; each user's newest training items within {data['holdout_tokens']} tokens "
             f"({data['held_out_tokens_mean']:.1f} on average) are scored by the frozen LLM after `[BOS] <behaviour "
             f"prefix> <context>`, the context being the user's own newest remaining items, the same number of tokens "
             f"of another user's, or nothing. Nats per token, mean over users with its 95% interval.", ""]
    for key, label in (("plain", "every held-out token"), ("rating", "the rating tokens alone")):
        if not data["budgets"] or key not in data["budgets"][0]:
            continue
        lines += [f"## {label.capitalize()}", "",
                  "| context budget N | mean context tokens | own | another user's | none | own - other (95% interval) "
                  "| users below 0 |", "|---|---|---|---|---|---|---|"]
        for b in data["budgets"]:
            s = b[key]
            d = s["own_minus_other"]
            lines.append(f"| {b['budget']} | {b['context_tokens_mean']:.0f} | {s['own']['mean']:.4f} | "
                         f"{s['other']['mean']:.4f} | {s['none']['mean']:.4f} | {d['mean']:+.4f} "
                         f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] | {d['share_below_zero']:.0%} |")
        lines.append("")
    lines += ["## Run", "", settings_table(data["record"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    from recbole_uip.data.behaviour import check_text_values, collect_training_histories, resolve_text_fields
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.prompt import leading_bos
    from recbole_uip.quick_start import check_dataset_files

    args, overrides = parse_args(argv)
    config, settings, logger = configure(args.model, args.dataset, overrides)
    torch.set_num_threads(settings.num_threads or torch.get_num_threads())
    files = check_dataset_files(config)
    fields = resolve_text_fields(config, settings, files)
    check_text_values(files, fields, config["field_separator"], config["encoding"])
    histories = collect_training_histories(config, settings, fields, logger)
    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir, logger)
    text = BehaviourText(histories, settings, llm.tokenizer, logger)
    held = held_out_positions(text, args.holdout_tokens)
    users = np.array([u for u, h in enumerate(held) if len(h)])
    users = users[:args.users] if args.users else users
    other = users[np.random.default_rng(0).permutation(len(users))]
    other = np.where(other == users, np.roll(other, 1), other)           # never the user themself
    rest = {u: np.setdiff1d(np.arange(len(text.user_pieces[u])), held[u]) for u in np.union1d(users, other)}
    head = leading_bos(llm.tokenizer) + list(llm.tokenizer(settings.behaviour_prefix, add_special_tokens=False)["input_ids"])
    targets = [text.tokens(u, held[u]) for u in users]

    start = time.perf_counter()
    data = {"holdout_tokens": args.holdout_tokens, "users_evaluated": int(len(users)),
            "held_out_tokens_mean": float(np.mean([len(t) for t, _ in targets])), "budgets": []}
    none = score(llm, [(head, t, f) for t, f in targets], args.batch_size)
    for budget in args.context_tokens:
        own_ctx, other_ctx = matched_contexts(text, users, other, rest, budget)
        own = score(llm, [(head + c, t, f) for c, (t, f) in zip(own_ctx, targets)], args.batch_size)
        theirs = score(llm, [(head + c, t, f) for c, (t, f) in zip(other_ctx, targets)], args.batch_size)
        entry = {"budget": budget, "context_tokens_mean": float(np.mean([len(c) for c in own_ctx])),
                 "plain": summarise({"own": own[:, 0], "other": theirs[:, 0], "none": none[:, 0]})}
        if np.isfinite(own[:, 1]).any():
            entry["rating"] = summarise({"own": own[:, 1], "other": theirs[:, 1], "none": none[:, 1]})
        data["budgets"].append(entry)
        logger.info(f"in context: N={budget}: own - other {entry['plain']['own_minus_other']['mean']:+.4f} nats/token")
    data["seconds"] = round(time.perf_counter() - start, 1)
    data["record"] = run_record(config, settings, ["benchmarks/in_context.py", *args.argv])
    publish_benchmark(args, "in_context", data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
