"""Checkpoints of profile inference: a killed run resumes where it stopped.

The trainer saves its whole state (trainable parts, optimiser states, codebooks, RNG states, the position in the
round, the statistics kept for the report) after the item embeddings and first E-step, every
``uip_checkpoint_every`` M-step batches, after each M-step pass and after each E-step. A checkpoint is one file,
written beside its final name and renamed over it, so a kill while writing leaves the previous checkpoint. It
records the fingerprint of the inputs; a checkpoint of other inputs is never used. ``infer_profiles`` removes it
once the bank is saved.

:func:`recbole_uip.utils.fault_point` marks the points where the kill test kills the process.
"""

from __future__ import annotations

import os
from logging import getLogger
from pathlib import Path

import torch

from recbole_uip.utils import fault_point

class InferenceCheckpoint:
    """One checkpoint file for one set of inputs (``fingerprint``)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    def save(self, state: dict) -> None:
        """Write ``state`` atomically (a temporary sibling, then one rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save({"fingerprint": self.fingerprint, "state": state}, partial)
        fault_point("checkpoint_write")
        os.replace(partial, self.path)

    def load(self) -> dict | None:
        """The saved state, or None when there is none, it is unreadable, or it belongs to other inputs."""
        if not self.path.is_file():
            return None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - a damaged checkpoint costs a restart, never a wrong result
            getLogger().warning(f"UIP: ignoring the unreadable checkpoint {self.path} ({error}); starting afresh.")
            return None
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            getLogger().warning(f"UIP: ignoring the checkpoint {self.path}: it belongs to other inputs.")
            return None
        return data["state"]

    def remove(self) -> None:
        for path in (self.path, self.path.with_name(self.path.name + ".partial")):
            path.unlink(missing_ok=True)
