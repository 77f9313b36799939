"""Profile inference cost on a real dataset with the real LLM: where the time goes, against the bare frozen LLM.

    python benchmarks/profile_inference.py --dataset=ml-100k [--batches=12] [--key=value ...]

Two measurements, in one process:

1. Side by side, on identical batches: one M-step batch of the trainer (targets drawn, encoder read, soft tokens
   placed, block mask, loss, backward, steps) against the bare frozen LLM's forward+backward on the same token ids
   (gradient to the input embeddings only, causal mask). Alternated batch by batch, so machine noise hits both
   alike; the ratio is the trainer's overhead over the LLM work it cannot avoid.
2. The whole preprocessing step (``infer_profiles``, bank recomputed) with its phases from the inference log, and
   the process's peak RSS.

Writes ``results/<dataset>/<settings fingerprint>/profile_inference.{json,md}``.
"""

from __future__ import annotations

import resource
import time
from logging import getLogger

import numpy as np
import torch

from recbole_uip.benchmarking import (
    benchmark_parser, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def side_by_side(config, settings, logger, batches: int) -> dict:
    """Our M-step batch against the bare frozen LLM forward+backward, alternated on the same batches."""
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.quick_start import check_dataset_files

    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir)
    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
    trainer = ProfileInferenceTrainer(config, settings, llm, histories, BehaviourText(histories, settings, llm.tokenizer), logger)
    trainer.setup()
    trainer.assignments, _, scales = trainer.e_step(settings.kmeans_iters)
    shared_opt = torch.optim.Adam([trainer.soft.shared], lr=settings.shared_learning_rate)
    model = llm.model
    embedding = model.get_input_embeddings()
    order = np.random.default_rng(0).permutation(len(histories))
    rng = np.random.default_rng(1)
    ours, bare, tokens = [], [], []
    for b in range(batches + 1):                        # batch 0 warms both paths up and is not counted
        targets = trainer.targets(order[b * settings.batch_size:(b + 1) * settings.batch_size], rng)
        batch = trainer.prompt_batch(targets)
        t0 = time.perf_counter()
        trainer.train_batch(targets, scales, shared_opt)  # exactly the M-step's batch update
        t1 = time.perf_counter()
        embeds = embedding(batch.input_ids).detach().requires_grad_(True)
        valid = (batch.labels != -100).long()
        valid[:, : trainer.layout.prefix_length] = 1
        logits = model(inputs_embeds=embeds, attention_mask=valid, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 batch.labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        t2 = time.perf_counter()
        if b > 0:
            ours.append(t1 - t0)
            bare.append(t2 - t1)
            tokens.append(int(batch.input_ids.numel()))
    ours, bare = np.array(ours), np.array(bare)
    return {
        "batches": batches, "batch_size": settings.batch_size, "tokens_per_batch_mean": float(np.mean(tokens)),
        "ours_seconds_per_batch": float(ours.mean()), "bare_llm_seconds_per_batch": float(bare.mean()),
        "ours_tokens_per_s": float(np.sum(tokens) / ours.sum()), "bare_tokens_per_s": float(np.sum(tokens) / bare.sum()),
        "ratio_ours_over_bare": float(ours.sum() / bare.sum()),
    }


def main(argv=None) -> int:
    from recbole.utils import init_logger

    from recbole_uip.bank import FeatureBank
    from recbole_uip.config import UIPSettings
    from recbole_uip.quick_start import build_config, infer_profiles

    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM")
    parser.add_argument("--batches", type=int, default=12, help="batches in the side-by-side comparison")
    parser.add_argument("--skip_full", action="store_true", help="only the side-by-side comparison")
    parser.add_argument("--output_dir", default=None, help="uip_output_dir of the full run (default: a temporary one)")
    args, overrides = parse_known_with_overrides(parser, argv)
    overrides.setdefault("show_progress", False)
    import tempfile

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="uip-cost-")
    config = build_config(args.model, args.dataset, None, {**overrides, "uip": True, "uip_reuse": False,
                                                          "uip_output_dir": output_dir})
    init_logger(config)
    logger = getLogger()
    settings = UIPSettings.from_config(config)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    report = {"side_by_side": side_by_side(config, settings, logger, args.batches)}
    logger.info(f"side by side: {report['side_by_side']}")
    if not args.skip_full:
        start = time.perf_counter()
        target = infer_profiles(config, settings)
        wall = time.perf_counter() - start
        bank = FeatureBank.load(target / "bank")
        report["full"] = {"wall_seconds": round(wall, 1), "inference_seconds": bank.metadata["seconds"],
                          "users": len(bank.users), "history_tokens": bank.metadata["history_tokens"],
                          "rounds": bank.metadata["history"], "peak_rss_gib": round(peak_rss_gib(), 2)}
    report["peak_rss_gib"] = round(peak_rss_gib(), 2)
    report["record"] = run_record(config, settings, ["benchmarks/profile_inference.py", *args.argv])
    publish_benchmark(args, "profile_inference", report, render(report))
    return 0


def render(r: dict) -> str:
    s = r["side_by_side"]
    lines = [f"# Profile inference cost ({r['record']['dataset']})", "",
             "## One M-step batch against the bare frozen LLM (same batches, alternated)", "",
             "| path | s / batch | tokens / s |", "|---|---|---|",
             f"| bare frozen LLM forward+backward (causal mask) | {s['bare_llm_seconds_per_batch']:.3f} | {s['bare_tokens_per_s']:.0f} |",
             f"| recbole-uip M-step batch | {s['ours_seconds_per_batch']:.3f} | {s['ours_tokens_per_s']:.0f} |",
             "", f"Ratio ours / bare: **{s['ratio_ours_over_bare']:.2f}** over {s['batches']} batches of "
             f"{s['batch_size']} users, {s['tokens_per_batch_mean']:.0f} tokens (padded)."]
    if "full" in r:
        f = r["full"]
        rounds = f["rounds"]
        lines += ["", "## The whole preprocessing step", "",
                  f"{f['users']} users ({f['history_tokens']} tokens of training history in all). Wall time "
                  f"**{f['wall_seconds']:.0f} s** (inference {f['inference_seconds']:.0f} s: histories, LLM load, item "
                  f"embeddings, EM; then the files); peak RSS {f['peak_rss_gib']} GiB.", "",
                  "| round | seconds since the EM loop started | M-step NLL | encoder step (validation NLL gain) |",
                  "|---|---|---|---|"]
        for h in rounds:
            nll = f"{h['nll']:.4f}" if "nll" in h else ""
            search = h.get("line_search")
            step = f"{search['step']:g} ({search.get('nll_gain', 0):+.4f})" if search else ""
            lines.append(f"| {h['round']} | {h['seconds']} | {nll} | {step} |")
    lines += ["", "## Run", "", settings_table(r["record"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
