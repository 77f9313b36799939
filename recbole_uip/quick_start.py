"""The pipeline: infer (or reuse) profiles, write the augmented atomic files, run RecBole on them.

``run_recbole_uip`` mirrors ``recbole.quick_start.run_recbole``; with ``uip=True`` it first runs the
preprocessing step :func:`infer_profiles`, then trains and evaluates on ``<uip_output_dir>/<dataset>-uip``,
a copy of the dataset whose ``.user`` file has one extra ``uip_<profile>`` token column per profile.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from logging import getLogger
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from recbole_uip.bank import BankError, FeatureBank
from recbole_uip.compat import patch_recbole_checkpoint_loading, resolve_model_class
from recbole_uip.config import UIPConfigError, UIPSettings, check_uip_keys, choose_preset, default_config_files
from recbole_uip.data.atomic import (
    MANIFEST_NAME, AtomicFileError, check_writable, dataset_files, iter_numbered_rows, iter_rows, publish_directory,
    read_atomic, read_header, validate_atomic, write_user_file,
)
from recbole_uip.model.fusion import check_model_supports_profiles, model_class_for_run
from recbole_uip.utils import sha256_file, sha256_json, write_json_atomic

AUGMENTED_SUFFIX = "-uip"
# Keys whose value differs between a dataset and its renamed copy only because of the name.
_NAME_DEPENDENT_KEYS = {"dataset", "data_path"}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's atomic files are not where RecBole will look for them."""


@contextlib.contextmanager
def _no_command_line() -> Iterator[None]:
    """RecBole's ``Config`` parses ``sys.argv`` itself; our entry points parse it first and pass values as
    ``config_dict``, so RecBole must not read (and warn about) the same flags again."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def build_config(model, dataset: str, config_file_list=None, config_dict=None):
    """A RecBole ``Config`` with our ``properties/`` defaults under the user's files.

    The dataset preset beyond the exact-name one (``uip_preset``, :func:`~recbole_uip.config.choose_preset`) is
    chosen once the data folder is known; the config is then rebuilt with it under the user's files. The choice is
    kept as ``config.uip_preset_note`` (logged by :func:`infer_profiles`).

    Raises:
        ValueError: unknown model name or unknown ``uip_*`` key.
    """
    model_class = resolve_model_class(model) if isinstance(model, str) else model
    config_dict = dict(config_dict or {})
    check_uip_keys(config_dict)
    user_files = list(config_file_list or [])
    files = default_config_files(dataset) + user_files
    config = _make_config(model_class, dataset, files, config_dict, user_files)
    choice = choose_preset(dataset, config["uip_preset"], Path(config["data_path"]))
    if choice.path is not None:
        files = default_config_files(dataset) + [str(choice.path)] + user_files
        config = _make_config(model_class, dataset, files, config_dict, user_files)
    config.uip_preset_note = choice.note
    config.uip_config_files = files            # what a process that must build it once uses (train_rank)
    check_uip_keys(config.final_config_dict)
    return config


def _make_config(model_class, dataset: str, files: list[str], config_dict: dict, user_files: list[str]):
    """RecBole's ``Config`` from these files and keys, outside the command line."""
    from recbole.config import Config

    with _no_command_line():
        try:
            return Config(model=model_class, dataset=dataset, config_file_list=files, config_dict=config_dict)
        except ValueError as error:
            # RecBole's defaults contradict themselves for sequential models with the CE loss (SASRec, GRU4Rec,
            # ... by default): overall.yaml samples negatives, and Config then refuses the combination. When the
            # user set neither, use the only valid value; a value the user chose still gets RecBole's error.
            if "when the loss_type is CE" not in str(error) or _sets_key("train_neg_sample_args", user_files, config_dict):
                raise
            config_dict["train_neg_sample_args"] = None
            return Config(model=model_class, dataset=dataset, config_file_list=files, config_dict=config_dict)


def _sets_key(key: str, config_file_list, config_dict) -> bool:
    """Whether the user's own config dict or YAML files set ``key``."""
    import yaml

    if key in (config_dict or {}):
        return True
    for path in config_file_list or []:
        with open(path, encoding="utf-8") as handle:
            if key in (yaml.safe_load(handle) or {}):
                return True
    return False


