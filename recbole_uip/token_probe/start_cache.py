"""A cache of the token probe's trained start (``benchmarks/token_probe.py --start_cache=DIR``): the shared shift and
the encoder stage (steps 1 and 5 of its docstring), which take about half of a deep-prompt run, so that runs which
differ only in what comes after them (the per-user fits, their teacher, the number of probed users, the scoring) do
not train them again.

A start is looked up by a digest of everything it depends on: the resolved settings, the probe's arguments that
shape the stages (:data:`START_ARGUMENTS`), the users' training histories, the torch version and thread count, and
the source of the whole ``recbole_uip`` package and of the benchmark. Any change to the code therefore misses the
cache and trains the start again: a start the current code would not train is never reused. A loaded start gives
the same results as a trained one to the last digit (``tests/test_benchmarking.py``). Files are written atomically;
one that cannot be read is reported and trained over.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from recbole_uip.utils import atomic_write, sha256_json

# the probe's arguments that shape the shift and the encoder stage (the probed users follow the shift's users in the
# same permutation, so --users does not change the start); the teacher's context only where a stage distils
START_ARGUMENTS = ("probe_seed", "shift_users", "shift_passes", "shift_objective", "encoder_passes",
                   "encoder_learning_rate", "encoder_input", "encoder_objective", "encoder_prefix", "holdout_tokens",
                   "model", "dataset")
FORMAT = 1


def source_digest(*extra: Path) -> str:
    """sha256 of the source of every module of the ``recbole_uip`` package and of ``extra`` files, in path order."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")) + [Path(p).resolve() for p in extra]:
        digest.update(str(path.relative_to(path.parents[1])).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def start_key(args, settings, histories, source: str) -> str:
    """The digest a start is cached under (see the module docstring); ``histories``: the trainer's per-user item
    arrays (the remaining training histories the stages read)."""
    items = hashlib.sha256()
    for user_items in histories:
        items.update(np.asarray(user_items, dtype=np.int64).tobytes() + b"|")
    arguments = {name: getattr(args, name) for name in START_ARGUMENTS}
    if "distil" in (args.shift_objective, args.encoder_objective if args.encoder_passes else ""):
        arguments["distil_context_tokens"] = args.distil_context_tokens
    return sha256_json({"format": FORMAT, "settings": dataclasses.asdict(settings), "arguments": arguments,
                        "histories": items.hexdigest(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "source": source})


@dataclasses.dataclass
class TrainedStart:
    """What the stages leave behind: the soft tokens' parameters (``state_dict`` of the trainer's soft-token
    module: the shift, the linear encoder), the deep encoder's tensors (``{"shared": (N, 2, H, m, d), "weights":
    (N, 2, H, m, d, k)}``, or None), the probe's random generator state after the stages, and each stage's loss per
    pass."""

    soft: dict
    deep_encoder: dict | None
    rng_state: dict
    shift_nll: list[float]
    encoder_nll: list[float]


class StartCache:
    """One start's file in ``folder``, named by its key; ``loaded``: whether :meth:`load` found it."""

    def __init__(self, folder: str | Path, key: str):
        self.key = key
        self.path = Path(folder) / f"start_{key[:24]}.pt"
        self.loaded = False

    def load(self, logger) -> TrainedStart | None:
        """The cached start, or None (none yet, or a file that cannot be read: reported, then trained over)."""
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
            if saved.get("key") != self.key:
                raise ValueError("its key is not the file name's")
            start = TrainedStart(**saved["start"])
        except Exception as error:              # a damaged or foreign file: the start is trained again
            logger.warning(f"token probe: the cached start {self.path.name} cannot be read ({error}); training it "
                           f"again")
            return None
        self.loaded = True
        return start

    def save(self, start: TrainedStart) -> None:
        with atomic_write(self.path, "wb") as handle:
            torch.save({"key": self.key, "start": dataclasses.asdict(start)}, handle)
