"""Make RecBole 1.2.1 work on current torch, nothing else.

RecBole's trainer saves checkpoints that hold a pickled ``Config`` and reloads them with a plain
``torch.load``. Since torch 2.6, ``torch.load`` defaults to ``weights_only=True`` and refuses those
files, so ``trainer.evaluate(load_best_model=True)`` fails. Instead of asking users to export
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (which loosens every load in the process), we give RecBole's
trainer and quick-start modules their own view of ``torch`` whose ``load`` defaults to
``weights_only=False``. The files concerned are checkpoints that RecBole itself wrote, so this keeps
RecBole 1.2.1's own trust model and changes nothing for any other caller of ``torch.load``.
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import Any

import torch

_PATCHED_MODULES = ("recbole.trainer.trainer", "recbole.quick_start.quick_start")


class _TorchWithTrustedLoad(types.ModuleType):
    """A stand-in for the ``torch`` module whose ``load`` defaults to ``weights_only=False``."""

    def __init__(self, real_torch: types.ModuleType):
        super().__init__("torch")
        self._real_torch = real_torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real_torch, name)

    @staticmethod
    @functools.wraps(torch.load)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def patch_recbole_checkpoint_loading() -> None:
    """Let RecBole reload its own checkpoints under torch >= 2.6. Idempotent."""
    for module_name in _PATCHED_MODULES:
        module = importlib.import_module(module_name)
        if isinstance(getattr(module, "torch", None), _TorchWithTrustedLoad):
            continue
        module.torch = _TorchWithTrustedLoad(torch)


_RECBOLE_MODEL_PACKAGES = (
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
)


def list_recbole_models() -> list[str]:
    """Names of every model class RecBole 1.2.1 ships, without importing the optional exlib models."""
    names = []
    for package in _RECBOLE_MODEL_PACKAGES:
        module = importlib.import_module(f"recbole.model.{package}")
        names.extend(n for n in dir(module) if not n.startswith("_") and isinstance(getattr(module, n), type))
    return sorted(set(names))


def resolve_model_class(model_name: str) -> type:
    """Look a RecBole model up by name with a clear error.

    RecBole's own ``get_model`` imports the ``exlib`` package (lightgbm, xgboost) on the way, so an unknown
    or misspelt name surfaces as ``ModuleNotFoundError: lightgbm``. Here the built-in packages are searched
    first and an unknown name gets the closest existing names.

    Raises:
        ValueError: if no RecBole model has that name.
    """
    import difflib

    for package in _RECBOLE_MODEL_PACKAGES:
        module = importlib.import_module(f"recbole.model.{package}")
        model_class = getattr(module, model_name, None)
        if isinstance(model_class, type):
            return model_class
    if model_name.lower() in ("lightgbm", "xgboost"):
        try:
            from recbole.utils import get_model

            return get_model(model_name)
        except ModuleNotFoundError as error:
            raise ValueError(
                f"Model '{model_name}' needs the optional package '{error.name}': pip install {error.name}"
            ) from error
    known = list_recbole_models()
    close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown model '{model_name}': RecBole 1.2.1 has no model of that name.{hint}")
