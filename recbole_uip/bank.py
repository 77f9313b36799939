"""The feature bank: each user's profile IDs, the codebooks, the encoder that maps a history to IDs, and provenance.

A bank is a plain, versioned folder that any tool can read without this package:

* ``bank.json``: format version, fingerprint of every input, profiles, users, the settings, the inference
  report, the items the encoder has embedded, and the SHA-256 of ``bank.npz``;
* ``bank.npz``:

  - ``codes`` int64 ``(U, P)``: the profile IDs; ``initial_codes`` int64 ``(U, P)``: the same quantiser, with as
    many E-steps, on the untrained start (the control every benchmark compares against); ``random_step_codes``
    int64 ``(U, P)`` (optional): the untrained encoder moved each round by the trained encoder's step with random
    singular vectors, quantised the same way (the control for the directions the likelihood chose);
  - ``codebook_<profile>`` float32 ``(K_p, D)``; with the whitened metric ``projection_<profile>`` float32
    ``(D, k)`` (a new offset ``x`` goes to ``argmin_k ||(x - codebook[k]) @ projection||``);
  - ``summaries`` float32 ``(U, k)``: each user's encoder input ``z``; ``offsets`` float32 ``(U, P, D)``;
  - the encoder (:class:`EncoderState`): ``encoder_anchors``, ``encoder_shared`` ``(P, D)``, ``encoder_weights``
    ``(P, D, k)``, ``features_*`` (the history-to-``z`` map) and ``item_embeddings`` ``(I, H)``.

Everything a user who is not in the bank needs is here: their items' embeddings (the LLM runs only for items the
bank has not embedded), the map to ``z``, the encoder and the codebooks. Serving looks IDs up and never runs
the LLM.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from recbole_uip.data.atomic import OutputWriteError
from recbole_uip.inference.user_features import UserFeatureMap
from recbole_uip.utils import atomic_write, fault_point, sha256_file, write_json_atomic

BANK_FORMAT_VERSION = 2
CONTROL_CODES = ("initial_codes", "random_step_codes")   # the controls' IDs, int64 (U, P), each optional


class BankError(ValueError):
    """A bank folder is missing, incomplete, corrupted or of an unknown version."""


@dataclasses.dataclass
class EncoderState:
    """The amortised encoder of a bank: from a user's items and ratings to their soft-token offsets.

    Attributes:
        anchors, shared: float32 ``(P, D)``; a soft token is ``anchors + shared + offset``.
        weights: float32 ``(P, D, k)``; ``offset[p] = weights[p] @ z``.
        feature_map: from a history to ``z (k,)``.
        item_ids: raw tokens of the embedded items; item_embeddings: float32 ``(I, H)`` aligned with them.
    """

    anchors: np.ndarray
    shared: np.ndarray
    weights: np.ndarray
    feature_map: UserFeatureMap
    item_ids: list[str]
    item_embeddings: np.ndarray

    def offsets(self, histories: list[list[str]], ratings: list[list[float]] | None = None) -> np.ndarray:
        """Offsets ``(B, P, D)`` of ``B`` histories of raw item tokens (oldest first), with their ratings where the
        bank's text wrote ratings. Every item must be one the bank has embedded (:attr:`item_ids`).

        Raises:
            KeyError: naming an item the bank has not embedded.
        """
        import torch

        if getattr(self, "_row_count", None) != len(self.item_ids):          # built once per item list
            self._row = {item: i for i, item in enumerate(self.item_ids)}
            self._row_count = len(self.item_ids)
        row = self._row
        unknown = sorted({item for history in histories for item in history if item not in row})
        if unknown:
            raise KeyError(f"items not embedded in this bank: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        items = [np.array([row[item] for item in history], dtype=np.int64) for history in histories]
        rates = None
        if self.feature_map.rating_mean is not None:
            if ratings is None:
                raise ValueError("This bank's behaviour text wrote ratings: give each history its ratings.")
            rates = [np.asarray(r, dtype=np.float32) for r in ratings]
        z = self.feature_map(torch.from_numpy(np.asarray(self.item_embeddings)), items, rates)
        return np.einsum("pdk,bk->bpd", self.weights, z.numpy())

    def with_items(self, item_ids: list[str], item_embeddings: np.ndarray) -> "EncoderState":
        """The same encoder knowing more items: ``item_embeddings (N, H)`` of ``item_ids`` (not yet embedded), made
        the way the bank made its own (same LLM, layer and item text)."""
        known = set(self.item_ids)
        if any(item in known for item in item_ids):
            raise ValueError("with_items takes only items the bank has not embedded.")
        embeddings = np.asarray(item_embeddings, dtype=np.float32)
        if embeddings.shape != (len(item_ids), self.item_embeddings.shape[1]):
            raise ValueError(f"item_embeddings must be ({len(item_ids)}, {self.item_embeddings.shape[1]}), "
                             f"got {embeddings.shape}.")
        return dataclasses.replace(self, item_ids=[*self.item_ids, *item_ids],
                                   item_embeddings=np.concatenate([self.item_embeddings, embeddings]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"encoder_anchors": self.anchors, "encoder_shared": self.shared, "encoder_weights": self.weights,
                "item_embeddings": self.item_embeddings, **self.feature_map.arrays()}

    def meta(self) -> dict:
        return {"item_ids": self.item_ids, "rating_mean": self.feature_map.rating_mean, "prior": self.feature_map.prior}

    @classmethod
    def load(cls, arrays, meta: dict) -> "EncoderState":
        return cls(anchors=arrays["encoder_anchors"], shared=arrays["encoder_shared"], weights=arrays["encoder_weights"],
                   feature_map=UserFeatureMap.from_arrays(arrays, meta["rating_mean"], meta["prior"]),
                   item_ids=list(meta["item_ids"]), item_embeddings=arrays["item_embeddings"])


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
        initial_codes: int64 ``(U, P)``, the untrained control's IDs (the untrained start with as many E-steps), or None.
        random_step_codes: int64 ``(U, P)``, the random-direction control's IDs, or None.
        summaries: float32 ``(U, k)`` or None.
        offsets: float32 ``(U, P, D)`` or None.
        projections: per profile float32 ``(D, k)`` (the whitened metric's projection) or None.
        encoder: the encoder, or None (the paper's free tokens: no user outside the bank can be assigned).
        metadata: settings, inputs and report (JSON-serialisable).
    """

    fingerprint: str
    profiles: list[str]
    users: list[str]
    codes: np.ndarray
    codebooks: list[np.ndarray]
    no_history_token: str
    initial_codes: np.ndarray | None = None
    random_step_codes: np.ndarray | None = None
    summaries: np.ndarray | None = None
    offsets: np.ndarray | None = None
    projections: list[np.ndarray] | None = None
    encoder: EncoderState | None = None
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

    def codes_for(self, users: list[str]) -> np.ndarray:
        """Vectorised lookup: int64 ``(B, P)``, the IDs of ``users``, ``-1`` for a user the bank does not hold.

        Reads only ``codes`` (``P`` int64 = ``8 P`` bytes per user, plus the user's key), never the summaries or
        offsets."""
        rows = np.fromiter((self._row.get(str(u), -1) for u in users), dtype=np.int64, count=len(users))
        out = np.full((len(users), len(self.profiles)), -1, dtype=np.int64)
        known = rows >= 0
        out[known] = self.codes[rows[known]]
        return out

    def quantise(self, offsets: np.ndarray) -> np.ndarray:
        """Profile IDs int64 ``(B, P)`` of offsets ``(B, P, D)``: each profile's nearest code, in the metric of
        the bank's last E-step (its projection where the quantiser was whitened). A stored user's stored offsets
        give back their stored codes."""
        import torch

        from recbole_uip.inference.codebook import ProfileCodebook

        offsets = np.asarray(offsets, dtype=np.float32)
        if offsets.ndim != 3 or offsets.shape[1] != len(self.profiles):
            raise ValueError(f"offsets must be (B, {len(self.profiles)}, D), got {offsets.shape}.")
        columns = []
        for p, codes in enumerate(self.codebooks):
            codebook = ProfileCodebook(codes.shape[0], codes.shape[1])
            codebook.codes.copy_(torch.from_numpy(np.asarray(codes, dtype=np.float32)))
            if self.projections is not None:
                codebook.use_projection(torch.from_numpy(np.asarray(self.projections[p])))
            columns.append(codebook.assign(torch.from_numpy(offsets[:, p])).numpy())
        return np.stack(columns, axis=1).astype(np.int64) if columns else np.zeros((len(offsets), 0), np.int64)

    def assign(self, histories: list[list[str]], ratings: list[list[float]] | None = None) -> np.ndarray:
        """Profile IDs int64 ``(B, P)`` for ``B`` histories of raw item tokens (with their ratings where the bank's
        text wrote ratings), from the stored encoder and codebooks alone: no LLM, no optimisation. Serves users
        who are not in the bank, and users whose behaviour changed.

        Every item must be one the bank has embedded. With free per-user tokens on, stored users' codes also
        hold their trained free token, which a history alone cannot give: ``assign`` then uses the encoder only.

        Raises:
            BankError: the bank has no encoder (the paper's setting, ``uip_encoder: none``).
            KeyError: naming an item the bank has not embedded.
        """
        return self.quantise(self.require_encoder().offsets(histories, ratings))

    def require_encoder(self) -> EncoderState:
        """The encoder, or :class:`BankError` saying why a bank without one (the paper's setting) cannot assign."""
        if self.encoder is None:
            raise BankError("This bank has no encoder (uip_encoder: none, the paper's free per-user tokens): only the "
                            "users it was inferred for have IDs. Infer with uip_encoder: linear to assign new users.")
        return self.encoder

    def save(self, folder: str | Path) -> Path:
        """Write ``bank.npz`` then ``bank.json`` (which holds the npz checksum), each atomically: a failed write
        (a full disk) leaves no complete-looking bank, and raises :class:`OutputWriteError` saying so."""
        folder = Path(folder)
        try:
            return self._save(folder)
        except OSError as error:
            if isinstance(error, OutputWriteError):
                raise
            raise OutputWriteError(error.errno, f"Writing the feature bank to {folder} failed ({error.strerror or error}); "
                                                f"nothing was published: the previous complete folder, if any, is "
                                                f"unchanged. Free some space or choose another uip_output_dir.") from error

    def _save(self, folder: Path) -> Path:
        arrays = {"codes": self.codes.astype(np.int64)}
        for name in CONTROL_CODES:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name).astype(np.int64)
        for name, codebook in zip(self.profiles, self.codebooks):
            arrays[f"codebook_{name}"] = codebook.astype(np.float32)
        if self.summaries is not None:
            arrays["summaries"] = self.summaries.astype(np.float32)
        if self.offsets is not None:
            arrays["offsets"] = self.offsets.astype(np.float32)
        for name, projection in zip(self.profiles, self.projections or []):
            arrays[f"projection_{name}"] = projection.astype(np.float32)
        if self.encoder is not None:
            arrays.update({k: np.asarray(v, dtype=np.float32) for k, v in self.encoder.arrays().items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with atomic_write(folder / "bank.npz", "wb") as handle:
            handle.write(buffer.getvalue())
        fault_point("bank_write")
        write_json_atomic(folder / "bank.json", {
            "format_version": BANK_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "profiles": self.profiles,
            "users": self.users,
            "no_history_token": self.no_history_token,
            "encoder": None if self.encoder is None else self.encoder.meta(),
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
            raise BankError(f"{meta_path} has format version {meta.get('format_version')}, expected {BANK_FORMAT_VERSION} "
                            f"(a bank of an earlier recbole-uip: infer the profiles again).")
        if sha256_file(npz_path) != meta["npz_sha256"]:
            raise BankError(f"{npz_path} does not match the checksum in bank.json (corrupted or partly written).")
        with np.load(npz_path) as arrays:
            optional = {key: arrays[key] if key in arrays else None
                        for key in (*CONTROL_CODES, "summaries", "offsets")}
            return cls(
                fingerprint=meta["fingerprint"],
                profiles=list(meta["profiles"]),
                users=list(meta["users"]),
                codes=arrays["codes"],
                codebooks=[arrays[f"codebook_{name}"] for name in meta["profiles"]],
                no_history_token=meta["no_history_token"],
                projections=[arrays[f"projection_{name}"] for name in meta["profiles"]]
                if f"projection_{meta['profiles'][0]}" in arrays else None,
                encoder=None if meta.get("encoder") is None else EncoderState.load(arrays, meta["encoder"]),
                metadata=meta.get("metadata", {}),
                **optional,
            )
