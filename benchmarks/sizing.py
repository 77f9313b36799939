"""What profile inference costs at 10k, 1M and 100M users, computed from throughputs measured here.

    python benchmarks/sizing.py [--dataset=ml-100k] [--kmeans_users=50000] [--key=value ...]

Measured in one process, with the real LLM on the real dataset, on every visible core:

1. **Item embeddings**: one forward pass per item text (``embed_items`` over every described item): items/s.
2. **Encoder input and E-step per user**: the feature map over every user's history, and one E-step (``uip_kmeans_iters``
   Lloyd iterations per profile) on ``--kmeans_users`` synthetic offsets of the LLM's width: seconds per user.
3. **One M-step user**: ``train_batch`` on real batches (forward and backward through the frozen LLM): seconds per
   user; a round adds the line search's fixed cost (measured too).

The table multiplies them out for the default (``uip_epochs: 0``: items, encoder inputs, one E-step) and for 3 EM
rounds, with a catalogue size per row (stated: items do not grow with users), and gives the bank's bytes per user
and per item. GPU-hours are *estimates*: the LLM's FLOPs per item and per user (2 x parameters x tokens forward, 4 x
with the backward to the input) at an assumed utilisation of an H200's bf16 peak, stated in the report.

Writes ``results/<dataset>/<settings fingerprint>/sizing.{json,md}``.
"""

from __future__ import annotations

import time
from logging import getLogger

import numpy as np
import torch

from recbole_uip.benchmarking import (
    benchmark_parser, configure, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)

ROWS = ((10_000, 10_000), (1_000_000, 100_000), (100_000_000, 1_000_000))     # (users, items in the catalogue)
GPU_PEAK_FLOPS = 790e12          # an H200's dense bf16 peak
GPU_UTILISATION = 0.10           # assumed for a 135M-parameter model on short sequences: an estimate, not measured
ROUNDS = 3


