"""Command line: ``python -m recbole_uip {run,infer,assign,keys,convert} --key=value ...`` (``run_recbole_uip.py`` = ``run``)."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from recbole_uip.cli_flags import (  # noqa: F401  (UsageError, parse_*: imported from here by tests and scripts)
    UsageError, expected_errors, known_recbole_keys, parse_flags, parse_value, split_flags,
)

USAGE = """\
usage: python run_recbole_uip.py --model=MODEL --dataset=DATASET [--config_files="a.yaml b.yaml"] [--uip=true] [--key=value ...]
       python -m recbole_uip run   (same flags as run_recbole_uip.py)
       python -m recbole_uip infer --dataset=DATASET [--output_dir=DIR] [--model=DeepFM] [--config_files=...] [--key=value ...]
       python -m recbole_uip assign --bank=DIR --dataset=DATASET [--output_dir=DIR] [--refresh=true] [--key=value ...]
       python -m recbole_uip keys   (every uip_* key with its default and meaning)
       python -m recbole_uip convert FORMAT --input=PATH [--uip=true] (raw MovieLens/Amazon/Yelp to atomic files; convert --help)

run    Train and test a RecBole model, like RecBole's run_recbole.py. With --uip=true, first infer latent
       user profiles with a frozen LLM from the training split, write <uip_output_dir>/<dataset>-uip/ (the
       dataset plus uip_<profile> token columns in .user) and train on it. Without it: the plain baseline.
infer  Only write the augmented atomic files and print their folder (for dataset-conversion pipelines).
       The split that decides what counts as training data follows --model's defaults (DeepFM: random 8:1:1)
       unless eval_args is given. Sharded over processes with torchrun (gloo on CPU, nccl on GPU), the same flags:
         torchrun --standalone --nproc_per_node=N -m recbole_uip infer --dataset=...   (one node)
         torchrun --nnodes=M --node_rank=R --rdzv_endpoint=HOST:PORT --nproc_per_node=N -m recbole_uip infer ...
       Rank 0 writes the output, once.
assign Give IDs from an existing feature bank (a <dataset>-uip/bank folder) to the users of DATASET that the
       bank does not hold, from all their interactions in DATASET's files, with the bank's encoder and
       codebooks: no training. --refresh=true re-assigns every user of DATASET (behaviour that changed). Writes
       <output_dir>/<DATASET>-uip/ like infer and prints it. Items the bank never embedded are embedded by the
       bank's own LLM (loaded only then); items without text are left out.

flags  --model, --dataset, --config_files (space-separated YAML files), --output_dir (= uip_output_dir) and
       any RecBole or uip_* key as --key=value (values are YAML: 3, 1e-3, true, [a, b], "{RS: [0.8,0.1,0.1]}").
       uip_* keys and their defaults: python -m recbole_uip keys. Common ones:
         --uip=true                    infer profiles and use them
         --uip_llm=NAME_OR_PATH        any Hugging Face causal LM (default: bundled SmolLM2-135M-Instruct)
         --uip_profiles="{hobby: 'Hobbies:', job: 'Job:'}"   profile names and phrases
         --uip_codebook_size=8         IDs per profile
         --uip_epochs=3                EM rounds of prompt tuning (default 0: the untrained encoder's IDs)
         --uip_output_dir=dataset      where <dataset>-uip/ is written
         --nproc=N                     (run) RecBole's multi-process training on N GPUs; profiles are inferred
                                       once, before it starts (RecBole 1.2.1's DDP needs CUDA and NCCL)
"""

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = (argv[0], argv[1:]) if not argv[0].startswith("--") else ("run", argv)
    if command == "keys":
        from recbole_uip.config import DEFAULTS_FILE

        print(DEFAULTS_FILE.read_text(encoding="utf-8"), end="")
        return 0
    if command == "convert":
        from recbole_uip.convert.cli import main as convert_main

        return convert_main(rest)
    if command not in ("run", "infer", "assign"):
        print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(USAGE)
        return 0
    try:
        own, config_dict = split_flags(parse_flags(rest))
        if "output_dir" in own:
            config_dict["uip_output_dir"] = own["output_dir"]
        if "dataset" not in own:
            raise UsageError("--dataset is required")
        if command == "run" and "model" not in own:
            raise UsageError("--model is required")
        if command == "assign" and "bank" not in own:
            raise UsageError("--bank is required: the bank folder of an earlier run, e.g. dataset/ml-100k-uip/bank")
        if command != "assign" and ({"bank", "refresh"} & set(own)):
            raise UsageError(f"--bank and --refresh belong to the assign command, not {command}")
        files = own.get("config_files", "").split() or None
        from recbole_uip.inference.distributed import launched_ranks

        if launched_ranks() > 1 and command != "infer":
            raise UsageError(f"under torchrun, launch the sharded profile inference: torchrun --nproc_per_node=N -m "
                             f"recbole_uip infer ...; {command} runs in one process (RecBole's own multi-process "
                             f"training: run --nproc=N)")
        if command == "assign":
            return _assign(own["dataset"], own["bank"], parse_value(own.get("refresh", "false")) is True, files,
                           config_dict)
        return _run(command, own.get("model", "DeepFM"), own["dataset"], files, config_dict)
    except expected_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        if isinstance(error, UsageError):
            print("(run with --help for usage)", file=sys.stderr)
        return 2


def _run(command: str, model: str, dataset: str, files, config_dict: dict[str, Any]) -> int:
    from recbole_uip.inference import distributed
    from recbole_uip.quick_start import build_config, infer_profiles, run_recbole_uip

    if command == "run":
        result = run_recbole_uip(model, dataset, files, config_dict)
        print(f"test result: {dict(result['test_result'])}")
        if result["uip_dataset"]:
            print(f"profile columns {result['uip_fields']} from {result['uip_dataset']}")
        return 0
    from logging import getLogger

    from recbole.utils import init_logger

    config = build_config(model, dataset, files, config_dict)
    comm, device = distributed.init_from_environment(config["device"])
    try:
        config["device"] = device
        if not comm.is_main:            # one log and one progress bar: rank 0's
            config["show_progress"], config["state"] = False, "warning"
        # rank 0 first: RecBole's init_logger creates ./log/ unguarded, so two ranks at once can fail on it
        comm.phase = "setting up the logs"
        comm.on_main(lambda: init_logger(config))
        if not comm.is_main:
            init_logger(config)
        target = infer_profiles(config, comm=comm)
        if comm.is_main:
            getLogger().info(f"Augmented dataset: {target}")
            print(target)
    finally:
        distributed.shutdown()
    return 0


def _assign(dataset: str, bank: str, refresh: bool, files, config_dict: dict[str, Any]) -> int:
    from recbole.utils import init_logger

    from recbole_uip.recbole_config import build_config
    from recbole_uip.serving import assign_dataset

    config = build_config("DeepFM", dataset, files, config_dict)
    init_logger(config)
    print(assign_dataset(config, bank, refresh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
