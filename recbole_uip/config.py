"""The ``uip_*`` configuration keys: defaults from ``recbole_uip/properties/``, typed settings, validation.

RecBole's ``Config`` stays the single source of configuration. This module adds our YAML defaults underneath
the user's own files (lowest precedence) and reads the resolved ``uip_*`` keys into a validated
:class:`UIPSettings`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Mapping

import yaml


PROPERTIES_DIR = Path(__file__).resolve().parent / "properties"   # package data: installed with the wheel
DEFAULTS_FILE = PROPERTIES_DIR / "uip.yaml"
BUNDLED_LLM = "bundled-smollm2"
QUANTISER_METRICS = ("euclidean", "whitened")
ENCODERS = ("linear", "none")
TARGETS = ("random", "newest")
LINE_SEARCHES = ("joint", "per_profile")
LINE_SEARCH_CRITERIA = ("likelihood", "ctr")
LINE_SEARCH_LENGTHS = (0.003, 0.01, 0.03, 0.1, 0.3)   # the line search's candidate lengths before the key existed


class UIPConfigError(ValueError):
    """A ``uip_*`` key is unknown or has an invalid value."""


def default_config_files(dataset: str) -> list[str]:
    """Our YAML files, to be placed before the user's ``config_file_list`` (user files win).

    Returns ``recbole_uip/properties/uip.yaml`` and, where it exists, ``recbole_uip/properties/dataset/<dataset>.yaml``.
    """
    files = [str(DEFAULTS_FILE)]
    dataset_file = PROPERTIES_DIR / "dataset" / f"{dataset}.yaml"
    if dataset_file.is_file():
        files.append(str(dataset_file))
    return files


# Presets found by name pattern (case-insensitive), each applied only where the dataset's headers have every field it
# names; the first that fits wins. An exact name (properties/dataset/<dataset>.yaml, e.g. ml-100k) comes first.
PRESET_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ml-*", ("movielens", "movielens-csv")),
    ("amazon*", ("amazon",)),
    ("yelp*", ("yelp",)),
)


@dataclasses.dataclass(frozen=True)
class PresetChoice:
    """The dataset preset a run uses beyond the exact-name one: its file (None: none) and a line for the log."""

    path: Path | None
    note: str = ""


def available_presets() -> list[str]:
    """Names accepted by ``uip_preset`` (besides ``auto`` and ``none``): the files in ``properties/dataset/``."""
    return sorted(p.stem for p in (PROPERTIES_DIR / "dataset").glob("*.yaml"))


def preset_path(name: str) -> Path:
    """A preset by name (``amazon``) or as a path to a YAML file.

    Raises:
        UIPConfigError: no such preset.
    """
    path = PROPERTIES_DIR / "dataset" / f"{name}.yaml"
    if path.is_file():
        return path
    given = Path(str(name)).expanduser()
    if given.suffix in (".yaml", ".yml") and given.is_file():
        return given
    raise UIPConfigError(f"uip_preset: no preset {name!r}; presets: auto, none, {', '.join(available_presets())}, or a "
                         f"path to a YAML file.")


def preset_misfit(path: Path, data_dir: Path, dataset: str) -> list[str]:
    """``data_dir``: the folder holding ``<dataset>.inter`` (RecBole's resolved ``config['data_path']``). The fields ``path`` names that the dataset's headers lack (empty: the preset fits): the user and item id fields
    in ``.inter``, ``uip_item_text_fields`` in ``.item``. Rating, time and ``load_col`` fields may be absent (RecBole
    and the behaviour text do without them)."""
    from recbole_uip.data.atomic import AtomicFileError, dataset_files, read_header

    with open(path, encoding="utf-8") as handle:
        preset = yaml.safe_load(handle) or {}
    files = dataset_files(data_dir, dataset)
    if "inter" not in files:
        return [f"{dataset}.inter"]
    try:
        _, inter, _ = read_header(files["inter"])
        item = read_header(files["item"])[1] if "item" in files else []
    except AtomicFileError as error:
        return [str(error)]
    missing = [f"{preset.get(key, default)} in .inter" for key, default in
               (("USER_ID_FIELD", "user_id"), ("ITEM_ID_FIELD", "item_id")) if preset.get(key, default) not in inter]
    missing += [f"{field} in .item" for field in preset.get("uip_item_text_fields") or [] if field not in item]
    return missing


def choose_preset(dataset: str, requested: str | None, data_dir: Path) -> PresetChoice:
    """The preset for ``dataset`` (its files in ``data_dir``, RecBole's resolved ``config['data_path']``), per
    ``uip_preset``.

    ``auto`` (default): nothing more where ``properties/dataset/<dataset>.yaml`` exists (it is already in
    :func:`default_config_files`); else the first preset of the matching :data:`PRESET_PATTERNS` entry whose fields the
    files have; else none, and the note says why (the text fields are then inferred from ``.item``). ``none``: no
    preset. A name or YAML path: that preset, unchecked.
    """
    import fnmatch

    requested = "auto" if requested in (None, "") else str(requested)
    if requested == "none":
        return PresetChoice(None, "uip_preset: none (no dataset preset)")
    if requested != "auto":
        path = preset_path(requested)
        return PresetChoice(path, f"dataset preset {path.name} (uip_preset)")
    if (PROPERTIES_DIR / "dataset" / f"{dataset}.yaml").is_file():
        return PresetChoice(None, f"dataset preset {dataset}.yaml (the dataset's name)")
    for pattern, names in PRESET_PATTERNS:
        if not fnmatch.fnmatch(dataset.lower(), pattern):
            continue
        reasons = []
        for name in names:
            missing = preset_misfit(preset_path(name), data_dir, dataset)
            if not missing:
                return PresetChoice(preset_path(name), f"dataset preset {name}.yaml (name matches '{pattern}', its "
                                                       f"fields are in the files)")
            reasons.append(f"{name}.yaml needs {', '.join(missing)}")
        return PresetChoice(None, f"no dataset preset for '{dataset}' ({'; '.join(reasons)}): item text fields are "
                                  f"inferred from .item; name them with uip_item_text_fields or pick a preset with "
                                  f"uip_preset")
    return PresetChoice(None, "")


def default_values() -> dict[str, Any]:
    """The ``uip_*`` defaults as a plain dict (what ``properties/uip.yaml`` says)."""
    with open(DEFAULTS_FILE, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def check_uip_keys(keys) -> None:
    """Raise :class:`UIPConfigError` for any ``uip*`` key we do not know, naming the closest known ones."""
    known = set(default_values())
    for key in keys:
        if (key == "uip" or key.startswith("uip_")) and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UIPConfigError(f"Unknown recbole-uip key '{key}'.{hint} Known keys: see recbole_uip/properties/uip.yaml.")


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise UIPConfigError(f"'{key}' must be true or false, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class UIPSettings:
    """Every ``uip_*`` key, typed and validated. Built with :meth:`from_config`; see ``recbole_uip/properties/uip.yaml``."""

    enabled: bool
    llm: str
    llm_cache_dir: Path
    llm_dtype: str
    num_threads: int
    profiles: dict[str, str]
    codebook_sizes: dict[str, int]
    item_text_fields: tuple[str, ...] | None
    item_template: str | None
    rating_template: str
    behaviour_prefix: str
    item_separator: str
    max_behaviour_tokens: int
    target: str
    encoder: str
    encoder_dims: int
    history_prior: float
    item_embedding_layer: int
    line_search_users: int
    free_tokens: bool
    free_token_optimizer: str
    free_token_learning_rate: float
    epochs: int
    batch_size: int
    shared_learning_rate: float
    commitment_weight: float
    quantiser_metric: str
    quantiser_components: int
    rating_weight: float
    init_scale: float
    kmeans_iters: int
    no_history_token: str
    diagnostics: bool
    output_dir: Path
    reuse: bool
    align_to: Path | None = None
    lock_timeout: float = 0.0
    checkpoint_every: int = 50
    item_batch_size: int = 64
    mstep_users: int = 0
    seed: int | None = None
    shift_warmup_batches: int = 0
    line_search: str = "joint"
    line_search_min_z: float = 0.0
    line_search_lengths: tuple[float, ...] = LINE_SEARCH_LENGTHS
    line_search_criterion: str = "likelihood"
    ctr_label_threshold: float | None = None

    def __post_init__(self):
        if not self.profiles:
            raise UIPConfigError("'uip_profiles' needs at least one profile, e.g. {hobby: \"Hobbies:\"}.")
        for name, phrase in self.profiles.items():
            if not str(name).isidentifier():
                raise UIPConfigError(f"Profile name {name!r} must be an identifier: it becomes the field uip_{name}.")
            if not isinstance(phrase, str) or not phrase.strip():
                raise UIPConfigError(f"Profile '{name}' needs a non-empty phrase in 'uip_profiles'.")
        for name, size in self.codebook_sizes.items():
            if not isinstance(size, int) or size < 2:
                raise UIPConfigError(f"Codebook size of profile '{name}' must be an integer >= 2, got {size!r}.")
        if self.llm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UIPConfigError(f"'uip_llm_dtype' must be auto, float32, bfloat16 or float16, got {self.llm_dtype!r}.")
        if not isinstance(self.checkpoint_every, int) or isinstance(self.checkpoint_every, bool) or self.checkpoint_every < 0:
            raise UIPConfigError(f"'uip_checkpoint_every' must be an integer >= 0 (batches), got {self.checkpoint_every!r}.")
        if self.lock_timeout < 0:
            raise UIPConfigError(f"'uip_lock_timeout' must be >= 0 seconds, got {self.lock_timeout!r}.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise UIPConfigError(f"'uip_seed' must be an integer >= 0 or ~ (RecBole's seed), got {self.seed!r}.")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise UIPConfigError(f"'uip_epochs' must be an integer >= 0 (0: the untrained start's IDs), got {self.epochs!r}.")
        positive = {
            "uip_max_behaviour_tokens": self.max_behaviour_tokens,
            "uip_batch_size": self.batch_size,
            "uip_kmeans_iters": self.kmeans_iters,
            "uip_encoder_dims": self.encoder_dims,
            "uip_item_batch_size": self.item_batch_size,
        }
        for key, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UIPConfigError(f"'{key}' must be a positive integer, got {value!r}.")
        for key, value in {"uip_line_search_users": self.line_search_users,
                           "uip_mstep_users": self.mstep_users,
                           "uip_shift_warmup_batches": self.shift_warmup_batches,
                           "uip_quantiser_components": self.quantiser_components}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UIPConfigError(f"'{key}' must be an integer >= 0, got {value!r}.")
        for key, value in {"uip_free_token_learning_rate": self.free_token_learning_rate,
                           "uip_init_scale": self.init_scale, "uip_rating_weight": self.rating_weight}.items():
            if not value > 0:
                raise UIPConfigError(f"'{key}' must be positive, got {value!r}.")
        for key, value in {"uip_shared_learning_rate": self.shared_learning_rate,
                           "uip_line_search_min_z": self.line_search_min_z,
                           "uip_commitment_weight": self.commitment_weight, "uip_history_prior": self.history_prior,
                           "uip_num_threads": self.num_threads}.items():
            if not value >= 0:
                raise UIPConfigError(f"'{key}' must be >= 0, got {value!r}.")
        for key, value, allowed in (("uip_quantiser_metric", self.quantiser_metric, QUANTISER_METRICS),
                                    ("uip_encoder", self.encoder, ENCODERS), ("uip_target", self.target, TARGETS),
                                    ("uip_free_token_optimizer", self.free_token_optimizer, ("adam", "sgd")),
                                    ("uip_line_search", self.line_search, LINE_SEARCHES),
                                    ("uip_line_search_criterion", self.line_search_criterion, LINE_SEARCH_CRITERIA)):
            if value not in allowed:
                raise UIPConfigError(f"'{key}' must be one of {', '.join(allowed)}, got {value!r}.")
        lengths = self.line_search_lengths
        if not lengths or not all(0 < a < b for a, b in zip(lengths, lengths[1:] + (float("inf"),))):
            raise UIPConfigError("'uip_line_search_lengths' must be positive lengths in increasing order, e.g. "
                                 f"[0.001, 0.003, 0.01], got {list(lengths)!r}.")
        if self.line_search_criterion == "ctr":
            if self.line_search_min_z > 0:
                raise UIPConfigError("'uip_line_search_min_z' gates the likelihood's gain; with "
                                     "uip_line_search_criterion: ctr the step is chosen by the IDs' held-out AUC. Set "
                                     "one of them back (uip_line_search_min_z: 0 or uip_line_search_criterion: "
                                     "likelihood).")
            if self.ctr_label_threshold is None:
                raise UIPConfigError("uip_line_search_criterion: ctr labels training interactions rating >= threshold; "
                                     "set uip_ctr_label_threshold (e.g. 4 on a 1-5 scale) or RecBole's threshold on "
                                     "the rating field (threshold: {rating: 4}).")
        if self.encoder == "none" and not self.free_tokens:
            raise UIPConfigError("'uip_encoder: none' leaves the users nothing of their own: set uip_free_tokens: true "
                                 "(the paper's free per-user tokens) or use uip_encoder: linear.")
        if not self.no_history_token or any(c.isspace() for c in self.no_history_token):
            raise UIPConfigError("'uip_no_history_token' must be a non-empty token without spaces.")

    @property
    def profile_names(self) -> list[str]:
        return list(self.profiles)

    @property
    def field_names(self) -> list[str]:
        """The atomic-file fields we add, one per profile: ``uip_<profile>``."""
        return [f"uip_{name}" for name in self.profiles]

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that change the inferred IDs (not where outputs go, nor reuse)."""
        data = dataclasses.asdict(self)
        # align_to enters the fingerprint as the previous bank's fingerprint, not as a path (quick_start)
        for key in ("enabled", "output_dir", "reuse", "llm_cache_dir", "num_threads", "diagnostics", "align_to",
                    "lock_timeout", "checkpoint_every", "item_batch_size"):
            data.pop(key)  # the thread count that runs enters the fingerprint with the numerics (runtime_numerics),
            # and so do the item batch size and the number of ranks (bank_store.compute_fingerprint)
        # keys added later, at the value that behaves as before they existed (every user in the M-step; RecBole's
        # seed, which the fingerprint holds with the split), are left out: earlier banks keep their fingerprint
        for key, as_before in (("mstep_users", 0), ("seed", None), ("shift_warmup_batches", 0), ("line_search", "joint"),
                                 ("line_search_min_z", 0.0), ("line_search_lengths", LINE_SEARCH_LENGTHS),
                                 ("line_search_criterion", "likelihood"), ("ctr_label_threshold", None)):
            if data[key] == as_before:
                data.pop(key)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "UIPSettings":
        """Read and validate the ``uip_*`` keys of a RecBole ``Config`` (or any mapping with the defaults)."""
        defaults = default_values()

        def get(key):
            value = config[key] if _has(config, key) else None
            return defaults[key] if value is None else value

        profiles = get("uip_profiles")
        if not isinstance(profiles, Mapping):
            raise UIPConfigError("'uip_profiles' must map profile names to phrases.")
        profiles = {str(k): v for k, v in profiles.items()}
        sizes = get("uip_codebook_size")
        if isinstance(sizes, Mapping):
            unknown = set(sizes) - set(profiles)
            if unknown:
                raise UIPConfigError(f"'uip_codebook_size' names unknown profiles {sorted(unknown)}.")
            sizes = {name: sizes.get(name, defaults["uip_codebook_size"]) for name in profiles}
        else:
            sizes = {name: sizes for name in profiles}
        lengths = get("uip_line_search_lengths")
        if not isinstance(lengths, (list, tuple)):
            raise UIPConfigError(f"'uip_line_search_lengths' must be a list of lengths, e.g. [0.001, 0.003, 0.01], "
                                 f"got {lengths!r}.")
        criterion, threshold = str(get("uip_line_search_criterion")), get("uip_ctr_label_threshold")
        if criterion == "ctr" and threshold is None:      # RecBole's threshold on the rating field, where it has one
            recbole_threshold = config["threshold"] if _has(config, "threshold") else None
            rating_field = config["RATING_FIELD"] if _has(config, "RATING_FIELD") else "rating"
            if isinstance(recbole_threshold, Mapping) and rating_field in recbole_threshold:
                threshold = recbole_threshold[rating_field]
        fields = get("uip_item_text_fields")
        if isinstance(fields, str):
            fields = [fields]
        cache = config["uip_llm_cache_dir"] if _has(config, "uip_llm_cache_dir") else None
        cache = cache or os.environ.get("RECBOLE_UIP_CACHE") or Path.home() / ".cache" / "recbole_uip"
        try:
            return cls(
                enabled=_as_bool(get("uip"), "uip"),
                llm=str(get("uip_llm")),
                llm_cache_dir=Path(cache).expanduser(),
                llm_dtype=str(get("uip_llm_dtype")),
                num_threads=int(get("uip_num_threads")),
                profiles=profiles,
                codebook_sizes=sizes,
                item_text_fields=tuple(fields) if fields else None,
                item_template=get("uip_item_template") or None,
                rating_template=str(get("uip_rating_template")),
                behaviour_prefix=str(get("uip_behaviour_prefix")),
                item_separator=str(get("uip_item_separator")),
                max_behaviour_tokens=get("uip_max_behaviour_tokens"),
                target=str(get("uip_target")),
                encoder=str(get("uip_encoder")),
                encoder_dims=get("uip_encoder_dims"),
                history_prior=float(get("uip_history_prior")),
                item_embedding_layer=int(get("uip_item_embedding_layer")),
                line_search_users=get("uip_line_search_users"),
                free_tokens=_as_bool(get("uip_free_tokens"), "uip_free_tokens"),
                free_token_optimizer=str(get("uip_free_token_optimizer")),
                free_token_learning_rate=float(get("uip_free_token_learning_rate")),
                epochs=get("uip_epochs"),
                batch_size=get("uip_batch_size"),
                shared_learning_rate=float(get("uip_shared_learning_rate")),
                commitment_weight=float(get("uip_commitment_weight")),
                quantiser_metric=str(get("uip_quantiser_metric")),
                quantiser_components=get("uip_quantiser_components"),
                rating_weight=float(get("uip_rating_weight")),
                init_scale=float(get("uip_init_scale")),
                kmeans_iters=get("uip_kmeans_iters"),
                no_history_token=str(get("uip_no_history_token")),
                diagnostics=_as_bool(get("uip_diagnostics"), "uip_diagnostics"),
                output_dir=Path(str(get("uip_output_dir"))),
                reuse=_as_bool(get("uip_reuse"), "uip_reuse"),
                align_to=Path(str(get("uip_align_to"))).expanduser() if get("uip_align_to") else None,
                lock_timeout=float(get("uip_lock_timeout")),
                checkpoint_every=get("uip_checkpoint_every"),
                item_batch_size=get("uip_item_batch_size"),
                mstep_users=get("uip_mstep_users"),
                seed=get("uip_seed"),
                shift_warmup_batches=get("uip_shift_warmup_batches"),
                line_search=str(get("uip_line_search")),
                line_search_min_z=float(get("uip_line_search_min_z")),
                line_search_lengths=tuple(float(length) for length in lengths),
                line_search_criterion=criterion,
                ctr_label_threshold=None if criterion != "ctr" or threshold is None else float(threshold),
            )
        except (TypeError, ValueError) as error:
            if isinstance(error, UIPConfigError):
                raise
            raise UIPConfigError(f"Invalid recbole-uip setting: {error}") from error


def _has(config: Mapping[str, Any], key: str) -> bool:
    """RecBole's Config supports ``in`` on its final dict; plain dicts too."""
    try:
        return key in config
    except TypeError:
        return False
