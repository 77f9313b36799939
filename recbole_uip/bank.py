"""The feature bank: each user's profile IDs, the codebooks, and what they were computed from.

A bank is a plain, versioned folder that any tool can read without this package:

* ``bank.json``: format version, fingerprint of every input, profiles, users, the settings, the inference
  report, and the SHA-256 of ``bank.npz``;
* ``bank.npz``: ``codes`` int64 ``(U, P)``, ``codebook_<profile>`` float32 ``(K_p, D)``, ``summaries`` float32
  ``(U, H)`` (forward-only LLM summaries, for baselines and fold-in), ``offsets`` float32 ``(U, P, D)`` and,
  when the codebooks measure distances after a projection (``uip_quantiser_metric``), ``projection_<profile>``
  float32 ``(D, k)`` (a new offset ``x`` goes to ``argmin_k ||(x - codebook[k]) @ projection||``).

Serving looks IDs up here and never runs the LLM.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from recbole_uip.utils import atomic_write, sha256_file, write_json_atomic

BANK_FORMAT_VERSION = 1


class BankError(ValueError):
    """A bank folder is missing, incomplete, corrupted or of an unknown version."""


@dataclasses.dataclass
class FeatureBank:
    """Profile IDs of every user with training history, plus their provenance.

    Attributes:
        fingerprint: hash of the dataset files, split settings, LLM and ``uip_*`` settings.
        profiles: profile names, column order of ``codes``.
        users: raw user tokens, row order of ``codes``.
        codes: int64 ``(U, P)``.
        codebooks: per profile float32 ``(K_p, D)``.
        no_history_token: the token of users with no training interaction.
        summaries: float32 ``(U, H)`` or None.
        offsets: float32 ``(U, P, D)`` or None.
        projections: per profile float32 ``(D, k)`` (the projection of the quantiser's metric) or None.
        metadata: settings, inputs and report (JSON-serialisable).
    """

    fingerprint: str
    profiles: list[str]
    users: list[str]
    codes: np.ndarray
    codebooks: list[np.ndarray]
    no_history_token: str
    summaries: np.ndarray | None = None
    offsets: np.ndarray | None = None
    projections: list[np.ndarray] | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._row = {user: row for row, user in enumerate(self.users)}
        if self.codes.shape != (len(self.users), len(self.profiles)):
            raise BankError(f"codes have shape {self.codes.shape}, expected ({len(self.users)}, {len(self.profiles)}).")

    def token(self, user: str, profile: str) -> str:
        """The token written for ``user`` in column ``uip_<profile>``: the code as a string, or the
        no-history token for users the bank does not know."""
        row = self._row.get(str(user))
        if row is None:
            return self.no_history_token
        return str(int(self.codes[row, self.profiles.index(profile)]))

    def lookup(self, user: str) -> dict[str, str]:
        """``{profile: token}`` for one user (see :meth:`token`)."""
        return {profile: self.token(user, profile) for profile in self.profiles}

    def save(self, folder: str | Path) -> Path:
        """Write ``bank.npz`` then ``bank.json`` (which holds the npz checksum), each atomically."""
        folder = Path(folder)
        arrays = {"codes": self.codes.astype(np.int64)}
        for name, codebook in zip(self.profiles, self.codebooks):
            arrays[f"codebook_{name}"] = codebook.astype(np.float32)
        if self.summaries is not None:
            arrays["summaries"] = self.summaries.astype(np.float32)
        if self.offsets is not None:
            arrays["offsets"] = self.offsets.astype(np.float32)
        for name, projection in zip(self.profiles, self.projections or []):
            arrays[f"projection_{name}"] = projection.astype(np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_write(folder / "bank.npz", "wb") as handle:
            handle.write(buffer.getvalue())
        write_json_atomic(folder / "bank.json", {
            "format_version": BANK_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "profiles": self.profiles,
            "users": self.users,
            "no_history_token": self.no_history_token,
            "npz_sha256": sha256_file(folder / "bank.npz"),
            "metadata": self.metadata,
        })
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureBank":
        folder = Path(folder)
        meta_path, npz_path = folder / "bank.json", folder / "bank.npz"
        if not meta_path.is_file() or not npz_path.is_file():
            raise BankError(f"{folder} holds no complete feature bank (bank.json and bank.npz).")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise BankError(f"{meta_path} is not valid JSON: {error}") from error
        if meta.get("format_version") != BANK_FORMAT_VERSION:
            raise BankError(f"{meta_path} has format version {meta.get('format_version')}, expected {BANK_FORMAT_VERSION}.")
        if sha256_file(npz_path) != meta["npz_sha256"]:
            raise BankError(f"{npz_path} does not match the checksum in bank.json (corrupted or partly written).")
        with np.load(npz_path) as arrays:
            return cls(
                fingerprint=meta["fingerprint"],
                profiles=list(meta["profiles"]),
                users=list(meta["users"]),
                codes=arrays["codes"],
                codebooks=[arrays[f"codebook_{name}"] for name in meta["profiles"]],
                no_history_token=meta["no_history_token"],
                summaries=arrays["summaries"] if "summaries" in arrays else None,
                offsets=arrays["offsets"] if "offsets" in arrays else None,
                projections=[arrays[f"projection_{name}"] for name in meta["profiles"]]
                if f"projection_{meta['profiles'][0]}" in arrays else None,
                metadata=meta.get("metadata", {}),
            )
