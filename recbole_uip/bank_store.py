"""What a feature bank is computed from, and where computed banks are kept for reuse.

* :func:`compute_fingerprint`: the hash of everything the IDs depend on (file contents, split, text fields, LLM,
  ``uip_*`` settings, numerics); a bank is reused only for the same fingerprint.
* :func:`bank_store`: ``<uip_output_dir>/.uip_banks/<dataset>/<fingerprint>``, every bank computed for a dataset.
* :func:`_stored_bank`, :func:`_reusable`: a stored bank, or the one in a published augmented copy, if it was
  computed for the given fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recbole_uip.bank import BankError, FeatureBank
from recbole_uip.config import UIPSettings
from recbole_uip.data.atomic import manifest_fingerprint
from recbole_uip.utils import sha256_file, sha256_json


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
    ``runtime_numerics``; the item batch size and the number of ranks), and the fingerprint of the bank whose code
    numbers it keeps (``uip_align_to``; None without)."""
    from recbole_uip.inference.llm import runtime_numerics

    numerics = runtime_numerics(settings.llm_dtype, config["device"], settings.num_threads)
    inputs = {
        "files": {suffix: sha256_file(path) for suffix, path in sorted(files.items())},
        "split": _split_keys(config),
        "text_fields": text_fields,
        "llm": {"name": settings.llm, "identity": llm_identity},
        "uip": settings.fingerprint_dict(),
        "numerics": {**numerics, "ranks": world_size, "item_batch_size": settings.item_batch_size},
        "aligned_to": aligned_to,
        # 4: the feature map's principal directions from the covariance with fixed signs, k-means++ and restarts by
        # inverse CDF (the distributed code), the default item text without empty fields: banks of format 3 would
        # not be what this code computes, so they are not reused. 5: with EM rounds, initial_codes is the untrained
        # start after as many E-steps as the trained IDs (it was the first E-step's); without rounds nothing changed,
        # so those banks kept format 4. 6: users and items in the order of their raw tokens, not RecBole's
        # internal ids (the last bits of every bank change), and with EM rounds the random-direction control
        "format": 6,
    }
    return sha256_json(inputs), inputs


def bank_store(settings: UIPSettings, dataset: str) -> Path:
    """``<uip_output_dir>/.uip_banks/<dataset>/``: every bank computed for the dataset, one folder per fingerprint.

    ``<dataset>-uip/`` holds the profiles of one split at a time (a CTR model's random split, a sequential model's
    leave-one-out split, ...); the store keeps the others, so switching back rewrites the files in seconds
    instead of inferring again.
    """
    return settings.output_dir / ".uip_banks" / dataset


def _stored_bank(folder: Path, fingerprint: str) -> FeatureBank | None:
    """The bank saved in ``folder`` (under :func:`bank_store`), if it loads and was computed for ``fingerprint``."""
    try:
        bank = FeatureBank.load(folder)
    except (BankError, ValueError, OSError):
        return None
    return bank if bank.fingerprint == fingerprint else None


def _reusable(target: Path, fingerprint: str) -> FeatureBank | None:
    """The bank of the published augmented copy ``target``, if its manifest and its bank are for ``fingerprint``."""
    if manifest_fingerprint(target) != fingerprint:
        return None
    try:
        bank = FeatureBank.load(target / "bank")
    except (BankError, ValueError, OSError):
        return None
    return bank if bank.fingerprint == fingerprint else None
