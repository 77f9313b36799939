"""The pipeline: infer (or reuse) profiles, write the augmented atomic files, run RecBole on them.

This module holds the pipeline (:func:`infer_profiles`) and the RecBole run (:func:`run_recbole_uip`,
:func:`run_recbole_with_config`, RecBole's multi-process mode). What it builds on lives in one module a job:
:mod:`recbole_uip.recbole_config` (the ``Config``, the dataset checks), :mod:`recbole_uip.bank_store` (the
fingerprint, the store of computed banks), :mod:`recbole_uip.augmented` (the augmented copy and its ``Config``).
Their public names are importable from here too.

``run_recbole_uip`` mirrors ``recbole.quick_start.run_recbole``; with ``uip=True`` it first runs the
preprocessing step :func:`infer_profiles`, then trains and evaluates on ``<uip_output_dir>/<dataset>-uip``,
a copy of the dataset whose ``.user`` file has one extra ``uip_<profile>`` token column per profile.
"""

from __future__ import annotations

import contextlib
import time
from logging import getLogger
from pathlib import Path

import numpy as np

from recbole_uip.augmented import (  # noqa: F401  (re-exported for callers of the pipeline module)
    AUGMENTED_SUFFIX, augmented_config, augmented_config_args, augmented_dir, write_augmented_dataset,
)
from recbole_uip.bank import BankError, FeatureBank
from recbole_uip.bank_store import (  # noqa: F401  (re-exported for callers of the pipeline module)
    _reusable, _stored_bank, bank_store, compute_fingerprint,
)
from recbole_uip.compat import patch_recbole_checkpoint_loading, resolve_model_class
from recbole_uip.config import UIPConfigError, UIPSettings
from recbole_uip.data.atomic import check_writable
from recbole_uip.model.fusion import check_model_supports_profiles, model_class_for_run
from recbole_uip.recbole_config import (  # noqa: F401  (re-exported: build_config, check_dataset_files, ...)
    DatasetNotFoundError, _make_config, build_config, check_dataset_files,
)


def infer_profiles(config, settings: UIPSettings | None = None, comm=None) -> Path:
    """The preprocessing step: infer (or reuse) the feature bank and write ``<output_dir>/<dataset>-uip``.

    Returns the folder of the augmented dataset. It is published in one rename with a manifest, so a run
    killed mid-way leaves either the previous complete folder or none, never a partial one.

    ``comm`` (default: the process group joined under ``torchrun``, else one process): every rank checks the
    inputs and takes part in the inference; rank 0 alone holds the output folder's lock, decides whether a bank can
    be reused, and writes the bank and the atomic files, once. The other ranks return when it has published.
    """
    from recbole_uip.data.behaviour import check_text_values, resolve_text_fields
    from recbole_uip.inference import distributed
    from recbole_uip.inference.llm import check_llm_source
    from recbole_uip.locking import output_lock

    comm = comm or distributed.current()
    logger = getLogger()
    settings = settings or UIPSettings.from_config(config)
    if getattr(config, "uip_preset_note", ""):
        logger.info(f"UIP: {config.uip_preset_note}.")
    files = check_dataset_files(config)
    # Everything that can be checked without the LLM, before it loads: the text's fields and their values.
    fields = resolve_text_fields(config, settings, files)
    check_text_values(files, fields, config["field_separator"], config["encoding"])
    check_llm_source(settings.llm)
    target = augmented_dir(config, settings)
    check_writable(target.parent)
    with contextlib.ExitStack() as held:
        def lock() -> None:
            held.enter_context(output_lock(target.parent, target.name, settings.lock_timeout))

        comm.phase = "taking the output folder's lock"
        comm.on_main(lock)
        return _infer_unlocked(config, settings, files, fields, target, logger, comm)