def check_dataset_files(config) -> dict[str, Path]:
    """Validate the dataset's atomic files before any work; return them keyed by suffix."""
    data_dir = Path(config["data_path"])
    name = config["dataset"]
    files = dataset_files(data_dir, name)
    if "inter" not in files:
        raise DatasetNotFoundError(
            f"Dataset '{name}' not found: expected {data_dir / (name + '.inter')}. Set data_path to the folder that "
            f"holds <dataset>/<dataset>.inter (RecBole's download of public datasets needs network access; run "
            f"stock RecBole once to fetch them)."
        )
    separator, encoding = config["field_separator"], config["encoding"]
    validate_atomic(files["inter"], [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]], separator, encoding)
    if "user" in files:
        validate_atomic(files["user"], [config["USER_ID_FIELD"]], separator, encoding)
        _check_unique(files["user"], config["USER_ID_FIELD"], separator, encoding)
    if "item" in files:
        validate_atomic(files["item"], [config["ITEM_ID_FIELD"]], separator, encoding)
        _check_unique(files["item"], config["ITEM_ID_FIELD"], separator, encoding)
    _, inter_fields, _ = read_header(files["inter"], separator, encoding)
    if next(iter_rows(files["inter"], len(inter_fields), separator, encoding), None) is None:
        raise AtomicFileError(f"{files['inter']}: no interactions (the file has a header and no data line).")
    return files


def _check_unique(path: Path, field: str, separator: str, encoding: str) -> None:
    """Each id appears on one line of a ``.user`` / ``.item`` file (RecBole would keep one row silently)."""
    _, fields, _ = read_header(path, separator, encoding)
    index, seen = fields.index(field), {}
    for line, values in iter_numbered_rows(path, len(fields), separator, encoding):
        first = seen.setdefault(values[index], line)
        if first != line:
            raise AtomicFileError(f"{path}:{line}: {field} '{values[index]}' appears again (first on line {first}). "
                                  f"Keep one row per {field}.")


def _split_keys(config) -> dict[str, Any]:
    """The settings that decide which interactions are in the training split."""
    from recbole.utils.argument_list import dataset_arguments

    from recbole_uip.data.behaviour import recbole_dataset_class

    keys = {k: config[k] for k in dataset_arguments if k in config}
    keys.update(seed=config["seed"], eval_args=config["eval_args"], dataset_class=recbole_dataset_class(config).__name__)
    return keys


def compute_fingerprint(config, settings: UIPSettings, files: dict[str, Path], llm_identity: str,
                        text_fields: dict | None = None, aligned_to: str | None = None,
                        world_size: int = 1) -> tuple[str, dict]:
    """Hash of everything the IDs depend on: file contents, split settings, the fields the text uses, LLM weights,
    ``uip_*`` settings, the numerics of the run (torch version, device type, dtype, CPU threads: see
    ``runtime_numerics``; the item batch size and the number of ranks where they are not the defaults), and the
    fingerprint of the bank whose code numbers it keeps (``uip_align_to``)."""
    from recbole_uip.inference.llm import runtime_numerics

    inputs = {
        "files": {suffix: sha256_file(path) for suffix, path in sorted(files.items())},
        "split": _split_keys(config),
        "text_fields": text_fields,
        "llm": {"name": settings.llm, "identity": llm_identity},
        "uip": settings.fingerprint_dict(),
        "numerics": runtime_numerics(settings.llm_dtype, config["device"], settings.num_threads),
        # 4: the feature map's principal directions from the covariance with fixed signs, k-means++ and restarts by
        # inverse CDF (the distributed code), the default item text without empty fields: banks of format 3 would
        # not be what this code computes, so they are not reused
        "format": 4,
    }
    if aligned_to is not None:   # only then: the fingerprints of every other bank stay as they were
        inputs["aligned_to"] = aligned_to
    if world_size != 1 or settings.item_batch_size != 64:      # likewise
        inputs["numerics"] = {**inputs["numerics"], "ranks": world_size, "item_batch_size": settings.item_batch_size}
    return sha256_json(inputs), inputs


def augmented_dir(config, settings: UIPSettings) -> Path:
    name = config["dataset"] + AUGMENTED_SUFFIX
    return settings.output_dir / name


def bank_store(settings: UIPSettings, dataset: str) -> Path:
    """``<uip_output_dir>/.uip_banks/<dataset>/``: every bank computed for the dataset, one folder per fingerprint.

    ``<dataset>-uip/`` holds the profiles of one split at a time (a CTR model's random split, a sequential model's
    leave-one-out split, ...); the store keeps the others, so switching back rewrites the files in seconds
    instead of inferring again.
    """
    return settings.output_dir / ".uip_banks" / dataset


def _stored_bank(folder: Path, fingerprint: str) -> FeatureBank | None:
    try:
        bank = FeatureBank.load(folder)
    except (BankError, ValueError, OSError):
        return None
    return bank if bank.fingerprint == fingerprint else None


