"""Per-user soft tokens, their optimiser, and the loss of a batch through the frozen LLM.

Parameterisation (a documented departure from the paper, chosen from measurements; see README, "Method"):

    s[u, p] = anchor[p] + b[p] + W[p] @ z[u] + r[u, p]

* ``anchor[p]`` (fixed): mean input embedding of profile ``p``'s phrase, so every soft token starts at a
  meaningful point of the LLM's embedding space rather than noise.
* ``b[p]`` (trained, shared): the shift every user needs (e.g. "this prompt lists movies"). Without it each
  user's residual has to learn the same shift on its own, at its own pace, and the codebooks then cluster how
  far each user got instead of what distinguishes users. It is excluded from what is quantised.
* ``z[u]`` (fixed): the user's behaviour text summarised by one forward-only pass of the frozen LLM (mean of the
  last hidden states), standardised over users.
* ``W[p]`` (trained, shared): an amortised encoder. The paper learns each user's soft token independently;
  with a few passes over the data each user then gets only a few optimiser steps, and a faithful run gave
  IDs no better than random (brief, section 6). A shared map is updated by every batch, so all users move
  together and a new user can be folded in by ``W[p] @ z[new]`` without training.
* ``r[u, p]`` (trained, per user, starts at zero): the paper's free per-user token, refined by plain per-row SGD
  (:class:`RowSGD`, the default: steps proportional to the gradient) or by :class:`RowAdam` (per-user step
  counts and bias correction). Measured on ml-100k, Adam's sign-like first steps swamped the user information.

Everything per user lives in rows of ``summaries`` and ``residual``: sharding users across ranks or resuming
from a checkpoint only needs those rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_uip.inference.prompt import IGNORE_INDEX, PromptBatch, PromptLayout, additive_mask


class SoftProfiles(nn.Module):
    """Soft tokens ``s (U, P, D)`` for ``U`` users and ``P`` profiles in the LLM's embedding space ``D``.

    Args:
        anchors: ``(P, D)`` phrase embeddings (buffer).
        summaries: ``(U, H)`` standardised user summaries (buffer).
        init_offset_norm: expected norm of ``W[p] @ z[u]`` at start; ``W[p]`` starts as a scaled random
            orthogonal map, so users start apart in proportion to how their texts differ.
        generator: for the initial ``W``.
    """

    def __init__(self, anchors: torch.Tensor, summaries: torch.Tensor, init_offset_norm: float, generator: torch.Generator):
        super().__init__()
        num_profiles, dim = anchors.shape
        num_users, hidden = summaries.shape
        self.register_buffer("anchors", anchors.float().clone())
        self.register_buffer("summaries", summaries.float().clone())
        # Orthonormal columns (or rows): ||Q z|| ~ sqrt(min(D, H)) for z ~ N(0, I_H); rescale to init_offset_norm.
        scale = init_offset_norm / math.sqrt(min(dim, hidden))
        weights = torch.empty(num_profiles, dim, hidden)
        for p in range(num_profiles):
            q, _ = torch.linalg.qr(torch.randn(max(dim, hidden), min(dim, hidden), generator=generator))
            weights[p] = (q if dim >= hidden else q.T) * scale
        self.shared = nn.Parameter(torch.zeros(num_profiles, dim))              # (P, D)
        self.encoder = nn.Parameter(weights)                                 # (P, D, H)
        self.residual = nn.Parameter(torch.zeros(num_users, num_profiles, dim))  # (U, P, D)

    @property
    def num_users(self) -> int:
        return self.residual.shape[0]

    def offsets(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """User-specific part ``W[p] z[u] + r[u, p]``, shape ``(B, P, D)`` (all users if ``users`` is None).

        This is what the codebooks quantise: anchor and shared shift are the same for all users.
        """
        z = self.summaries if users is None else self.summaries[users]
        r = self.residual if users is None else self.residual[users]
        return torch.einsum("pdh,bh->bpd", self.encoder, z) + r

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        """Soft tokens of ``users`` (LongTensor ``(B,)``): ``(B, P, D)``."""
        return self.center()[None] + self.offsets(users)

    def center(self) -> torch.Tensor:
        """``(P, D)``: the part of every user's soft token that is shared, ``anchor + b``."""
        return self.anchors + self.shared


