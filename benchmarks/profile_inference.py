"""Profile inference cost on a real dataset with the real LLM: wall time, tokens/s, peak memory, threads.

    python benchmarks/profile_inference.py --dataset=ml-100k --threads=2 [--key=value ...]

Two measurements, in one process:
1. Side by side, on identical batches: one M-step batch of our trainer (soft tokens placed, block mask, loss
   and optimiser steps) against the bare frozen LLM's forward+backward on the same token ids (gradient to the
   input embeddings only, causal mask). Alternated batch by batch, so machine noise hits both alike; the ratio
   is what "throughput close to the bare LLM's" is measured by.
2. The whole preprocessing step (`infer_profiles`, bank recomputed) with its phases timed.

Writes results/profile_inference_<dataset>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from logging import getLogger
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recbole_uip.__main__ import parse_value  # noqa: E402
from recbole_uip.bank import FeatureBank  # noqa: E402
from recbole_uip.config import UIPSettings  # noqa: E402
from recbole_uip.data.behaviour import build_behaviour_corpus  # noqa: E402
from recbole_uip.inference.llm import load_frozen_llm  # noqa: E402
from recbole_uip.inference.prompt import collate  # noqa: E402
from recbole_uip.inference.trainer import ProfileInferenceTrainer  # noqa: E402
from recbole_uip.quick_start import build_config, infer_profiles  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def side_by_side(config, settings, logger, batches: int) -> dict:
    """Our M-step batch vs the bare frozen LLM forward+backward, alternated on the same batches."""
    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir)
    corpus = build_behaviour_corpus(config, settings, llm.tokenizer)
    trainer = ProfileInferenceTrainer(config, settings, llm, corpus, logger)
    # Set-up as in fit(), without the full summary pass: random summaries are enough to time a batch.
    from recbole_uip.inference.soft_profiles import SoftProfiles

    trainer.soft = SoftProfiles(trainer._anchors(), torch.randn(len(corpus), llm.hidden_size), 1.0, trainer.generator)
    encoder_opt, residual_opt = trainer.build_optimisers()
    trainer.assignments, _, scales = trainer.e_step(settings.kmeans_iters)
    model, pad = llm.model, llm.tokenizer.pad_token_id
    embedding = model.get_input_embeddings()
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(0))
    ours, bare, tokens = [], [], []
    for b in range(batches + 1):                        # batch 0 warms both paths up and is not counted
        users = order[b * settings.batch_size:(b + 1) * settings.batch_size]
        batch = collate(trainer.layout, [corpus.token_ids[u] for u in users.tolist()], pad)
        t0 = time.perf_counter()
        trainer.train_batch(users, scales, encoder_opt, residual_opt)   # exactly the M-step's batch update
        t1 = time.perf_counter()
        embeds = embedding(batch.input_ids).detach().requires_grad_(True)
        valid = (batch.input_ids != pad).long()
        valid[:, : trainer.layout.prefix_length] = 1
        logits = model(inputs_embeds=embeds, attention_mask=valid, use_cache=False).logits
        bare_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                      batch.labels[:, 1:].reshape(-1), ignore_index=-100)
        bare_loss.backward()
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="DeepFM")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12, help="batches in the side-by-side comparison")
    parser.add_argument("--skip_full", action="store_true", help="only the side-by-side comparison")
    args, rest = parser.parse_known_args(argv)
    overrides = {k.lstrip("-"): parse_value(v) for k, _, v in (r.partition("=") for r in rest)}
    torch.set_num_threads(args.threads)
    overrides.update(uip_num_threads=args.threads, show_progress=False)
    overrides.setdefault("uip_diagnostics", True)

    from recbole.utils import init_logger

    config = build_config(args.model, args.dataset, None, {**overrides, "uip": True, "uip_reuse": False})
    init_logger(config)
    logger = getLogger()
    settings = UIPSettings.from_config(config)
    report = {
        "dataset": args.dataset, "llm": settings.llm, "dtype": settings.llm_dtype, "threads": args.threads,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "profiles": settings.profile_names, "uip_epochs": settings.epochs, "batch_size": settings.batch_size,
        "max_behaviour_tokens": settings.max_behaviour_tokens,
    }
    report["side_by_side"] = side_by_side(config, settings, logger, args.batches)
    logger.info(f"side by side: {report['side_by_side']}")
    if not args.skip_full:
        start = time.perf_counter()
        target = infer_profiles(config, settings)
        wall = time.perf_counter() - start
        bank = FeatureBank.load(target / "bank")
        tokens = bank.metadata["tokens_per_pass"]
        report["full"] = {
            "wall_seconds": round(wall, 1), "users": len(bank.users), "behaviour_tokens_per_pass": tokens,
            "rounds": bank.metadata["history"],
            "peak_rss_gib": round(peak_rss_gib(), 2),
            "diagnostics_nll": {k: float(np.mean(v)) for k, v in bank.metadata["convergence"].items() if k.startswith("nll_")
                                and k not in ("nll_first_round", "nll_last_round")},
        }
    previous = RESULTS / f"profile_inference_{args.dataset}.json"
    if args.skip_full and previous.is_file() and "full" in (earlier := json.loads(previous.read_text())):
        report["full"] = earlier["full"]  # the whole-step measurement of an earlier run, kept as it was
    report["peak_rss_gib"] = round(peak_rss_gib(), 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"profile_inference_{args.dataset}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render(report)
    (RESULTS / f"profile_inference_{args.dataset}.md").write_text(md)
    print(md)
    return 0


def render(r: dict) -> str:
    s = r["side_by_side"]
    lines = [f"# Profile inference cost ({r['dataset']})", "",
             f"LLM `{r['llm']}` (dtype setting `{r['dtype']}`), torch {r['torch']}, {r['threads']} threads "
             f"(`torch.set_num_threads`), CPU `{r['cpu']}`; profiles {r['profiles']}, batch {r['batch_size']} users, "
             f"behaviour budget {r['max_behaviour_tokens']} tokens, {r['uip_epochs']} EM rounds.", "",
             "## One M-step batch vs the bare frozen LLM (same batches, alternated)", "",
             "| path | s / batch | tokens / s |", "|---|---|---|",
             f"| bare frozen LLM forward+backward (causal mask) | {s['bare_llm_seconds_per_batch']:.3f} | {s['bare_tokens_per_s']:.0f} |",
             f"| recbole-uip M-step (soft tokens, block mask, loss, optimisers) | {s['ours_seconds_per_batch']:.3f} | {s['ours_tokens_per_s']:.0f} |",
             "", f"Ratio ours / bare: **{s['ratio_ours_over_bare']:.2f}** over {s['batches']} batches of "
             f"{s['tokens_per_batch_mean']:.0f} tokens (padded)."]
    if "full" in r:
        f = r["full"]
        rounds = f["rounds"]
        summary_s = rounds[0]["seconds"]
        em_s = rounds[-1]["seconds"] - summary_s
        lines += ["", "## The whole preprocessing step", "",
                  f"{f['users']} users, {f['behaviour_tokens_per_pass']} behaviour tokens per pass. Wall time "
                  f"**{f['wall_seconds']:.0f} s** in all (LLM load, behaviour text, summary pass, EM, diagnostics, files); "
                  f"peak RSS {f['peak_rss_gib']} GiB.", "",
                  f"- summary pass (forward only) and first E-step: {summary_s:.0f} s",
                  f"- {r['uip_epochs']} EM rounds: {em_s:.0f} s, i.e. "
                  f"{f['behaviour_tokens_per_pass'] * r['uip_epochs'] / em_s:.0f} behaviour tokens/s through the M-steps "
                  "(each batch also carries the template tokens of every user)",
                  f"- diagnostics (4 forward-only passes, off by default) and writing the files: "
                  f"{f['wall_seconds'] - rounds[-1]['seconds']:.0f} s", "",
                  "| round | seconds since start | mean NLL during the M-step |", "|---|---|---|"]
        for h in f["rounds"]:
            nll = f"{h['nll']:.4f}" if "nll" in h else ""
            lines.append(f"| {h['round']} | {h['seconds']} | {nll} |")
        if f.get("diagnostics_nll"):
            d = f["diagnostics_nll"]
            weighted = any(k.startswith("nll_weighted_") for k in d)
            lines += ["", "Do the soft tokens carry user information? Mean behaviour NLL (nats/token) after EM, forward only "
                      "(these four passes are included in the wall time above)"
                      + ("; the rating-weighted NLL is the M-step's objective (`uip_rating_weight`)" if weighted else "")
                      + ":", "",
                      "| soft tokens | NLL |" + (" rating-weighted NLL |" if weighted else ""),
                      "|---|---|" + ("---|" if weighted else "")]
            names = {"current": "each user's own", "shuffled": "another user's (shuffled)",
                     "mean": "the mean token (no user information)", "code": "each user's assigned codes"}
            for mode, name in names.items():
                if f"nll_{mode}" in d:
                    extra = f" {d[f'nll_weighted_{mode}']:.4f} |" if weighted else ""
                    lines.append(f"| {name} | {d[f'nll_{mode}']:.4f} |{extra}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:  # re-render the Markdown from a JSON result
        print(render(json.loads(Path(sys.argv[2]).read_text())))
        sys.exit(0)
    sys.exit(main())