def measure(config, settings, kmeans_users: int) -> dict:
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.codebook import ProfileCodebook
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.inference.user_features import embed_items
    from recbole_uip.quick_start import check_dataset_files

    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir)
    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
    texts = histories.item_texts
    item_tokens = sum(len(llm.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)
    embed_items(llm, texts[:64], settings.item_embedding_layer, settings.item_batch_size)     # warm-up
    start = time.perf_counter()
    embed_items(llm, texts, settings.item_embedding_layer, settings.item_batch_size)
    item_seconds = (time.perf_counter() - start) / len(texts)

    trainer = ProfileInferenceTrainer(config, settings, llm, histories, BehaviourText(histories, settings, llm.tokenizer),
                                      getLogger())
    trainer.setup()
    start = time.perf_counter()
    trainer.features(np.arange(len(histories)))
    feature_seconds = (time.perf_counter() - start) / len(histories)
    trainer.assignments, _, scales = trainer.e_step(settings.kmeans_iters)

    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(kmeans_users, llm.hidden_size, generator=generator)
    start = time.perf_counter()
    for size in settings.codebook_sizes.values():
        ProfileCodebook(size, llm.hidden_size, settings.quantiser_metric, settings.quantiser_components).fit(
            offsets, settings.kmeans_iters, generator)
    kmeans_seconds = (time.perf_counter() - start) / kmeans_users

    shared_opt = torch.optim.Adam([trainer.soft.shared], lr=settings.shared_learning_rate)
    order = np.random.default_rng(0).permutation(len(histories))
    rng = np.random.default_rng(1)
    batches, tokens, seconds = 6, [], 0.0
    for b in range(batches + 1):                                   # batch 0 warms up and is not counted
        targets = trainer.targets(order[b * settings.batch_size:(b + 1) * settings.batch_size], rng)
        start = time.perf_counter()
        trainer.train_batch(targets, scales, shared_opt)
        if b:
            seconds += time.perf_counter() - start
            tokens += [len(t) + trainer.layout.prefix_length for t in targets.texts]
    m_step_seconds = seconds / (batches * settings.batch_size)
    start = time.perf_counter()
    trainer.line_search(scales)
    line_search_seconds = time.perf_counter() - start
    return {"items_measured": len(texts), "users_measured": len(histories), "kmeans_users": kmeans_users,
            "hidden_size": llm.hidden_size, "parameters": sum(p.numel() for p in llm.model.parameters()),
            "tokens_per_item": round(item_tokens, 1), "tokens_per_m_step_user": round(float(np.mean(tokens)), 1),
            "item_seconds": item_seconds, "feature_seconds_per_user": feature_seconds,
            "e_step_seconds_per_user": kmeans_seconds, "m_step_seconds_per_user": m_step_seconds,
            "line_search_seconds": line_search_seconds, "threads": torch.get_num_threads(),
            "device": str(config["device"].type),
            "profiles": len(settings.codebook_sizes), "encoder_dims": settings.encoder_dims}


def project(m: dict) -> list[dict]:
    """The cost of each row of :data:`ROWS` from the measured rates (CPU: core-hours = seconds x threads; on a GPU
    the measured hours are GPU-hours)."""
    cores = m["threads"] if m["device"] == "cpu" else 1
    bytes_user = m["profiles"] * 8 * 2 + m["encoder_dims"] * 4 + m["profiles"] * m["hidden_size"] * 4
    bytes_item = m["hidden_size"] * 4
    flops_item = 2 * m["parameters"] * m["tokens_per_item"]
    flops_user_round = 4 * m["parameters"] * m["tokens_per_m_step_user"]
    rows = []
    for users, items in ROWS:
        default_s = items * m["item_seconds"] + users * (m["feature_seconds_per_user"] + m["e_step_seconds_per_user"])
        round_s = users * (m["m_step_seconds_per_user"] + m["e_step_seconds_per_user"]) + m["line_search_seconds"]
        gpu = lambda flops: flops / (GPU_PEAK_FLOPS * GPU_UTILISATION) / 3600  # noqa: E731
        rows.append({
            "users": users, "items": items,
            "bank_gb": (users * bytes_user + items * bytes_item) / 1e9,
            "bank_ids_gb": users * m["profiles"] * 8 * 2 / 1e9,
            "llm_passes_default": items, "llm_passes_3_rounds": items + ROUNDS * users,
            "cpu_core_hours_default": default_s * cores / 3600,
            "cpu_core_hours_3_rounds": (default_s + ROUNDS * round_s) * cores / 3600,
            "gpu_hours_default_estimated": gpu(items * flops_item),
            "gpu_hours_3_rounds_estimated": gpu(items * flops_item + ROUNDS * users * flops_user_round),
        })
    return rows


def render(data: dict) -> str:
    m, record = data["measured"], data["record"]
    hours = "CPU core-hours" if m["device"] == "cpu" else "GPU-hours (measured)"
    lines = [f"# Sizing: profile inference at 10k, 1M and 100M users ({record['dataset']} rates, {record['llm']})", "",
             f"Measured here on {m['threads']} threads: an item embedding {1000 * m['item_seconds']:.2f} ms "
             f"({m['tokens_per_item']} tokens) on {m['device']}, a user's encoder input {1e6 * m['feature_seconds_per_user']:.0f} µs, "
             f"an E-step {1e6 * m['e_step_seconds_per_user']:.0f} µs per user ({m['kmeans_users']} users), an M-step "
             f"user {1000 * m['m_step_seconds_per_user']:.0f} ms ({m['tokens_per_m_step_user']} tokens, forward and "
             f"backward), the line search {m['line_search_seconds']:.0f} s per round.", "",
             "| users | items (assumed) | bank (GB) | of it IDs (GB) | LLM passes, default | LLM passes, 3 rounds | "
             f"{hours}, default | {hours}, 3 rounds | GPU-hours, default (est.) | GPU-hours, 3 rounds (est.) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['users']:,} | {r['items']:,} | {r['bank_gb']:.3g} | {r['bank_ids_gb']:.3g} | "
                     f"{r['llm_passes_default']:,} | {r['llm_passes_3_rounds']:,} | {r['cpu_core_hours_default']:.3g} | "
                     f"{r['cpu_core_hours_3_rounds']:.3g} | {r['gpu_hours_default_estimated']:.2g} | "
                     f"{r['gpu_hours_3_rounds_estimated']:.2g} |")
    lines += ["", "- **Default** (`uip_epochs: 0`): one forward pass per item; per user only the encoder input and "
              "the E-step (no LLM). **3 rounds**: plus, per round, one forward and backward pass per user, the line "
              "search and an E-step.",
              f"- **Bank**: per user the IDs and the untrained IDs (int64, {m['profiles']} profiles), `z` "
              f"({m['encoder_dims']} float32) and the offsets ({m['profiles']} x {m['hidden_size']} float32, which "
              f"dominate: rank 0 gathers them, so at 100M users a run needs the offsets left out of the bank, which "
              f"it does not do yet); per item its embedding ({m['hidden_size']} float32). The served IDs alone are "
              f"the 'of it IDs' column.",
              (f"- **CPU core-hours** = measured seconds x {m['threads']} threads" if m["device"] == "cpu" else
               "- **GPU-hours (measured)** = measured seconds on one GPU") + ", with a parallel efficiency of 1 "
              "(results/ml-100k/5802be6014de/distributed_scaling.md measures what sharding keeps).",
              f"- **GPU-hours are estimated, not measured** (no GPU was lent): FLOPs = 2 x {m['parameters'] / 1e6:.0f}M "
              f"parameters x tokens per item pass, 4 x per M-step user (forward, and backward to the inputs only: "
              f"the LLM is frozen), at {GPU_UTILISATION:.0%} of an H200's {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 "
              f"peak (an assumption for a small model on short sequences). benchmarks/device_check.sh measures it.",
              "", "## Run", "", settings_table(record)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--kmeans_users", type=int, default=50_000)
    args, overrides = parse_known_with_overrides(parser, argv)
    config, settings, _ = configure("DeepFM", args.dataset, {"show_progress": False, **overrides})
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    measured = measure(config, settings, args.kmeans_users)
    data = {"measured": measured, "rows": project(measured), "gpu_utilisation_assumed": GPU_UTILISATION,
            "record": run_record(config, settings, ["benchmarks/sizing.py", *args.argv])}
    publish_benchmark(args, "sizing", data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
