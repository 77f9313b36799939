"""The quantiser: one codebook per profile, fitted by k-means on all users' soft-token offsets.

Formulation (compared with the paper and the authors' code, see docs/method.md):

* E-step: each user's offset ``x[u] (D,)`` is assigned its nearest code; codes are then moved to the mean of
  their users (Lloyd), warm-started from the previous E-step; the first E-step starts from k-means++.
* Dead codes are restarted at a user far from its current code (sampled with probability proportional to
  the squared distance, as in k-means++), so a codebook never wastes entries. A code counts as dead when it
  holds fewer than a tenth of a uniform share of the users (``N / (10 K)``, at least one): on ml-100k a code
  holding a single user was as useless downstream as an empty one.
* M-step: the soft tokens receive a commitment term ``beta * ||x[u] - sg(c[k(u)])||^2 / sigma^2`` next to the
  LLM's NLL (``sigma^2``: mean squared offset norm, making ``beta`` scale-free). The codes are not trained by
  gradient: Lloyd's mean update is the exact minimiser of the codebook term for fixed assignments.
* Metric (``uip_quantiser_metric``). ``euclidean`` (the default, the paper's quantiser) measures distances in
  the embedding space: with the trained encoder, the directions in which the LLM found users to differ usefully
  are the long ones. ``whitened`` (opt-in) measures every distance of the E-step (assignment, k-means++,
  dead-code restart) and of the commitment term between projected points ``(x - c) A`` with ``A (D, k)`` the
  offsets' top-``k`` principal directions, each scaled to unit variance over users, refitted at every E-step.
  Whitening is blind to any invertible linear map of the offsets, so to what a linear encoder learned: with
  ``uip_encoder: linear`` its IDs are those of the untrained start (measured: docs/method.md).

  Codes stay in the embedding space as the mean offset of their users (the projection is linear, so Lloyd's
  update is unchanged).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from recbole_uip.config import QUANTISER_METRICS
from recbole_uip.inference.distributed import Communicator, row_from_owner, sample_index, uniform_index


@dataclasses.dataclass(frozen=True)
class CodebookHealth:
    """Usage statistics of one codebook after an E-step."""

    usage: list[int]          # users per code, length K
    perplexity: float         # exp(entropy of usage); K when uniform, 1 when collapsed
    dead_codes: int           # codes below the minimum usage before the first restart
    restarted: int            # codes restarted in this E-step
    projection_share: float | None = None  # whitened: the kept directions' share of the variance (None: plain)


class ProfileCodebook(nn.Module):
    """``K`` codes of dimension ``D`` for one profile (buffer ``codes (K, D)``).

    ``metric`` (see module docstring): ``euclidean`` measures distances in the embedding space; ``whitened`` after
    the projection ``projection (D, k)`` (a buffer; ``components = k``, 0 for every direction), refitted at every
    :meth:`fit`.
    """

    def __init__(self, size: int, dim: int, metric: str = "euclidean", components: int = 0):
        super().__init__()
        if metric not in QUANTISER_METRICS:
            raise ValueError(f"metric must be one of {', '.join(QUANTISER_METRICS)}, got {metric!r}.")
        if components < 0:
            raise ValueError(f"components must be >= 0 (0: every direction), got {components}.")
        self.metric, self.components = metric, components
        self.register_buffer("codes", torch.zeros(size, dim))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("projection", None)  # (D, k) once fitted; None: plain distances
        self.projection_share: float | None = None  # share of the variance the k directions hold

    @property
    def size(self) -> int:
        return self.codes.shape[0]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., D)`` in the quantiser's metric: ``x @ A`` ``(..., k)`` once a projection is set, else ``x``."""
        return x if self.projection is None else x @ self.projection.to(x.dtype)

    @torch.no_grad()
    def use_projection(self, projection: torch.Tensor) -> None:
        """Measure distances after a given ``projection (D, k)``, e.g. the one a feature bank stored for its final
        E-step, to assign new offsets (fold-in) or quantise stored ones again in the bank's metric. A
        ``euclidean`` codebook then keeps it through :meth:`fit`; ``whitened`` refits it there."""
        projection = torch.as_tensor(projection, dtype=torch.float32)
        if projection.dim() != 2 or projection.shape[0] != self.codes.shape[1]:
            raise ValueError(f"projection must be (D, k) with D = {self.codes.shape[1]}, got {tuple(projection.shape)}.")
        self.projection = projection.to(self.codes.device)
        self.projection_share = None

    def _rank(self, available: int) -> int:
        return available if self.components == 0 else min(self.components, available)

    @torch.no_grad()
    def fit_whitening(self, x: torch.Tensor, comm: Communicator | None = None) -> None:
        """``whitened``: ``A (D, k)`` from ``x (N, D)``, the top-``k`` principal directions of the centred rows
        divided by their standard deviation over rows, so ``(x - mean) A`` has unit variance per column. ``k`` is
        capped at ``min(N - 1, D)`` (directions with variance). With ``comm``, ``x`` is this rank's block of the
        rows: the mean and the covariance are summed over the ranks (an eigendecomposition of the ``(D, D)``
        covariance, not an SVD of the rows, so no rank needs every row)."""
        comm = comm or Communicator()
        x = x.double()
        n = comm.count(x.shape[0])
        mean = comm.sum(x.sum(0)) / max(n, 1)
        centred = x - mean
        variance, directions = torch.linalg.eigh(comm.sum(centred.T @ centred))       # ascending, (D,), (D, D)
        variance, directions = variance.flip(0).clamp(min=0), directions.flip(1)
        k = self._rank(min(n - 1, x.shape[1]))
        std = (variance[:k] / max(n - 1, 1)).sqrt().clamp(min=1e-12)
        self.projection = (directions[:, :k] / std).float()
        total = float(variance.sum())
        self.projection_share = float(variance[:k].sum()) / total if total > 0 else 0.0

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code of each row of ``x (N, D)``: LongTensor ``(N,)`` (ties go to the lowest index)."""
        return torch.cdist(self.project(x.float()), self.project(self.codes)).argmin(dim=1)

    @torch.no_grad()
    def kmeans_plus_plus(self, x: torch.Tensor, generator: torch.Generator, comm: Communicator | None = None) -> None:
        """Seed the codes from ``x (N, D)`` by k-means++ (deterministic given ``generator``; with ``comm``, ``x`` is
        this rank's block and every rank picks the same rows)."""
        comm = comm or Communicator()
        x = x.float()
        y = self.project(x)  # distances in the quantiser's metric; the codes are rows of x
        n = comm.count(x.shape[0])
        codes = [row_from_owner(x, *comm.locate(uniform_index(n, generator), n), comm)]
        dist2 = ((y - self.project(codes[0])) ** 2).sum(dim=1)
        for _ in range(1, self.size):
            owner, row = sample_index(dist2, generator, comm)
            if owner < 0:                                        # every row sits on a code: any row
                owner, row = comm.locate(uniform_index(n, generator), n)
            codes.append(row_from_owner(x, owner, row, comm))
            dist2 = torch.minimum(dist2, ((y - self.project(codes[-1])) ** 2).sum(dim=1))
        self.codes.copy_(torch.stack(codes))
        self.initialised.fill_(True)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, iterations: int, generator: torch.Generator,
            comm: Communicator | None = None) -> tuple[torch.Tensor, CodebookHealth]:
        """One E-step: Lloyd iterations on ``x (N, D)`` with dead-code restart. Returns assignments ``(N,)``.

        With the ``whitened`` metric the projection is refitted to ``x`` first; the codes (in the embedding space)
        carry over from the previous E-step. With ``comm``, ``x`` is this rank's block of the rows and the
        assignments are this block's; the codes' sums and counts are summed over the ranks, so every rank ends
        with the same codebook (the health counts every rank's rows)."""
        comm = comm or Communicator()
        x = x.float()
        if self.metric == "whitened":
            self.fit_whitening(x, comm)
        if not bool(self.initialised):
            self.kmeans_plus_plus(x, generator, comm)
        n = comm.count(x.shape[0])
        dead_before = None
        restarted = 0
        min_usage = max(1, n // (10 * self.size))
        for iteration in range(iterations):
            assignment = self.assign(x)
            counts = comm.sum(torch.bincount(assignment, minlength=self.size))
            if dead_before is None:
                dead_before = int((counts < min_usage).sum())
            sums = comm.sum(torch.zeros_like(self.codes).index_add_(0, assignment, x))
            nonempty = counts > 0
            self.codes[nonempty] = sums[nonempty] / counts[nonempty, None].float()
            dead = counts < min_usage
            if dead.any() and iteration < iterations - 1:  # the last iteration only settles the means
                restarted += self._restart_dead(x, assignment, dead, generator, comm)
        assignment = self.assign(x)
        counts = comm.sum(torch.bincount(assignment, minlength=self.size))
        return assignment, CodebookHealth(
            usage=counts.tolist(), perplexity=perplexity(counts), dead_codes=dead_before or 0, restarted=restarted,
            projection_share=self.projection_share if self.projection is not None else None,
        )

    def _restart_dead(self, x, assignment, dead, generator, comm: Communicator) -> int:
        """Move each dead code onto a user sampled in proportion to its squared distance to its own code."""
        dist2 = ((self.project(x - self.codes[assignment])) ** 2).sum(dim=1)
        indices = dead.nonzero().flatten().tolist()
        for code in indices:
            owner, row = sample_index(dist2, generator, comm)
            if owner < 0:
                break
            self.codes[code] = row_from_owner(x, owner, row, comm)
            if owner == comm.rank:
                dist2[row] = 0.0
        return len(indices)

    def commitment(self, x: torch.Tensor, assignment: torch.Tensor, scale: float) -> torch.Tensor:
        """``mean_b ||(x[b] - sg(codes[assignment[b]])) A||^2 / scale`` for ``x (B, D)``: a scalar (``A``: the
        metric's projection, fixed during the M-step; the identity for plain distances)."""
        return self._squared_distances(x, assignment).mean() / scale

    def commitment_per_row(self, x: torch.Tensor, assignment: torch.Tensor, scale: float) -> torch.Tensor:
        """The terms ``(B,)`` whose mean is :meth:`commitment`."""
        return self._squared_distances(x, assignment) / scale

    def _squared_distances(self, x: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """``||(x[b] - sg(codes[assignment[b]])) A||^2`` ``(B,)``."""
        target = self.codes[assignment].detach().to(x.dtype)
        return (self.project(x - target) ** 2).sum(dim=1)

    def scale(self, x: torch.Tensor, comm: Communicator | None = None) -> float:
        """``sigma^2`` of the commitment term: mean squared norm of the projected rows of ``x (N, D)`` (with
        ``comm``: of every rank's rows)."""
        comm = comm or Communicator()
        squares = (self.project(x.float()).double() ** 2).sum(1)
        total = comm.sum(torch.stack([squares.sum(), torch.tensor(float(len(squares)), dtype=torch.float64)]))
        return max(float(total[0] / total[1].clamp(min=1)), 1e-12)


def perplexity(counts: torch.Tensor) -> float:
    """``exp(H(usage))`` of a code-usage histogram."""
    probs = counts.float() / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return float(math.exp(float(entropy)))
