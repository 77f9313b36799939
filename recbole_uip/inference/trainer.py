"""The EM loop that infers latent profiles: a RecBole-style trainer with ``fit()``.

One EM round (``uip_epochs`` of them):

* **M-step**: one pass over all users in shuffled batches. Loss per batch =
  ``mean_b NLL(behaviour_b | soft tokens_b)  +  beta * sum_p ||offset[b,p] - sg(code[p, k(b,p)])||^2 / sigma_p^2``.
  Only the soft-token parameters receive gradient; the LLM is frozen (asserted).
* **E-step**: over all users, assign each profile offset its nearest code, refit the codebook (Lloyd,
  warm-started), restart dead codes. The last E-step's assignments are the profile IDs.

Before the first round, one forward-only pass of the frozen LLM summarises each user's behaviour text; these
summaries drive the amortised part of the soft tokens (see :mod:`soft_profiles`) and the first E-step.

Every round logs, through RecBole's logger: mean NLL, the per-user NLL change since round 1, how far the soft
tokens moved, and per profile the code usage, perplexity, dead codes and the share of users whose code is the
same as in the previous E-step. ``epoch_end_hooks`` are called after each round (checkpointing, early stop).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from recbole_uip.data.behaviour import BehaviourCorpus
from recbole_uip.inference.codebook import ProfileCodebook
from recbole_uip.inference.llm import FrozenLLM, assert_frozen
from recbole_uip.inference.prompt import PromptLayout, build_layout, collate
from recbole_uip.inference.soft_profiles import RowAdam, RowSGD, SoftProfiles, behaviour_nll


@dataclasses.dataclass
class InferenceResult:
    """What profile inference produces.

    Attributes:
        users: raw user tokens, row order of the arrays below.
        codes: int64 ``(U, P)``; the profile ID of each user and profile.
        codebooks: per profile, float32 ``(K_p, D)``.
        projections: per profile, float32 ``(D, k)``, the projection of the quantiser's metric
            (``uip_quantiser_metric``), or None when the codebooks measure plain distances.
        offsets: float32 ``(U, P, D)``; the final (continuous) soft-token offsets.
        summaries: float32 ``(U, H)``; the forward-only LLM summary of each user's text (unstandardised).
        history: one dict per EM round with the logged statistics.
        per_user: per-user convergence measures (NLL in rounds 1 and last, movement, code changes).
    """

    users: list[str]
    codes: np.ndarray
    codebooks: list[np.ndarray]
    projections: list[np.ndarray] | None
    offsets: np.ndarray
    summaries: np.ndarray
    history: list[dict]
    per_user: dict[str, np.ndarray]


def _batches(order: torch.Tensor, size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


class ProfileInferenceTrainer:
    """Infers per-user latent profiles through a frozen LLM (see module docstring).

    Args:
        config: the RecBole ``Config`` of the run (``seed``, ``show_progress``).
        settings: :class:`~recbole_uip.config.UIPSettings`.
        llm: the frozen LLM.
        corpus: behaviour of every user with training history.
        logger: RecBole's logger (``logging.getLogger()`` after ``init_logger``).
    """

    def __init__(self, config, settings, llm: FrozenLLM, corpus: BehaviourCorpus, logger):
        self.config, self.settings, self.llm, self.corpus, self.logger = config, settings, llm, corpus, logger
        self.device = llm.device
        self.show_progress = bool(config["show_progress"]) if "show_progress" in config else True
        self.generator = torch.Generator().manual_seed(int(config["seed"]))
        self.layout: PromptLayout = build_layout(llm.tokenizer, list(settings.profiles.values()), settings.behaviour_prefix)
        self.epoch_end_hooks: list[Callable[["ProfileInferenceTrainer", int, dict], None]] = []
        self.soft: SoftProfiles | None = None
        self.codebooks = [ProfileCodebook(settings.codebook_sizes[name], llm.hidden_size, settings.quantiser_metric,
                                          settings.quantiser_components) for name in settings.profiles]
        # uip_quantiser_metric = fisher: sum over the M-step's users of g g^T per profile, (P, D, D) float64
        self.fisher_sums: torch.Tensor | None = None
        self.assignments: torch.Tensor | None = None  # (U, P)
        # Departure from the paper (uip_rating_weight, 10 by default): the tokens that write a rating weigh more in
        # the M-step loss, so the soft tokens learn how the user rates, not only which titles they watch. The
        # logged NLL stays the plain one, comparable across settings. Without rating tokens (corpus.rating_mask
        # is None: no rating field, no template or a slow tokenizer) every token weighs 1.
        self.history: list[dict] = []

    # ----------------------------------------------------------------------------------------------- set-up
    @torch.inference_mode()
    def summarise(self, batch_size: int = 32, max_batch_tokens: int = 8192) -> torch.Tensor:
        """Forward-only pass: mean hidden state (layer ``uip_summary_layer``) over each user's summary tokens
        (``corpus.summary_token_ids``: the behaviour text, or a longer stretch of the training history when
        ``uip_summary_max_tokens`` asks for one), ``(U, H)`` float32.

        Users are batched longest first, at most ``batch_size`` of them and ``max_batch_tokens`` padded tokens
        per batch (long histories come a few at a time)."""
        model, pad = self.llm.model, self.llm.tokenizer.pad_token_id
        sequences = self.corpus.summary_token_ids
        lengths = torch.tensor([len(t) for t in sequences])
        order = torch.argsort(lengths, descending=True).tolist()  # similar lengths together: less padding
        batches, start = [], 0
        while start < len(order):
            width = len(sequences[order[start]])
            size = max(1, min(batch_size, max_batch_tokens // max(width, 1)))
            batches.append(order[start : start + size])
            start += size
        out = torch.zeros(len(self.corpus), self.llm.hidden_size)
        bar = tqdm(total=len(order), desc="UIP summarise", ncols=100, disable=not self.show_progress, leave=False)
        for users in batches:
            seqs = [sequences[u] for u in users]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            valid = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = torch.tensor(seq)
                valid[row, : len(seq)] = 1
            hidden = model(input_ids=ids.to(self.device), attention_mask=valid.to(self.device),
                           output_hidden_states=True, use_cache=False).hidden_states[self.settings.summary_layer].float().cpu()
            out[torch.tensor(users)] = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
            bar.update(len(users))
        bar.close()
        return out

    def _anchors(self) -> torch.Tensor:
        """``(P, D)``: mean input embedding of each profile's phrase tokens (its soft token excluded)."""
        weight = self.llm.model.get_input_embeddings().weight.detach().float().cpu()
        anchors = []
        for p in range(self.layout.num_profiles):
            in_block = (self.layout.block_of == p)
            in_block[self.layout.soft_positions[p]] = False
            anchors.append(weight[self.layout.prefix_ids[in_block]].mean(0))
        return torch.stack(anchors)

    @torch.inference_mode()
    def evaluate_nll(self, offsets: str = "current") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-user behaviour NLL under fixed soft tokens, forward only: ``(plain (U,), weighted (U,) or None)``.

        ``offsets``: ``"current"`` (the soft tokens now), ``"anchor"`` (every user gets the phrase anchors),
        ``"mean"`` (every user gets the mean soft token: no user information, but the same shift),
        ``"shuffled"`` (each user gets another user's soft tokens) or ``"code"`` (each user's offset replaced by
        its assigned code). ``current`` well below ``mean`` and ``shuffled`` means the tokens carry user information.
        ``weighted`` is the rating-weighted NLL the M-step optimises (``uip_rating_weight``), from the same pass;
        None when the behaviour text has no rating tokens to weigh.
        """
        nll = torch.zeros(len(self.corpus))
        weighted_nll = None if self.corpus.rating_mask is None else torch.zeros(len(self.corpus))
        order = torch.arange(len(self.corpus))
        permutation = torch.randperm(len(self.corpus), generator=torch.Generator().manual_seed(0))
        mean_offsets = self.soft.offsets().mean(0, keepdim=True)
        for users in _batches(order, self.settings.batch_size * 2):
            batch = self.prompt_batch(users.tolist())
            users_dev = users.to(self.device)
            tokens = self.soft(users_dev)
            if offsets == "mean":
                tokens = (self.soft.center()[None] + mean_offsets).expand_as(tokens)
            elif offsets == "shuffled":
                tokens = self.soft(permutation[users].to(self.device))
            elif offsets == "anchor":
                tokens = self.soft.anchors[None].expand_as(tokens)
            elif offsets == "code":
                codes = torch.stack([cb.codes[self.assignments[users, p]] for p, cb in enumerate(self.codebooks)], 1)
                tokens = self.soft.center()[None] + codes.to(self.device)
            plain, weighted = behaviour_nll(self.llm.model, self.layout, batch, tokens, weighted=True)
            nll[users] = plain.float().cpu()
            if weighted_nll is not None:
                weighted_nll[users] = weighted.float().cpu()
        return nll, weighted_nll

    # ---------------------------------------------------------------------------------------------- EM steps
    @torch.no_grad()
    def e_step(self, iterations: int) -> tuple[torch.Tensor, list, list[float]]:
        """Assign every user's offsets to codes and refit the codebooks. Returns ``(U, P)`` ids, healths, sigma^2."""
        offsets = self.soft.offsets().detach().cpu()                          # (U, P, D)
        codes, healths, scales = [], [], []
        for p, codebook in enumerate(self.codebooks):
            assignment, health = codebook.fit(offsets[:, p], iterations, self.generator)
            codes.append(assignment)
            healths.append(health)
            scales.append(codebook.scale(offsets[:, p]))
        return torch.stack(codes, dim=1), healths, scales

    def m_step(self, epoch: int, scales: list[float], encoder_opt, residual_opt) -> torch.Tensor:
        """One pass over all users; returns each user's NLL ``(U,)`` as measured before its update."""
        nll_seen = torch.zeros(len(self.corpus))
        order = torch.randperm(len(self.corpus), generator=self.generator)
        bar = tqdm(total=len(order), desc=f"UIP M-step {epoch:>2}", ncols=100, disable=not self.show_progress)
        self.codebooks = [cb.to(self.device) for cb in self.codebooks]
        if self.settings.quantiser_metric == "fisher":
            dim = self.llm.hidden_size
            self.fisher_sums = torch.zeros(len(self.codebooks), dim, dim, dtype=torch.float64)
        for users in _batches(order, self.settings.batch_size):
            nll = self.train_batch(users, scales, encoder_opt, residual_opt)
            nll_seen[users] = nll.float().cpu()
            bar.update(len(users))
            bar.set_postfix(nll=f"{float(nll.mean()):.3f}")
        bar.close()
        self.codebooks = [cb.cpu() for cb in self.codebooks]
        if self.fisher_sums is not None:
            for codebook, sums in zip(self.codebooks, self.fisher_sums):
                codebook.set_fisher(sums / len(order))
        return nll_seen

    def train_batch(self, users: torch.Tensor, scales: list[float], encoder_opt, residual_opt) -> torch.Tensor:
        """One M-step update for ``users`` (LongTensor ``(B,)``); returns their NLL ``(B,)`` before the update."""
        batch = self.prompt_batch(users.tolist())
        users_dev = users.to(self.device)
        soft_tokens = self.soft(users_dev)                                   # (B, P, D)
        if self.fisher_sums is not None:
            soft_tokens.retain_grad()
        nll, objective = behaviour_nll(self.llm.model, self.layout, batch, soft_tokens, weighted=True)  # (B,) each
        loss = objective.mean()
        beta = self.settings.commitment_weight
        if beta > 0:
            offsets = self.soft.offsets(users_dev)
            assigned = self.assignments[users].to(self.device)
            for p, codebook in enumerate(self.codebooks):
                loss = loss + beta * codebook.commitment(offsets[:, p], assigned[:, p], scales[p])
        encoder_opt.zero_grad(set_to_none=True)
        self.soft.residual.grad = None
        loss.backward()
        encoder_opt.step()
        residual_opt.step(users_dev, grad_scale=len(users))  # per-user gradient of its own NLL
        if self.fisher_sums is not None:
            # Each user's gradient of its own M-step objective (the LLM term only: the commitment term reaches the
            # parameters through a separate branch), undoing the 1/B of the batch mean.
            grads = (soft_tokens.grad.detach() * len(users)).double().cpu()          # (B, P, D)
            self.fisher_sums += torch.einsum("bpd,bpe->pde", grads, grads)
        return nll.detach()

    def prompt_batch(self, rows: list[int]):
        """The prompts of users ``rows``, with each behaviour token's M-step weight where the text has rating tokens
        (``corpus.rating_mask``; no weights otherwise: every token weighs 1)."""
        weights = None if self.corpus.rating_mask is None else [self.token_weights(u) for u in rows]
        return collate(self.layout, [self.corpus.token_ids[u] for u in rows], self.llm.tokenizer.pad_token_id, weights)

    def token_weights(self, user: int) -> list[float]:
        """M-step loss weight of each behaviour token of ``user``: ``uip_rating_weight`` on rating tokens, else 1."""
        weight = self.settings.rating_weight
        return [weight if flag else 1.0 for flag in self.corpus.rating_mask[user]]

    def build_optimisers(self):
        """``(encoder_opt, residual_opt)``: Adam on the shared shift and the encoder (their own learning rates),
        and the per-row optimiser of the user residuals (``uip_residual_optimizer``)."""
        shared, encoder, residual = self.trainable_parameters()
        settings = self.settings
        encoder_opt = torch.optim.Adam([
            {"params": [shared], "lr": settings.shared_learning_rate},
            {"params": [encoder], "lr": settings.encoder_learning_rate},
        ])
        row_optimiser = RowSGD if settings.residual_optimizer == "sgd" else RowAdam
        return encoder_opt, row_optimiser(residual, lr=settings.learning_rate)

    # ------------------------------------------------------------------------------------------------ fit
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the soft-token parameters; the LLM is asserted frozen and codebooks are buffers."""
        assert_frozen(self.llm.model)
        return [self.soft.shared, self.soft.encoder, self.soft.residual]

    def fit(self) -> InferenceResult:
        """Run the EM loop (see module docstring) with ``uip_num_threads`` torch threads."""
        settings = self.settings
        threads_before = torch.get_num_threads()
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads_before)

    def _fit(self) -> InferenceResult:
        settings, logger = self.settings, self.logger
        start = time.perf_counter()
        logger.info(
            f"UIP inference: {len(self.corpus)} users, profiles {settings.profile_names}, codebooks "
            f"{list(settings.codebook_sizes.values())}, prompt prefix {self.layout.prefix_length} tokens, "
            f"{torch.get_num_threads()} threads, {self.llm.dtype}, {self.device}."
        )
        raw_summaries = self.summarise()
        mean, std = raw_summaries.mean(0), raw_summaries.std(0).clamp(min=1e-6)
        embedding_norm = float(self.llm.model.get_input_embeddings().weight.detach().float().norm(dim=1).mean())
        self.soft = SoftProfiles(
            self._anchors(), (raw_summaries - mean) / std, settings.init_scale * embedding_norm, self.generator
        ).to(self.device)
        encoder_opt, residual_opt = self.build_optimisers()
        initial_tokens = self.soft.offsets().detach().cpu().clone()
        self.assignments, healths, scales = self.e_step(settings.kmeans_iters)
        initial_assignments = self.assignments.clone()
        self._log_round(0, None, healths, None, start)
        first_nll, last_nll = None, None
        changes = torch.zeros(len(self.corpus), len(self.codebooks), dtype=torch.long)
        for epoch in range(1, settings.epochs + 1):
            nll = self.m_step(epoch, scales, encoder_opt, residual_opt)
            first_nll = nll if first_nll is None else first_nll
            last_nll = nll
            previous = self.assignments
            self.assignments, healths, scales = self.e_step(settings.kmeans_iters)
            changed = self.assignments != previous
            changes += changed.long()
            stability = (~changed).float().mean(0).tolist()
            record = self._log_round(epoch, nll, healths, stability, start, first_nll)
            for hook in self.epoch_end_hooks:
                hook(self, epoch, record)
        final_tokens = self.soft.offsets().detach().cpu()
        movement = (final_tokens - initial_tokens).norm(dim=-1) / initial_tokens.norm(dim=-1).clamp(min=1e-12)
        per_user = {
            "nll_first_round": first_nll.numpy(),
            "nll_last_round": last_nll.numpy(),
            "relative_movement": movement.numpy(),                      # (U, P)
            "code_changes": changes.numpy(),                            # (U, P) E-steps where the code moved
            "initial_codes": initial_assignments.numpy(),
        }
        self._log_convergence(per_user)
        if settings.diagnostics:
            per_user.update(self.diagnose())
        return InferenceResult(
            users=list(self.corpus.users),
            codes=self.assignments.numpy().astype(np.int64),
            codebooks=[cb.codes.numpy().copy() for cb in self.codebooks],
            projections=None if self.codebooks[0].projection is None else [cb.projection.numpy().copy() for cb in self.codebooks],
            offsets=final_tokens.numpy(),
            summaries=raw_summaries.numpy(),
            history=self.history,
            per_user=per_user,
        )

    def diagnose(self) -> dict[str, np.ndarray]:
        """Do the soft tokens carry *user* information? Per-user NLL with the user's own tokens, with another
        user's (shuffled), with the mean token (no user information), and with the assigned codes: ``nll_<mode>``
        (plain) and, where ratings are weighted, ``nll_weighted_<mode>`` (the M-step's objective). Costs four
        forward-only passes; on with ``uip_diagnostics``."""
        modes = ("current", "shuffled", "mean", "code")
        nll = {}
        for mode in modes:
            plain, weighted = self.evaluate_nll(mode)
            nll[f"nll_{mode}"] = plain.numpy()
            if weighted is not None:
                nll[f"nll_weighted_{mode}"] = weighted.numpy()
        labels = ("own soft tokens", "another user's", "mean token", "own codes")
        for prefix, what in (("nll_", "behaviour NLL"), ("nll_weighted_", "rating-weighted NLL (the M-step's objective)")):
            if f"{prefix}current" in nll:
                means = ", ".join(f"{label} {float(nll[prefix + mode].mean()):.4f}" for label, mode in zip(labels, modes))
                self.logger.info(f"UIP diagnostics, {what} (nats/token): {means}.")
        return nll

    # -------------------------------------------------------------------------------------------- logging
    def _log_round(self, epoch, nll, healths, stability, start, first_nll=None) -> dict:
        record = {"round": epoch, "seconds": round(time.perf_counter() - start, 1)}
        parts = [f"UIP round {epoch}/{self.settings.epochs}"]
        if nll is not None:
            record["nll"] = float(nll.mean())
            parts.append(f"NLL {record['nll']:.4f}")
            if epoch > 1:
                drop = (first_nll - nll).numpy()
                record["nll_drop_median"] = float(np.median(drop))
                record["users_nll_improved"] = float((drop > 0).mean())
                parts.append(f"per-user drop since round 1 median {record['nll_drop_median']:.4f} "
                             f"({100 * record['users_nll_improved']:.0f}% improved)")
        for p, name in enumerate(self.settings.profile_names):
            h = healths[p]
            record[name] = {"usage": h.usage, "perplexity": round(h.perplexity, 3), "dead_codes": h.dead_codes,
                            "restarted": h.restarted}
            text = f"{name}: perplexity {h.perplexity:.2f}/{len(h.usage)}, dead {h.dead_codes}"
            if h.projection_share is not None:
                record[name]["projection_share"] = round(h.projection_share, 4)
                text += (f", {self.settings.quantiser_metric} metric: {h.projection_share:.0%} of the "
                         + ("variance" if self.settings.quantiser_metric == "whitened" else "Fisher trace"))
            if stability is not None:
                record[name]["stability"] = stability[p]
                text += f", same code as last E-step {100 * stability[p]:.1f}%"
            parts.append(text)
        self.logger.info(" | ".join(parts) + f" | {record['seconds']:.0f}s")
        self.history.append(record)
        return record

    def _log_convergence(self, per_user: dict) -> None:
        move = per_user["relative_movement"]
        text = (f"UIP convergence: soft-token offsets moved median {np.median(move):.3f} (p10 {np.quantile(move, 0.1):.3f}, "
                f"p90 {np.quantile(move, 0.9):.3f}) of their initial norm")
        if len(self.history) > 2:
            drop = per_user["nll_first_round"] - per_user["nll_last_round"]
            text += f"; NLL drop per user median {np.median(drop):.4f}, p10 {np.quantile(drop, 0.1):.4f}"
        self.logger.info(text + ".")