def _reusable(target: Path, fingerprint: str) -> FeatureBank | None:
    manifest = target / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        if json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") != fingerprint:
            return None
        bank = FeatureBank.load(target / "bank")
    except (BankError, ValueError, OSError):
        return None
    return bank if bank.fingerprint == fingerprint else None


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


def write_augmented_dataset(config, settings: UIPSettings, files: dict[str, Path], bank: FeatureBank, target: Path) -> Path:
    """Copy every atomic file to ``target`` under the new name, adding the ``uip_*`` columns to ``.user``."""
    import shutil

    new_name = target.name
    separator, encoding = config["field_separator"], config["encoding"]
    user_field = config["USER_ID_FIELD"]

    def build(folder: Path) -> None:
        for suffix, path in files.items():
            if suffix != "user":
                shutil.copyfile(path, folder / f"{new_name}.{suffix}")
        source = read_atomic(files["user"], separator, encoding) if "user" in files else None
        users = [] if source is not None else _inter_users(files["inter"], user_field, separator, encoding)
        columns = {field: (lambda user, p=profile: bank.token(user, p))
                   for field, profile in zip(settings.field_names, settings.profile_names)}
        write_user_file(folder / f"{new_name}.user", source, user_field, users, columns, separator, encoding)
        bank.save(folder / "bank")
        write_json_atomic(folder / MANIFEST_NAME, {
            "fingerprint": bank.fingerprint,
            "source_dataset": config["dataset"],
            "fields": settings.field_names,
            "no_history_token": settings.no_history_token,
        })

    return publish_directory(build, target)


def _inter_users(path: Path, user_field: str, separator: str, encoding: str) -> list[str]:
    """Distinct users of an ``.inter`` file in first-seen order (for datasets without ``.user``)."""
    from recbole_uip.data.atomic import iter_rows, read_header

    _, fields, _ = read_header(path, separator, encoding)
    index = fields.index(user_field)
    return list(dict.fromkeys(row[index] for row in iter_rows(path, len(fields), separator, encoding)))


def augmented_config(config, settings: UIPSettings, target: Path, config_file_list=None, config_dict=None):
    """The ``Config`` of the run on the augmented copy: identical to ``config`` except the dataset name, its
    folder, the ``uip_*`` columns added to ``load_col``, and RecBole's dataset caches switched off."""
    return build_config(*augmented_config_args(config, settings, target, config_file_list, config_dict))


def augmented_config_args(config, settings: UIPSettings, target: Path, config_file_list=None, config_dict=None):
    """``(model class, dataset name, config_file_list, config_dict)`` of :func:`augmented_config`, for a process
    that builds the config itself (RecBole's multi-process training).

    RecBole ties presets to the dataset *name* (for ml-100k: threshold, load_col, ...); a renamed copy would lose
    them. We build the copy's config once, compare it with the original's, and carry every difference over.
    """
    model_class = config["model"] if not isinstance(config["model"], str) else resolve_model_class(config["model"])
    name = target.name
    base_dict = dict(config_dict or {})
    base_dict["data_path"] = str(target.parent)
    renamed = build_config(model_class, name, config_file_list, base_dict)
    presets = {
        key: value for key, value in config.final_config_dict.items()
        if key not in _NAME_DEPENDENT_KEYS and renamed.final_config_dict.get(key) != value
    }
    load_col = presets.get("load_col", renamed["load_col"])
    if load_col is not None:
        load_col = {k: list(v) for k, v in load_col.items()}
        user_cols = load_col.setdefault("user", [config["USER_ID_FIELD"]])
        user_cols += [f for f in settings.field_names if f not in user_cols]
        presets["load_col"] = load_col
    # RecBole reuses <checkpoint_dir>/<dataset>-<Class>.pth whenever the config matches, without looking at the
    # files: point it at a path unique to this bank (never written, since saving is off) so it cannot go stale.
    presets.update(
        save_dataset=False, save_dataloaders=False, dataloaders_save_path=None,
        dataset_save_path=str(Path(config["checkpoint_dir"]) / f"{name}-{_manifest_fingerprint(target)[:12]}-never-saved.pth"),
    )
    final_dict = {**base_dict, **presets}
    return model_class, name, config_file_list, final_dict


def _manifest_fingerprint(target: Path) -> str:
    return json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))["fingerprint"]


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


def run_recbole_with_config(config, saved: bool = True, model_seed: int | None = None) -> dict:
    """RecBole's ``run_recbole`` body for an already built ``Config`` (so the model class may be external).

    ``model_seed`` (default: ``config['seed']``, as RecBole) seeds only the model's initialisation and training
    order, after the split: benchmarks vary it over repeats while the split, and the profiles learned from its
    training part, stay fixed.
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