def _infer_unlocked(config, settings: UIPSettings, files: dict[str, Path], fields, target: Path, logger, comm) -> Path:
    """:func:`infer_profiles` once its inputs are checked and the output folder's lock is held (by rank 0)."""
    from recbole_uip.data.behaviour import collect_training_histories
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.checkpoint import InferenceCheckpoint
    from recbole_uip.inference.llm import BUNDLED_LLM, convert_bundled_model, load_frozen_llm, model_identity
    from recbole_uip.inference.trainer import ProfileInferenceTrainer

    previous = None
    if settings.align_to is not None:
        try:
            previous = FeatureBank.load(settings.align_to)
        except BankError as error:
            raise BankError(f"uip_align_to: {error}") from error

    if settings.llm == BUNDLED_LLM:
        comm.phase = "converting the bundled LLM"
        comm.on_main(lambda: convert_bundled_model(settings.llm_cache_dir, logger))   # once, then cached for all
        llm_folder = convert_bundled_model(settings.llm_cache_dir, logger)
    else:
        llm_folder = Path(settings.llm).expanduser()
    identity = model_identity(llm_folder) if llm_folder.is_dir() else settings.llm
    fingerprint, inputs = compute_fingerprint(config, settings, files, identity, fields.as_dict(),
                                              None if previous is None else previous.fingerprint, comm.world_size)
    stored = bank_store(settings, config["dataset"]) / fingerprint[:16]
    rank_part = f".rank{comm.rank}of{comm.world_size}" if comm.distributed else ""
    checkpoint = InferenceCheckpoint(settings.output_dir / ".uip_checkpoints" / config["dataset"]
                                     / f"{fingerprint[:16]}{rank_part}.pt", fingerprint)
    if settings.reuse:
        comm.phase = "looking for a bank to reuse"
        reused = comm.on_main(lambda: _reuse(config, settings, files, target, stored, fingerprint, logger))
        if reused:
            checkpoint.remove()              # a run killed after publishing or saving the bank may have left one
            return target

    start = time.perf_counter()
    histories = collect_training_histories(config, settings, fields, logger)
    largest = max(settings.codebook_sizes.values())
    if len(histories) < largest:
        raise UIPConfigError(f"uip_codebook_size: a codebook of {largest} IDs needs at least {largest} users with "
                             f"training history; the dataset has {len(histories)}. Lower uip_codebook_size.")
    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir, logger, identity)
    text = BehaviourText(histories, settings, llm.tokenizer, logger)
    trainer = ProfileInferenceTrainer(config, settings, llm, histories, text, logger, comm)
    trainer.checkpoint = checkpoint
    result = trainer.fit()
    seconds = time.perf_counter() - start
    comm.phase = "rank 0's writing of the bank and the atomic files"
    comm.on_main(lambda: _publish(config, settings, files, result, fingerprint, inputs, previous, stored, target,
                                  seconds, text, histories, logger))
    checkpoint.remove()                      # the bank is complete: a rerun reuses it
    return target


def _reuse(config, settings: UIPSettings, files: dict[str, Path], target: Path, stored: Path, fingerprint: str,
           logger) -> bool:
    """Publish a bank computed earlier for these inputs, if there is one; whether it did."""
    bank = _reusable(target, fingerprint)
    if bank is not None:
        logger.info(f"UIP: reusing the feature bank in {target} (fingerprint {fingerprint[:12]}).")
        return True
    bank = _stored_bank(stored, fingerprint)
    if bank is not None:  # computed earlier for these inputs (e.g. before a run on another split)
        write_augmented_dataset(config, settings, files, bank, target)
        logger.info(f"UIP: reusing the stored feature bank {stored}; augmented dataset written to {target}.")
        return True
    return False


