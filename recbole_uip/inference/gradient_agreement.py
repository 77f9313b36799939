"""Is the encoder's step signal or noise: the split-half agreement of the M-step's gradient, and how many standard
errors its validation gain stands above zero.

The encoder takes one step per round along its gradient accumulated over the whole M-step pass (see
:mod:`recbole_uip.inference.trainer`). Each user's contribution is their gradient at their soft tokens times their
batch-centred ``z``; it holds a part that depends on the user (what the likelihood says users like them need) and
noise (which items were scored this time, where the shared shift stood). The trainer accumulates the pass's odd
batches separately, so the pass gives two independent halves of the same gradient.

For the whole gradient ``G = S + N`` (signal ``S``, noise ``N`` of expected squared norm ``s2``), the halves are
``S/2 + N_1`` and ``S/2 + N_2`` with independent noises of ``s2 / 2`` each, so their cosine is
``c = |S|^2 / (|S|^2 + 2 s2)`` and the share of the whole gradient's squared norm that is signal is
``2c / (1 + c)`` (the Spearman-Brown correction). A cosine near 0 says the step is mostly noise: its direction would
change with another draw of the scored items or another user order. Only the direction matters for the IDs, since
the codebooks quantise ``A z`` up to scale.

Agreement is necessary, not sufficient: whatever both halves share counts as signal, including terms that say
nothing about the users (both halves see the same random start ``A`` and the same trajectory of the shared shift).
Whether the direction helps users the pass did not see is the line search's question
(:func:`recbole_uip.report.best_gain_along_step` says how much it could have at best), and :func:`paired_gain_z`
says whether what it found is more than the validation users' noise (``uip_line_search_min_z`` gates on it).
"""

from __future__ import annotations

import numpy as np
import torch


def _cosine(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Cosine of two tensors flattened; None where either is zero."""
    a, b = first.double().flatten(), second.double().flatten()
    norms = float(a.norm()) * float(b.norm())
    return float(a @ b) / norms if norms > 0 else None


def signal_share(cosine: float | None) -> float | None:
    """``2c / (1 + c)`` clipped below at 0: the estimated share of the whole gradient's squared norm that is signal."""
    if cosine is None:
        return None
    return max(0.0, 2 * cosine / (1 + cosine)) if cosine > -1 else 0.0


def split_half_agreement(first: torch.Tensor, second: torch.Tensor, profile_names: list[str]) -> dict[str, dict]:
    """Per profile, how far two halves of one accumulated encoder gradient agree.

    Args:
        first, second: ``(P, D, k)``, the gradients accumulated over the pass's even and odd batches.
        profile_names: ``P`` names.

    Returns:
        ``{name: {"cosine": c, "signal_share": 2c/(1+c) clipped at 0, "columns": [c_j for each of the k columns of
        z]}}``; a cosine is None where a half is zero (a pass of one batch has no odd half).
    """
    if first.shape != second.shape or first.dim() != 3 or first.shape[0] != len(profile_names):
        raise ValueError(f"split_half_agreement needs two (P, D, k) gradients for {len(profile_names)} profiles, "
                         f"got {tuple(first.shape)} and {tuple(second.shape)}")
    agreement = {}
    for p, name in enumerate(profile_names):
        cosine = _cosine(first[p], second[p])
        agreement[name] = {"cosine": cosine, "signal_share": signal_share(cosine),
                           "columns": [_cosine(first[p, :, j], second[p, :, j]) for j in range(first.shape[2])]}
    return agreement


def paired_gain_z(before: np.ndarray, after: np.ndarray) -> float | None:
    """How many standard errors the mean gain ``before - after`` stands above 0, paired over users.

    Args:
        before, after: ``(V,)``, each validation user's objective at the length 0 and at a candidate length.

    Returns:
        ``mean(d) / (std(d, ddof=1) / sqrt(V))`` for ``d = before - after``; +-inf where every user gains (or loses)
        exactly the same non-zero amount, 0 where no user's objective changed, None for fewer than 2 users.
    """
    diff = np.asarray(before, dtype=np.float64) - np.asarray(after, dtype=np.float64)
    if len(diff) < 2:
        return None
    mean, error = float(diff.mean()), float(diff.std(ddof=1)) / np.sqrt(len(diff))
    if error > 0:
        return mean / error
    return 0.0 if mean == 0 else float(np.copysign(np.inf, mean))


def format_step_z(step, gain_z: dict, best_z) -> str:
    """A line search's z as the round log and the profile report print it: the z of the step taken; where none was
    taken, the z of the best length tried in parentheses (why it was refused); ``-`` where no length beat 0. With
    ``uip_line_search: per_profile`` (``step``, ``gain_z`` and ``best_z`` dicts by profile), one per profile.
    ``gain_z``'s keys are lengths, as floats or (from a bank's JSON history) strings."""
    if isinstance(step, dict):
        return ", ".join(f"{name} {format_step_z(step[name], gain_z.get(name, {}), (best_z or {}).get(name))}"
                         for name in step)
    if step > 0:
        z = {float(length): value for length, value in gain_z.items()}.get(float(step))
        return "-" if z is None else f"{z:.2f}"
    return "-" if best_z is None else f"({best_z:.2f})"
