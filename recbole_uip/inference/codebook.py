"""The quantiser: one codebook per profile, fitted by k-means on all users' soft-token offsets.

Formulation (compared with the paper and the authors' code, see README "Method"):

* E-step: each user's offset ``x[u] (D,)`` is assigned its nearest code; codes are then moved to the mean of
  their users (Lloyd), warm-started from the previous E-step; the first E-step starts from k-means++.
* Dead codes are restarted at a user far from its current code (sampled with probability proportional to
  the squared distance, as in k-means++), so a codebook never wastes entries. A code counts as dead when it
  holds fewer than a tenth of a uniform share of the users (``N / (10 K)``, at least one): on ml-100k a code
  holding a single user was as useless downstream as an empty one.
* M-step: the soft tokens receive a commitment term ``beta * ||x[u] - sg(c[k(u)])||^2 / sigma^2`` next to the
  LLM's NLL (``sigma^2``: mean squared offset norm, making ``beta`` scale-free). The codes are not trained by
  gradient: Lloyd's mean update is the exact minimiser of the codebook term for fixed assignments.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class CodebookHealth:
    """Usage statistics of one codebook after an E-step."""

    usage: list[int]          # users per code, length K
    perplexity: float         # exp(entropy of usage); K when uniform, 1 when collapsed
    dead_codes: int           # codes below the minimum usage before the first restart
    restarted: int            # codes restarted in this E-step


class ProfileCodebook(nn.Module):
    """``K`` codes of dimension ``D`` for one profile (buffer ``codes (K, D)``)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("codes", torch.zeros(size, dim))
        self.register_buffer("initialised", torch.tensor(False))

    @property
    def size(self) -> int:
        return self.codes.shape[0]

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code of each row of ``x (N, D)``: LongTensor ``(N,)`` (ties go to the lowest index)."""
        return torch.cdist(x.float(), self.codes).argmin(dim=1)

    @torch.no_grad()
    def kmeans_plus_plus(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Seed the codes from ``x (N, D)`` by k-means++ (deterministic given ``generator``)."""
        x = x.float()
        n = x.shape[0]
        first = int(torch.randint(n, (1,), generator=generator))
        chosen = [first]
        dist2 = ((x - x[first]) ** 2).sum(dim=1)
        for _ in range(1, self.size):
            if float(dist2.sum()) <= 0:
                index = int(torch.randint(n, (1,), generator=generator))
            else:
                index = int(torch.multinomial(dist2 / dist2.sum(), 1, generator=generator))
            chosen.append(index)
            dist2 = torch.minimum(dist2, ((x - x[index]) ** 2).sum(dim=1))
        self.codes.copy_(x[chosen])
        self.initialised.fill_(True)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, CodebookHealth]:
        """One E-step: Lloyd iterations on ``x (N, D)`` with dead-code restart. Returns assignments ``(N,)``."""
        x = x.float()
        if not bool(self.initialised):
            self.kmeans_plus_plus(x, generator)
        dead_before = None
        restarted = 0
        min_usage = max(1, x.shape[0] // (10 * self.size))
        for iteration in range(iterations):
            assignment = self.assign(x)
            counts = torch.bincount(assignment, minlength=self.size)
            if dead_before is None:
                dead_before = int((counts < min_usage).sum())
            sums = torch.zeros_like(self.codes).index_add_(0, assignment, x)
            nonempty = counts > 0
            self.codes[nonempty] = sums[nonempty] / counts[nonempty, None].float()
            dead = counts < min_usage
            if dead.any() and iteration < iterations - 1:  # the last iteration only settles the means
                restarted += self._restart_dead(x, assignment, dead, generator)
        assignment = self.assign(x)
        counts = torch.bincount(assignment, minlength=self.size)
        return assignment, CodebookHealth(
            usage=counts.tolist(), perplexity=perplexity(counts), dead_codes=dead_before or 0, restarted=restarted
        )

    def _restart_dead(self, x, assignment, dead, generator) -> int:
        """Move each dead code onto a user sampled in proportion to its squared distance to its own code."""
        dist2 = ((x - self.codes[assignment]) ** 2).sum(dim=1)
        indices = dead.nonzero().flatten().tolist()
        for code in indices:
            if float(dist2.sum()) <= 0:
                break
            user = int(torch.multinomial(dist2 / dist2.sum(), 1, generator=generator))
            self.codes[code] = x[user]
            dist2[user] = 0.0
        return len(indices)

    def commitment(self, x: torch.Tensor, assignment: torch.Tensor, scale: float) -> torch.Tensor:
        """``mean_b ||x[b] - sg(codes[assignment[b]])||^2 / scale`` for ``x (B, D)``: a scalar."""
        target = self.codes[assignment].detach().to(x.dtype)
        return ((x - target) ** 2).sum(dim=1).mean() / scale


def perplexity(counts: torch.Tensor) -> float:
    """``exp(H(usage))`` of a code-usage histogram."""
    probs = counts.float() / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float(math.exp(float(entropy)))