def _publish(config, settings: UIPSettings, files, result, fingerprint: str, inputs: dict, previous, stored: Path,
             target: Path, seconds: float, text, histories, logger) -> None:
    """Save the bank of ``result`` and write the augmented atomic files (rank 0's part of the inference)."""
    from recbole_uip.bank import EncoderState

    encoder = None
    if result.encoder is not None:
        encoder = EncoderState(anchors=result.anchors, shared=result.shared, weights=result.encoder,
                               feature_map=result.feature_map, item_ids=result.item_ids,
                               item_embeddings=result.item_embeddings)
    bank = FeatureBank(
        fingerprint=fingerprint,
        profiles=settings.profile_names,
        users=result.users,
        codes=result.codes,
        codebooks=result.codebooks,
        no_history_token=settings.no_history_token,
        initial_codes=result.initial_codes,
        random_step_codes=result.random_step_codes,
        summaries=result.summaries,
        offsets=result.offsets,
        projections=result.projections,
        encoder=encoder,
        metadata={
            "inputs": inputs,
            "history": result.history,
            "seconds": round(seconds, 1),
            "history_tokens": text.num_tokens,
            "users_without_history": len(histories.users_without_history),
            "convergence": {k: _json_array(v) for k, v in result.per_user.items()},
        },
    )
    if previous is not None:
        from recbole_uip.serving import align_codes

        bank, kept = align_codes(bank, previous)
        logger.info("UIP: code numbers aligned to the bank " + previous.fingerprint[:12] + ": users keeping their ID "
                    + ", ".join(f"{name} {share:.1%}" for name, share in kept.items()) + ".")
    bank.save(stored)
    write_augmented_dataset(config, settings, files, bank, target)
    logger.info(f"UIP: profiles inferred in {seconds:.0f}s; augmented dataset written to {target}, bank kept in {stored}.")


