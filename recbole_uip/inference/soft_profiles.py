"""Soft profile tokens, the per-user free tokens and their row optimisers, and the loss through the frozen LLM.

Parameterisation (``uip_encoder``; see docs/method.md)::

    s[u, p] = anchor[p] + b[p] + A[p] @ z[u]  (+ r[u, p] with uip_free_tokens)     linear (default)
    s[u, p] = anchor[p] + b[p] + r[u, p]                                             none (the paper)

* ``anchor[p]`` (fixed): mean input embedding of profile ``p``'s phrase.
* ``b[p]`` (shared, trained by Adam): the shift every user needs (how the behaviour text is written). It is not
  quantised: codes describe how users differ.
* ``A[p] (D, k)`` (shared): the amortised encoder from the user vector ``z[u]`` (:mod:`user_features`) to the
  user's offset. A departure from the paper: the paper learns each user's token from scratch, which, with the few
  optimiser steps per user a budget allows, learned nothing that generalised (measured: docs/method.md). ``A``
  is updated by every user of a round, and a new user needs only ``z``.
* ``r[u, p]`` (:class:`FreeTokens`): the paper's free per-user token; optional on top of the encoder. Updated
  row by row: a step touches the rows of its batch only, so it costs the same at 1k or 1M users.

Trainable parameters, their gradients and optimiser states are float32 whatever dtype the LLM runs in; the soft
tokens are cast to the LLM's dtype only where they enter it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_uip.inference.deep_prefix import prefix_inputs
from recbole_uip.inference.prompt import IGNORE_INDEX, PromptBatch, PromptLayout, additive_mask


class SoftProfiles(nn.Module):
    """Shared parts of the soft tokens of ``P`` profiles in the LLM's embedding space ``D``.

    Args:
        anchors: ``(P, D)`` phrase embeddings (buffer).
        encoder_dims: ``k``, the size of the user vector ``z``; 0 for no encoder (the paper's setting).
        init_offset_norm: expected norm of ``A[p] z`` at the start for ``z ~ N(0, I_k)``; ``A[p]`` starts as a
            scaled random map with orthonormal columns, so users start apart in proportion to how their
            vectors differ, and the first E-step quantises an untrained starting point.
        generator: for the initial ``A``.
    """

    def __init__(self, anchors: torch.Tensor, encoder_dims: int, init_offset_norm: float, generator: torch.Generator):
        super().__init__()
        num_profiles, dim = anchors.shape
        self.register_buffer("anchors", anchors.float().clone())
        self.shared = nn.Parameter(torch.zeros(num_profiles, dim))                       # (P, D)
        if encoder_dims:
            scale = init_offset_norm / math.sqrt(min(dim, encoder_dims))
            weights = torch.empty(num_profiles, dim, encoder_dims)
            for p in range(num_profiles):
                q, _ = torch.linalg.qr(torch.randn(max(dim, encoder_dims), min(dim, encoder_dims), generator=generator))
                weights[p] = (q if dim >= encoder_dims else q.T) * scale
            self.encoder = nn.Parameter(weights)                                         # (P, D, k)
        else:
            self.register_parameter("encoder", None)

    @property
    def num_profiles(self) -> int:
        return self.anchors.shape[0]

    def center(self) -> torch.Tensor:
        """``(P, D)``: the part of every user's soft token that is shared, ``anchor + b``."""
        return self.anchors + self.shared

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """User offsets ``A[p] z[b]``: ``(B, P, D)`` from ``z (B, k)`` (zeros without an encoder)."""
        if self.encoder is None:
            return torch.zeros(z.shape[0], *self.anchors.shape, device=self.anchors.device)
        return torch.einsum("pdk,bk->bpd", self.encoder, z.to(self.encoder.device))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        """Soft tokens ``(B, P, D)`` from user offsets ``(B, P, D)``."""
        return self.center()[None] + offsets


def batch_centred_map(equation: str, weights: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``einsum(equation, weights, z)`` for a batch's user vectors ``z (B, k)``, with the same values but gradient
    into ``weights`` only through ``z - mean_b z``: ``weights @ mean_b z`` is held fixed, so an encoder learns how
    users *differ* (the covariance of their gradients with their ``z``), and what the whole batch needs goes to the
    shared part beside it. ``equation`` maps ``weights`` (ending in ``k``) and ``z`` to the batch's outputs."""
    mean = z.mean(0, keepdim=True)
    return torch.einsum(equation, weights, z - mean) + torch.einsum(equation, weights.detach(), mean)


class FreeTokens:
    """Per-user free offsets ``r (U, P, D)``, float32, updated only in the rows of a batch.

    The table is a plain tensor, not a parameter: a step gathers its rows into a leaf tensor (:meth:`rows`), the
    loss back-propagates into that ``(B, P, D)`` leaf only, and :meth:`step` writes the update back into those rows.
    No gradient, optimiser state or update ever touches another user's row.

    ``optimizer``: ``adam``, with one step count per row (``torch.optim.SparseAdam`` keeps one global step count,
    so a row first touched at step 500 gets the bias correction of step 500: brief, section 6), or ``sgd``
    (steps proportional to the gradient).
    """

    def __init__(self, table: torch.Tensor, optimizer: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {optimizer!r}.")
        self.table = table.float().clone()
        self.optimizer, self.lr, self.betas, self.eps = optimizer, lr, betas, eps
        if optimizer == "adam":
            self.exp_avg = torch.zeros_like(self.table)
            self.exp_avg_sq = torch.zeros_like(self.table)
            self.step_count = torch.zeros(self.table.shape[0], dtype=torch.long)

    def rows(self, users: torch.Tensor) -> torch.Tensor:
        """A leaf copy ``(B, P, D)`` of the rows of ``users`` (unique), to back-propagate into."""
        return self.table[users].clone().requires_grad_(True)

    @torch.no_grad()
    def step(self, users: torch.Tensor, rows: torch.Tensor, grad_scale: float = 1.0) -> None:
        """Update ``table[users]`` from ``grad_scale * rows.grad`` (``rows`` from :meth:`rows` for ``users``).

        ``grad_scale`` undoes the ``1/B`` of a batch-mean loss, so each row follows its own user's gradient."""
        grad = rows.grad.float() * grad_scale
        if self.optimizer == "sgd":
            self.table[users] = rows.detach() - self.lr * grad
            return
        beta1, beta2 = self.betas
        self.step_count[users] += 1
        steps = self.step_count[users].to(torch.float64).view(-1, *([1] * (grad.dim() - 1)))
        m = self.exp_avg[users].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.exp_avg_sq[users].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg[users], self.exp_avg_sq[users] = m, v
        m_hat = m / (1 - beta1 ** steps).float()
        v_hat = v / (1 - beta2 ** steps).float()
        self.table[users] = rows.detach() - self.lr * m_hat / (v_hat.sqrt() + self.eps)


def behaviour_logits(llm_model: nn.Module, layout: PromptLayout, batch: PromptBatch, soft_tokens: torch.Tensor,
                     hide_profiles: bool = False, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen LLM's next-token logits over the prompts with the soft tokens in place: one forward pass.

    Args:
        llm_model: the frozen causal LM.
        batch: prompts of ``B`` users (input ids ``(B, L)``).
        soft_tokens: ``(B, P, D)`` float; placed at ``layout.soft_positions``.
        hide_profiles: no later position sees the soft tokens (the "no profile tokens" reference).
        prefix: ``(B, N, 2, H, m, d)`` keys and values read before the prompt at every layer (a deep prompt,
            :mod:`~recbole_uip.inference.deep_prefix`), or None.

    Returns:
        ``(B, L, V)`` in the LLM's dtype: position ``t`` predicts token ``t + 1``. Differentiable with respect to
        ``soft_tokens`` and ``prefix`` only.
    """
    embedding = llm_model.get_input_embeddings()
    device, dtype = embedding.weight.device, embedding.weight.dtype
    input_ids = batch.input_ids.to(device)
    embeds = embedding(input_ids)                                              # (B, L, D), no grad (frozen)
    b = torch.arange(input_ids.shape[0], device=device)[:, None]
    positions = layout.soft_positions.to(device)
    embeds = embeds.index_put((b, positions[None, :]), soft_tokens.to(device, dtype))
    allowed = batch.allowed
    if hide_profiles:
        allowed = allowed.clone()
        allowed[:, :, layout.soft_positions] = False
        allowed[:, layout.soft_positions, layout.soft_positions] = True   # each sees itself: no empty softmax row
    mask = additive_mask(allowed, dtype).to(device)
    inputs = {"attention_mask": mask} if prefix is None else prefix_inputs(llm_model, prefix, mask)
    return llm_model(inputs_embeds=embeds, use_cache=False, **inputs).logits


def behaviour_token_nll(llm_model: nn.Module, layout: PromptLayout, batch: PromptBatch, soft_tokens: torch.Tensor,
                        hide_profiles: bool = False, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The NLL of each next token of the behaviour text given the soft tokens: one forward pass of the frozen LLM
    (:func:`behaviour_logits`, same arguments).

    Returns:
        float32 ``(B, L - 1)``: position ``t`` holds the NLL of ``labels[:, t + 1]`` (0 where that label is ignored).
        Differentiable with respect to ``soft_tokens`` and ``prefix`` only.
    """
    shifted_logits = behaviour_logits(llm_model, layout, batch, soft_tokens, hide_profiles, prefix)[:, :-1].float()
    shifted_labels = batch.labels.to(shifted_logits.device)[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shifted_labels.shape)


def soft_target_nll(llm_model: nn.Module, layout: PromptLayout, batch: PromptBatch, soft_tokens: torch.Tensor,
                    teacher: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Per-user mean cross-entropy ``-sum_v q_t(v) log p_t(v)`` of the student's next-token distributions ``p`` (the
    soft tokens, the behaviour text) against a teacher's ``q`` at each behaviour token: distillation, whose gradient
    is the KL divergence's (the teacher's entropy is a constant).

    Args:
        teacher: float ``(B, L - 1, V)`` probabilities aligned with :func:`behaviour_token_nll`'s positions
            (position ``t`` predicts ``labels[:, t + 1]``; rows where that label is ignored are not counted).
        prefix: as :func:`behaviour_logits`'.

    Returns:
        float32 ``(B,)``; differentiable with respect to ``soft_tokens`` and ``prefix`` only.
    """
    logits = behaviour_logits(llm_model, layout, batch, soft_tokens, prefix=prefix)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_ce = -(teacher.to(logp.device) * logp).sum(-1)                      # (B, L - 1)
    scored = (batch.labels[:, 1:] != IGNORE_INDEX).to(logp.device)
    return (token_ce * scored).sum(1) / scored.sum(1).clamp(min=1)


def weighted_token_mean(token_nll: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-user ``sum_t w_t nll_t / sum_t w_t`` of ``token_nll (B, L - 1)`` (from
    :func:`behaviour_token_nll`) under a batch's token weights ``(B, L)`` (0 where a token does not count)."""
    weights = weights[:, 1:].to(token_nll.device)
    return (token_nll * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-12)


def token_mean(token_nll: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` per-user mean of ``token_nll (B, L - 1)`` over the behaviour tokens of ``labels (B, L)``, every
    token counted once (0 for a text without any)."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(token_nll.device)
    return token_nll.sum(dim=1) / counts


def behaviour_nll(llm_model: nn.Module, layout: PromptLayout, batch: PromptBatch, soft_tokens: torch.Tensor,
                  weighted: bool = False, hide_profiles: bool = False,
                  prefix: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-user mean NLL (nats/token) of the behaviour tokens given the soft tokens.

    Args:
        llm_model: the frozen causal LM.
        batch: prompts of ``B`` users (input ids ``(B, L)``).
        soft_tokens: ``(B, P, D)`` float; placed at ``layout.soft_positions``.
        weighted: with ``batch.weights``, also return the weighted mean ``sum_t w_t nll_t / sum_t w_t``.
        hide_profiles: no later position sees the soft tokens (the "no profile tokens" reference).
        prefix: as :func:`behaviour_logits`'.

    Returns:
        ``(B,)`` NLL per user (every behaviour token counts once); with ``weighted``, the pair
        ``(plain, weighted)``. Differentiable with respect to ``soft_tokens`` and ``prefix`` only.
    """
    token_nll = behaviour_token_nll(llm_model, layout, batch, soft_tokens, hide_profiles, prefix)
    plain = token_mean(token_nll, batch.labels)
    if not weighted:
        return plain
    if batch.weights is None:
        return plain, plain
    return plain, weighted_token_mean(token_nll, batch.weights)
