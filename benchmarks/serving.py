"""Serving cost: looking IDs up in the bank, assigning them from a history with the stored encoder, and profiling
the same users with the LLM, measured side by side in one run.

    python benchmarks/serving.py --dataset=ml-100k [--repeats=5] [--key=value ...]

The bank is the one ``--uip=true`` infers with the same settings (reused when it exists). For every user the bank
holds, from their training histories (the same ones inference read):

* ``lookup``: :meth:`FeatureBank.codes_for`, all users at once (reads the codes only);
* ``assign``: :meth:`FeatureBank.assign`, the stored encoder and codebooks on the raw histories, no LLM; in batches
  of 1, 64 and all users;
* ``profile with the LLM``: what a bank rebuild costs the same users with the default ``uip_epochs: 0``: one
  forward pass of the frozen LLM over each of their items' text (the item embeddings), then ``assign``. The LLM's
  load is timed apart. With likelihood training on, profiling costs the M-steps on top
  (``benchmarks/profile_inference.py``).

Each figure is the median of ``--repeats`` runs (the LLM pass: of ``max(1, repeats // 2)``). Writes
``results/<dataset>/<settings fingerprint>/serving.{json,md}``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from recbole_uip.benchmarking import (
    benchmark_parser, configure, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM", help="whose split defines the training data (default DeepFM)")
    parser.add_argument("--repeats", type=int, default=5)
    return parse_known_with_overrides(parser, argv)


def timed(function, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``repeats`` calls, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def render(data: dict) -> str:
    users, t = data["users"], data["seconds"]
    rows = [("lookup (codes only), all users at once", t["lookup"]),
            *((f"assign from the history, batches of {b}", t[f"assign_batch_{b}"]) for b in data["batches"]),
            ("profile with the LLM: item embeddings + assign", t["llm_profile"])]
    lines = [f"# Serving cost ({data['record']['dataset']}, {users} users, {data['items']} items)", "",
             "Side by side in one run; median of the repeats. Per user: the time divided by the users.", "",
             "| what | seconds, all users | microseconds per user | x lookup |", "|---|---|---|---|"]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.4f} | {seconds / users * 1e6:,.1f} | {seconds / t['lookup']:,.0f} |")
    lines += ["", f"- Loading the LLM (not in the rows above): {t['llm_load']:.2f} s.",
              f"- A stored user costs {data['bytes_per_user']} bytes of codes (int64, {data['profiles']} profiles) "
              f"plus their key; `assign` needs the encoder ({data['encoder_bytes'] / 2**20:.1f} MiB, of which item "
              f"embeddings {data['item_embedding_bytes'] / 2**20:.1f} MiB).",
              f"- `assign` reproduces the bank's IDs for {data['assign_agrees'] * 100:.1f}% of its users (the bank was "
              f"inferred from the same histories).",
              f"- Profiling with the LLM is {t['llm_profile'] / t['lookup']:,.0f}x a lookup and "
              f"{t['llm_profile'] / t['assign_batch_all']:,.0f}x `assign` in one batch.", "", "## Run", "",
              settings_table(data["record"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    from recbole_uip.bank import FeatureBank
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.user_features import embed_items
    from recbole_uip.quick_start import check_dataset_files, infer_profiles

    args, overrides = parse_args(argv)
    config, settings, logger = configure(args.model, args.dataset, overrides)
    torch.set_num_threads(settings.num_threads)
    bank = FeatureBank.load(infer_profiles(config) / "bank")
    if bank.encoder is None:
        raise SystemExit("The bank has no encoder (uip_encoder: none): nothing to assign with.")
    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
    items = [[histories.item_ids[i] for i in history] for history in histories.items]
    ratings = None if histories.ratings is None else [list(map(float, r)) for r in histories.ratings]
    users = histories.users
    repeats = max(1, args.repeats)

    seconds = {}
    seconds["lookup"], _ = timed(lambda: bank.codes_for(users), repeats)
    batches = [1, 64, "all"]
    for batch in batches:
        size = len(users) if batch == "all" else batch

        def assign_all(size=size):
            return np.concatenate([bank.assign(items[s:s + size], None if ratings is None else ratings[s:s + size])
                                   for s in range(0, len(users), size)])
        seconds[f"assign_batch_{batch}"], codes = timed(assign_all, repeats)
    rows = [bank.users.index(u) for u in users]
    agrees = float((codes == bank.codes[rows]).all(axis=1).mean())

    start = time.perf_counter()
    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir, logger)
    seconds["llm_load"] = time.perf_counter() - start

    def profile_with_llm():
        embed_items(llm, histories.item_texts, settings.item_embedding_layer)
        return bank.assign(items, ratings)
    seconds["llm_profile"], _ = timed(profile_with_llm, max(1, repeats // 2))

    encoder_bytes = sum(np.asarray(v).nbytes for v in bank.encoder.arrays().values())
    data = {
        "users": len(users), "items": len(histories.item_ids), "profiles": len(bank.profiles),
        "batches": batches, "seconds": {k: round(v, 6) for k, v in seconds.items()},
        "per_user_us": {k: round(v / len(users) * 1e6, 3) for k, v in seconds.items() if k != "llm_load"},
        "bytes_per_user": int(bank.codes.dtype.itemsize * len(bank.profiles)), "encoder_bytes": int(encoder_bytes),
        "item_embedding_bytes": int(bank.encoder.item_embeddings.nbytes), "assign_agrees": agrees,
        "bank": bank.fingerprint[:12], "repeats": repeats,
        "record": run_record(config, settings, ["benchmarks/serving.py", *args.argv]),
    }
    publish_benchmark(args, "serving", data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