def _json_array(values: np.ndarray) -> list:
    """An array as JSON lists, NaN (e.g. a user no M-step visited) as null."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return np.where(np.isnan(values), None, values.astype(object)).tolist()
    return values.tolist()


def run_recbole_uip(model, dataset: str, config_file_list=None, config_dict=None, saved: bool = True) -> dict:
    """Train and test a RecBole model, with profiles when ``uip`` is true (the baseline otherwise).

    Args:
        model: a RecBole model name (``"DeepFM"``) or class.
        dataset: dataset name; its files are looked up as RecBole does (``data_path``).
        config_file_list: YAML files, as for RecBole.
        config_dict: keys overriding everything, as for RecBole (``{"uip": True, "epochs": 5}``).
        saved: keep RecBole's best checkpoint and evaluate it on the test set.

    Returns:
        RecBole's result dict plus ``uip_dataset`` (the augmented folder, or None) and ``uip_fields``.
    """
    from recbole.utils import init_logger, init_seed

    config = build_config(model, dataset, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    settings = UIPSettings.from_config(config)
    processes = training_processes(config)     # RecBole's --nproc: checked before the (long) inference
    target = None
    args = (config["model"], config["dataset"], config_file_list, dict(config_dict or {}))
    if settings.enabled:
        check_model_supports_profiles(config)  # before the (long) inference, never a silent no-op
        target = infer_profiles(config, settings)  # validates the dataset's files before any work
        args = augmented_config_args(config, settings, target, config_file_list, config_dict)
        config = build_config(*args) if processes == 1 else config
    else:
        check_dataset_files(config)
        logger.info("UIP is off (uip=False): plain RecBole run, no profile columns.")
    if processes > 1:
        result = spawn_training(config, args, processes, saved)
    else:
        result = run_recbole_with_config(config, saved)
    result["uip_dataset"] = str(target) if target else None
    result["uip_fields"] = settings.field_names if target else []
    return result


def training_processes(config) -> int:
    """How many processes RecBole's multi-process mode trains with (``nproc``; 1: this process alone).

    Raises:
        UIPConfigError: ``nproc`` > 1 where RecBole 1.2.1 cannot run it. Its DDP path calls
            ``init_process_group(backend="nccl")`` and takes one GPU per process (``gpu_id`` lists them), so it
            needs as many CUDA GPUs as processes; we say so before any inference rather than after it.
    """
    import torch

    nproc = int(config["nproc"] or 1) if "nproc" in config else 1
    if nproc <= 1:
        return 1
    gpus = [g for g in str(config["gpu_id"]).split(",") if g.strip()]
    if not torch.cuda.is_available() or len(gpus) < nproc:
        found = f"{torch.cuda.device_count()} CUDA GPUs visible" if torch.cuda.is_available() else "no CUDA GPU"
        raise UIPConfigError(
            f"nproc={nproc}: RecBole 1.2.1 trains with several processes only on CUDA GPUs, one per process (its DDP "
            f"uses NCCL), and gpu_id must list {nproc} of them (gpu_id={config['gpu_id']!r}; {found}). On CPU, "
            f"train with nproc=1; the profile inference itself can be sharded over CPU processes with "
            f"torchrun --nproc_per_node=N -m recbole_uip infer ... (gloo).")
    return nproc


def spawn_training(config, args: tuple, processes: int, saved: bool = True) -> dict:
    """Train ``args`` (``(model, dataset, config_file_list, config_dict)``, the augmented copy with profiles) in
    RecBole's multi-process mode: ``processes`` workers, as RecBole's ``run(nproc=...)`` starts them. The profiles
    were inferred once, in this process, before; the workers only read the augmented files. Returns rank 0's
    result."""
    import torch.multiprocessing as mp

    model, dataset, config_file_list, config_dict = args
    # RecBole joins its NCCL group as a Config is built: a worker builds one, from the files resolved here
    config_file_list = build_config(model, dataset, config_file_list, config_dict).uip_config_files
    config_dict = {**config_dict, "nproc": processes,
                   "world_size": config["world_size"] if (config["world_size"] or 0) > 0 else processes,
                   "ip": config["ip"] or "localhost", "port": str(config["port"] or 5678), "offset": config["offset"] or 0}
    queue = mp.get_context("spawn").SimpleQueue()
    getLogger().info(f"Training in RecBole's multi-process mode: {processes} processes on {dataset}.")
    mp.spawn(train_rank, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=processes, join=True)
    if queue.empty():
        raise RuntimeError("RecBole's multi-process training ended without a result from rank 0.")
    return queue.get()


def train_rank(rank: int, model, dataset: str, config_file_list, config_dict: dict, saved: bool, queue) -> None:
    """One worker of :func:`spawn_training`: RecBole builds the config once (joining its NCCL group) from the
    resolved ``config_file_list`` (presets included), and trains."""
    from recbole.utils import init_logger

    model_class = resolve_model_class(model) if isinstance(model, str) else model
    config_dict = {**config_dict, "local_rank": rank}
    config = _make_config(model_class, dataset, list(config_file_list), config_dict, [])
    init_logger(config)
    result = run_recbole_with_config(config, saved)
    if config["local_rank"] == 0:
        queue.put(result)


def run_recbole_with_config(config, saved: bool = True, model_seed: int | None = None, after_test=None) -> dict:
    """RecBole's ``run_recbole`` body for an already built ``Config`` (so the model class may be external).

    ``model_seed`` (default: ``config['seed']``, as RecBole) seeds the model's initialisation and dropout, after
    the split: benchmarks vary it over repeats while the split, and the profiles learned from its training part,
    stay fixed. The batch order does not follow it: RecBole 1.2.1's dataloaders shuffle with their own generator,
    seeded with ``config['seed']``. ``after_test(model, test_data)``, where given, runs on the tested (best) model and
    its result is returned as ``after_test`` (e.g. :func:`recbole_uip.ctr_runs.group_metrics`).
    """
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_seed, set_color

    patch_recbole_checkpoint_loading()
    logger = getLogger()
    init_seed(config["seed"], config["reproducibility"])
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    seed = config["seed"] if model_seed is None else model_seed
    init_seed(seed + config["local_rank"], config["reproducibility"])
    model_class = model_class_for_run(config)  # the profile-fused subclass where the model needs one
    model = model_class(config, train_data._dataset).to(config["device"])
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "model": config["model"],
        "dataset": config["dataset"],
        "saved_model_file": trainer.saved_model_file if saved else None,
        "epochs_trained": len(trainer.train_loss_dict),   # best epoch + stopping_step + 1 when stopped early
        "after_test": None if after_test is None else after_test(trainer.model, test_data),
    }


def load_data_and_model(model_file: str | Path):
    """RecBole's ``load_data_and_model`` for checkpoints of any run of ``run_recbole_uip``.

    A profile-fused model's checkpoint holds the profile tables (and the users' profile IDs) beside the model's
    own weights, so it must be rebuilt as the same fused class before its state is loaded; RecBole's version
    would build the plain model and fail on the extra keys.

    Returns:
        ``(config, model, dataset, train_data, valid_data, test_data)``, as RecBole's.
    """
    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_logger, init_seed

    checkpoint = torch.load(model_file, weights_only=False)  # a RecBole checkpoint: holds a pickled Config
    config = checkpoint["config"]
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = model_class_for_run(config)(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