class RowAdam:
    """Adam over the rows of a per-user parameter, with one step count per row.

    ``torch.optim.SparseAdam`` keeps a single global step count while each row's moments start at zero, so a
    row first touched at global step 500 gets a bias correction meant for step 500: its first update is
    wrongly scaled (brief, section 6). Here ``step[u]`` counts the updates of row ``u`` only.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.step_count = torch.zeros(param.shape[0], dtype=torch.long, device=param.device)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad_scale: float = 1.0) -> None:
        """Update ``param[rows]`` from ``grad_scale * param.grad[rows]``; ``rows`` must be unique.

        (Adam is invariant to the gradient's scale up to ``eps``; the argument keeps one interface with RowSGD.)
        """
        beta1, beta2 = self.betas
        grad = self.param.grad[rows] * grad_scale
        self.step_count[rows] += 1
        steps = self.step_count[rows].to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        m = self.exp_avg[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        m_hat = m / (1 - beta1**steps)
        v_hat = v / (1 - beta2**steps)
        self.param[rows] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step_count": self.step_count}


class RowSGD:
    """Plain SGD over the rows of a per-user parameter: ``param[rows] -= lr * grad[rows]``.

    Stateless, so trivially correct per user (and per rank when users are sharded). Unlike Adam, whose first
    steps are sign-like (every coordinate moves by ``lr`` whatever its gradient), a step here is proportional
    to the gradient: coordinates the LLM barely cares about barely move. With only a few visits per user, sign-
    like steps add a large random pattern to every soft token, which the codebooks then cluster (measured: see
    README, "Method"). ``grad_scale`` undoes the ``1/B`` of a batch-mean loss, so ``lr`` does not depend on the
    batch size.
    """

    def __init__(self, param: torch.Tensor, lr: float):
        self.param, self.lr = param, lr

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad_scale: float = 1.0) -> None:
        self.param[rows] -= self.lr * grad_scale * self.param.grad[rows]

    def state_dict(self) -> dict:
        return {}


def behaviour_nll(llm_model: nn.Module, layout: PromptLayout, batch: PromptBatch, soft_tokens: torch.Tensor,
                  weighted: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-user mean NLL (nats/token) of the behaviour tokens given the soft tokens.

    Args:
        llm_model: the frozen causal LM.
        batch: prompts of ``B`` users (input ids ``(B, L)``).
        soft_tokens: ``(B, P, D)`` float; placed at ``layout.soft_positions``.
        weighted: with ``batch.weights``, also return the weighted mean ``sum_t w_t nll_t / sum_t w_t``.

    Returns:
        ``(B,)`` NLL per user (every behaviour token counts once); with ``weighted``, the pair
        ``(plain, weighted)``. Differentiable with respect to ``soft_tokens`` only.
    """
    embedding = llm_model.get_input_embeddings()
    device, dtype = embedding.weight.device, embedding.weight.dtype
    input_ids = batch.input_ids.to(device)
    embeds = embedding(input_ids)                                              # (B, L, D), no grad (frozen)
    b = torch.arange(input_ids.shape[0], device=device)[:, None]
    embeds = embeds.index_put((b, layout.soft_positions.to(device)[None, :]), soft_tokens.to(dtype))
    mask = additive_mask(batch.allowed, dtype).to(device)
    logits = llm_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # (B, L, V)
    labels = batch.labels.to(device)
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    token_nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shifted_labels.shape)
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    plain = token_nll.sum(dim=1) / counts
    if not weighted:
        return plain
    if batch.weights is None:
        return plain, plain
    weights = batch.weights[:, 1:].to(token_nll.device)
    return plain, (token_nll * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-12)
