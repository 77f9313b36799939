"""The EM loop that infers latent profiles: a RecBole-style trainer with ``fit()``.

Before the first round: each training item is embedded once by the frozen LLM (forward only), each user's
history becomes a vector ``z[u]`` (:mod:`user_features`), and the first E-step quantises the untrained starting
point. The untrained control every benchmark compares against (``initial_codes``) is that start quantised by as many
E-steps as the trained IDs get (:meth:`ProfileInferenceTrainer.untrained_control`), so the two differ by the
likelihood training alone, not by extra Lloyd iterations. A second control (``random_step_codes``) moves the
untrained encoder by steps with the same singular values as the trained encoder's, along random singular vectors
(:meth:`ProfileInferenceTrainer.advance_random_step_control`): the two differ by the directions the likelihood chose.

One EM round (``uip_epochs`` of them):

* **M-step.** One pass over the training users (or ``uip_mstep_users`` of them, drawn anew each round) in shuffled
  batches. For each user the step scores a text of
  some of their items (``uip_target``: a random subset, or the newest items) while the encoder reads the user's
  *other* items. Loss per batch = ``mean_b NLL_w(text_b | soft tokens_b) + beta * sum_p commitment_p``
  (``NLL_w``: the rating tokens weigh ``uip_rating_weight``). The shared shift ``b`` takes an Adam step per
  batch; the free per-user tokens (``uip_free_tokens``) a row step per batch. The encoder ``A`` accumulates its
  gradient over the whole pass and then takes **one step whose length a line search chooses** on validation
  users (``uip_line_search_users``, held out of the pass): the objective of each candidate length is measured
  with the frozen LLM (``uip_line_search_criterion: ctr`` chooses by the held-out AUC of the IDs it gives
  instead: :meth:`ProfileInferenceTrainer.held_out_auc`), and a length of zero is always a candidate. A
  departure from per-batch steps: measured on ml-100k, per-batch Adam steps on ``A`` (or on an MLP) made each
  user's own tokens explain held-out behaviour *worse* than the mean token (+0.06 nats/token): the user signal in
  one batch's gradient is far below its noise, and every noisy step costs likelihood. The full-pass gradient
  averages the noise out, and the line search takes a step only as long as it helps users the pass did not see.
* **E-step.** Every user's offset (from all their training items) is assigned its nearest code; the codebooks
  are refitted (Lloyd, warm-started) and dead codes restarted. The last E-step's assignments are the profile IDs.

Only the soft-token parameters receive gradient; the LLM is frozen (asserted). Every round logs, through RecBole's
logger: the NLL, the line search's choice and gain, how far two halves of the encoder's gradient agree (the odd
and the even batches; :mod:`recbole_uip.inference.gradient_agreement`), and per profile the code usage, perplexity,
dead codes and the share of users whose code is unchanged. ``epoch_end_hooks`` are called after each round.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from recbole_uip.config import UIPConfigError
from recbole_uip.data.behaviour import TrainingHistories
from recbole_uip.data.behaviour_text import BehaviourText
from recbole_uip.inference.checkpoint import InferenceCheckpoint
from recbole_uip.inference.codebook import ProfileCodebook
from recbole_uip.inference.ctr_proxy import HeldOutLabels, format_ctr_auc
from recbole_uip.inference.deep_prefix import prefix_step_scale, soft_token_keys_values
from recbole_uip.inference.distributed import Communicator
from recbole_uip.inference.gradient_agreement import format_step_z, paired_gain_z, split_half_agreement
from recbole_uip.inference.llm import FrozenLLM, assert_frozen
from recbole_uip.inference.prompt import PromptLayout, build_layout, collate
from recbole_uip.inference.soft_profiles import (
    FreeTokens, SoftProfiles, batch_centred_map, behaviour_logits, behaviour_nll, behaviour_token_nll,
    soft_target_nll, token_mean, weighted_token_mean,
)
from recbole_uip.inference.user_features import UserFeatureMap, embed_items
from recbole_uip.utils import fault_point

# The candidate lengths of the encoder's step (uip_line_search_lengths) are the mean change of a validation user's
# offset relative to the mean norm of the LLM's token embeddings; 0, the current encoder, is always a candidate.
LINE_SEARCH_EXPANSIONS = 6       # while the longest step is the best, try 3x longer ones, at most this many times


class InferenceDivergedError(RuntimeError):
    """The M-step loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class Targets:
    """What a batch of users is scored on and what their encoder reads.

    Attributes:
        users: int64 ``(B,)`` rows of the histories.
        texts: per user, the scored token ids (oldest first).
        flags: per user, the rating flags of those tokens, or None.
        inputs: per user, the positions of the items the encoder reads.
    """

    users: np.ndarray
    texts: list[list[int]]
    flags: list[list[bool]] | None
    inputs: list[np.ndarray]


@dataclasses.dataclass
class InferenceResult:
    """What profile inference produces.

    Attributes:
        users: raw user tokens, row order of the arrays below.
        codes: int64 ``(U, P)``; the profile ID of each user and profile.
        initial_codes: int64 ``(U, P)``; the untrained control: the same quantiser, with as many E-steps, on the
            untrained start (with no EM rounds, ``codes`` itself).
        random_step_codes: int64 ``(U, P)``; the random-direction control: the untrained encoder moved in each
            round by the trained encoder's step with random singular vectors, quantised the same way; None with
            free per-user tokens or without an encoder.
        codebooks: per profile, float32 ``(K_p, D)``.
        projections: per profile, float32 ``(D, k)`` (the whitened metric's projection), or None.
        offsets: float32 ``(U, P, D)``; the final (continuous) soft-token offsets.
        summaries: float32 ``(U, k)``; each user's encoder input ``z`` (None without an encoder).
        item_ids, item_embeddings: the embedded items and float32 ``(I, H)`` embeddings (None without an encoder).
        feature_map: the map from a history to ``z`` (None without an encoder).
        anchors, shared: float32 ``(P, D)``; encoder: float32 ``(P, D, k)`` or None.
        history: one dict per EM round with the logged statistics.
        per_user: per-user convergence measures.
    """

    users: list[str]
    codes: np.ndarray
    initial_codes: np.ndarray
    random_step_codes: np.ndarray | None
    codebooks: list[np.ndarray]
    projections: list[np.ndarray] | None
    offsets: np.ndarray
    summaries: np.ndarray | None
    item_ids: list[str] | None
    item_embeddings: np.ndarray | None
    feature_map: UserFeatureMap | None
    anchors: np.ndarray
    shared: np.ndarray
    encoder: np.ndarray | None
    history: list[dict]
    per_user: dict[str, np.ndarray]


def _random_orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """float64 ``(rows, columns)`` with orthonormal columns, uniformly distributed (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(())).unsqueeze(0)


def nan_without_ratings(targets: Targets, rating: np.ndarray) -> np.ndarray:
    """``rating (B,)`` (a ratings-only batch's weighted NLL) with nan for each user whose text marks no rating
    token (their weights sum to 0, so the weighted mean is no mean)."""
    return np.where(np.array([any(flags) for flags in targets.flags]), rating, np.nan)


def after_contexts(targets: Targets, contexts: list[list[int]]) -> Targets:
    """``targets`` with each user's text preceded by their context (token ids; their rating flags False)."""
    if len(contexts) != len(targets.texts):
        raise ValueError(f"{len(contexts)} contexts for {len(targets.texts)} behaviour texts.")
    flags = None if targets.flags is None else [[False] * len(c) + list(f) for c, f in zip(contexts, targets.flags)]
    return Targets(targets.users, [list(c) + list(t) for c, t in zip(contexts, targets.texts)], flags, targets.inputs)


def _at_positions(per_user: list[np.ndarray], users, positions: list[np.ndarray] | None) -> list[np.ndarray]:
    """``per_user[u]`` for each of ``users``, at ``positions[j]`` for the ``j``-th (whole where None)."""
    return [per_user[u] if positions is None else per_user[u][positions[j]] for j, u in enumerate(users)]


def _batches(order, size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


class ProfileInferenceTrainer:
    """Infers per-user latent profiles through a frozen LLM (see module docstring).

    Args:
        config: the RecBole ``Config`` of the run (``seed``, ``show_progress``).
        settings: :class:`~recbole_uip.config.UIPSettings`.
        llm: the frozen LLM.
        histories: every user's training history.
        text: the histories' tokenised text.
        logger: RecBole's logger (``logging.getLogger()`` after ``init_logger``).
        comm: the ranks of a distributed run (:mod:`recbole_uip.inference.distributed`); None: one process.
            Every rank holds every history; this rank embeds its share of the items' batches and works on its
            block of the users (:attr:`local_users`); the results are combined, so every rank ends with the same IDs.
    """

    def __init__(self, config, settings, llm: FrozenLLM, histories: TrainingHistories, text: BehaviourText, logger,
                 comm: Communicator | None = None):
        self.config, self.settings, self.llm, self.logger = config, settings, llm, logger
        self.histories, self.text = histories, text
        self.comm = comm or Communicator()
        if self.comm.world_size > len(histories):
            raise ValueError(f"UIP inference over {self.comm.world_size} ranks needs at least as many users with "
                             f"training history; the dataset has {len(histories)}. Launch fewer processes.")
        self.local_users = self.comm.shard(len(histories))       # (U_r,) rows of this rank's users
        self.device = llm.device
        self.show_progress = (bool(config["show_progress"]) if "show_progress" in config else True) and self.comm.is_main
        # uip_seed: the inference's own draws (k-means, validation users, targets); ~: RecBole's seed, which also
        # makes the split, so a second seed of the inference alone needs uip_seed
        seed = self.seed = int(config["seed"]) if settings.seed is None else settings.seed
        self.generator = torch.Generator().manual_seed(seed)     # the same draws on every rank (k-means, tokens)
        # per rank: the M-step's order and targets (rank 0 draws what a single process draws)
        self.rng = np.random.default_rng(seed if self.comm.rank == 0 else [seed, self.comm.rank])
        self.layout: PromptLayout = build_layout(llm.tokenizer, list(settings.profiles.values()), settings.behaviour_prefix)
        self.epoch_end_hooks: list[Callable[["ProfileInferenceTrainer", int, dict], None]] = []
        self.codebooks = [ProfileCodebook(settings.codebook_sizes[name], llm.hidden_size, settings.quantiser_metric,
                                          settings.quantiser_components) for name in settings.profiles]
        self.soft: SoftProfiles | None = None
        self.free: FreeTokens | None = None
        self.feature_map: UserFeatureMap | None = None
        self.item_embeddings: torch.Tensor | None = None
        self.summaries: torch.Tensor | None = None       # (U, k): z of every user's whole history (every rank)
        self.assignments: torch.Tensor | None = None     # (U, P) (every rank)
        self.validation: Targets | None = None
        self.embedding_norm = float(llm.model.get_input_embeddings().weight.detach().float().norm(dim=1).mean())
        self.history: list[dict] = []
        self.checkpoint: InferenceCheckpoint | None = None   # set by the caller to make the run resumable
        self.checkpoint_every = settings.checkpoint_every
        self._loop: dict = {}                                  # what the EM loop carries between rounds
        self._held_out: dict | None = None                     # the CTR criterion's labels and kept z (held_out_auc)
        if settings.line_search_criterion == "ctr" and histories.ratings is None:
            raise UIPConfigError("uip_line_search_criterion: ctr labels training interactions by their rating, and "
                                 "this dataset's histories have none. Use uip_line_search_criterion: likelihood.")

    # ----------------------------------------------------------------------------------------------- set-up
    def _anchors(self) -> torch.Tensor:
        """``(P, D)``: mean input embedding of each profile's phrase tokens (its soft token excluded)."""
        weight = self.llm.model.get_input_embeddings().weight.detach().float().cpu()
        anchors = []
        for p in range(self.layout.num_profiles):
            in_block = (self.layout.block_of == p)
            in_block[self.layout.soft_positions[p]] = False
            anchors.append(weight[self.layout.prefix_ids[in_block]].mean(0))
        return torch.stack(anchors)

    def setup(self) -> None:
        """Item embeddings, the feature map and every user's ``z`` (with an encoder); the soft tokens; the free
        tokens; the validation users of the line search."""
        if self.settings.encoder != "none":
            comm, texts = self.comm, self.histories.item_texts
            comm.phase = "the item embeddings"
            # every rank computes its share of the single process's batches (the other rows zero): the sum over the
            # ranks is the single process's (I, H), bit for bit
            local = embed_items(self.llm, texts, self.settings.item_embedding_layer, self.settings.item_batch_size,
                                show_progress=self.show_progress, part=(comm.rank, comm.world_size))
            self.item_embeddings = comm.sum(local)                                      # (I, H) on every rank
            fault_point("item_embeddings")
            comm.phase = "the feature map"
            users = self.local_users
            self.feature_map = UserFeatureMap.fit(
                self.item_embeddings, [self.histories.items[u] for u in users],
                None if self.histories.ratings is None else [self.histories.ratings[u] for u in users],
                self.settings.encoder_dims, self.settings.history_prior, comm)
            self.summaries = comm.gather_rows(self.features(users), len(self.histories))  # (U, k) on every rank
        self._setup_tokens()

    def _setup_tokens(self) -> None:
        """The soft tokens, the free tokens and the validation users (the part of :meth:`setup` after ``z``)."""
        settings = self.settings
        uses_encoder = settings.encoder != "none"
        init_norm = settings.init_scale * self.embedding_norm
        self.soft = SoftProfiles(self._anchors(), self.feature_map.dims if uses_encoder else 0, init_norm,
                                 self.generator).to(self.device)
        if settings.free_tokens:
            num_users, (num_profiles, dim) = len(self.histories), self.soft.anchors.shape
            start = torch.zeros(num_users, num_profiles, dim)
            if not uses_encoder:  # the paper's free tokens: users must start apart for the first E-step to mean anything
                start = torch.randn(num_users, num_profiles, dim, generator=self.generator) * init_norm / dim ** 0.5
            self.free = FreeTokens(start, settings.free_token_optimizer, settings.free_token_learning_rate)
        if uses_encoder and settings.line_search_users:
            count = min(settings.line_search_users, max(len(self.histories) // 4, 1))
            users = np.sort(np.random.default_rng(self.seed + 1).permutation(len(self.histories))[:count])
            self.validation = self.targets(users, np.random.default_rng(self.seed + 2))

    def history_items(self, users: np.ndarray, positions: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Per user of ``users``, the item indices at ``positions[j]`` in their history (all their items when
        None): what :meth:`features` reads."""
        return _at_positions(self.histories.items, users, positions)

    def features(self, users: np.ndarray, positions: list[np.ndarray] | None = None) -> torch.Tensor:
        """``z (B, k)`` of ``users`` from their items at ``positions`` (all their items when None)."""
        ratings = self.histories.ratings
        return self.feature_map(self.item_embeddings, self.history_items(users, positions),
                                None if ratings is None else _at_positions(ratings, users, positions))

    def targets(self, users: np.ndarray, rng: np.random.Generator) -> Targets:
        """The texts ``users`` are scored on and the items their encoder reads (``uip_target``)."""
        budget = self.settings.max_behaviour_tokens
        texts, flags, inputs = [], [], []
        for u in users:
            if self.settings.target == "newest":
                target = self.text.newest_target(u, budget)
                rest = np.setdiff1d(np.arange(len(self.histories.items[u])), target)
            else:
                target, rest = self.text.random_target(u, budget, rng)
            ids, rating_flags = self.text.tokens(u, target, budget)
            texts.append(ids)
            flags.append(rating_flags)
            inputs.append(rest)
        return Targets(np.asarray(users), texts, None if self.text.rating_flags is None else flags, inputs)

    def prompt_batch(self, targets: Targets, ratings_only: bool = False, unscored: list[int] | None = None):
        """The prompts of a batch (``unscored``: per user, leading text tokens read but not scored, see
        :func:`collate`), with each behaviour token's M-step weight where the text marks rating tokens
        and ``uip_rating_weight`` is not 1 (``uip_rating_weight`` for a rating token, 1 for any other; with a weight
        of 1 the batch has no weights, and the M-step's objective is the plain NLL); with ``ratings_only``, 1 for a
        rating token and 0 for any other, so that the weighted NLL is the mean over the rating tokens alone."""
        weights = None
        if targets.flags is not None and (ratings_only or self.settings.rating_weight != 1.0):
            rating, other = (1.0, 0.0) if ratings_only else (self.settings.rating_weight, 1.0)
            weights = [[rating if flag else other for flag in user_flags] for user_flags in targets.flags]
        elif ratings_only:
            raise ValueError("The behaviour text marks no rating tokens (uip_rating_template writes none).")
        return collate(self.layout, targets.texts, self.llm.tokenizer.pad_token_id, weights, unscored)

    # ---------------------------------------------------------------------------------------- the soft tokens
    def offsets(self, users: np.ndarray, inputs: list[np.ndarray] | None = None, free_rows: torch.Tensor | None = None,
                encoder: torch.Tensor | None = None, batch_centred: bool = False) -> torch.Tensor:
        """User offsets ``(B, P, D)``: ``A z`` (z from ``inputs``, or the stored whole-history z) plus the free
        tokens (``free_rows``, or their current rows). ``encoder`` replaces ``A`` (line search).

        ``batch_centred``: the same values, but ``A`` gets gradient only through ``z - mean_b z``, and ``A mean_b z``
        is held fixed: the encoder learns how users *differ* (the covariance of their gradients with their ``z``),
        while what the whole batch needs goes to the shared shift. Without it, ``z`` of partial histories is not
        centred (fewer items), and ``A`` would learn a second shared shift from the mean gradient."""
        offsets = torch.zeros(len(users), *self.soft.anchors.shape, device=self.device)
        if self.soft.encoder is not None:
            z = self.summaries[torch.as_tensor(users)] if inputs is None else self.features(users, inputs)
            z = z.to(self.device)
            weights = self.soft.encoder if encoder is None else encoder.to(self.device)
            if batch_centred:
                offsets = offsets + batch_centred_map("pdk,bk->bpd", weights, z)
            else:
                offsets = offsets + torch.einsum("pdk,bk->bpd", weights, z)
        if self.free is not None:
            rows = self.free.table[torch.as_tensor(users)] if free_rows is None else free_rows
            offsets = offsets + rows.to(self.device)
        return offsets

    def local_offsets(self, encoder: torch.Tensor | None = None) -> torch.Tensor:
        """``(U_r, P, D)`` on CPU: the offset of each of this rank's users (all users in one process) from their
        whole training history (``encoder`` replaces ``A``)."""
        with torch.no_grad():
            parts = [self.offsets(users, encoder=encoder).cpu() for users in _batches(self.local_users, 4096)]
        if not parts:
            return torch.zeros(0, *self.soft.anchors.shape)
        return torch.cat(parts)

    def gather_users(self, local: torch.Tensor) -> torch.Tensor:
        """``(U, ...)`` on every rank from each rank's ``(U_r, ...)`` rows of its users."""
        return self.comm.gather_rows(local, len(self.histories))

    # ---------------------------------------------------------------------------------------------- EM steps
    @torch.no_grad()
    def e_step(self, iterations: int, codebooks: list[ProfileCodebook] | None = None,
               generator: torch.Generator | None = None, encoder: torch.Tensor | None = None,
               offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, list, list[float]]:
        """Assign every user's offsets to codes and refit the codebooks (default: the trainer's, drawing from its
        generator; ``encoder`` ``(P, D, k)`` replaces ``A``; ``offsets`` ``(U_r, P, D)`` of this rank's users replace
        those of their whole histories). Returns ``(U, P)`` ids (every user's, on every rank), healths, sigma^2."""
        self.comm.phase = "an E-step"
        offsets = self.local_offsets(encoder) if offsets is None else offsets
        codes, healths, scales = [], [], []
        for p, codebook in enumerate(self.codebooks if codebooks is None else codebooks):
            assignment, health = codebook.fit(offsets[:, p], iterations, generator or self.generator, self.comm)
            codes.append(assignment)
            healths.append(health)
            scales.append(codebook.scale(offsets[:, p], self.comm))
        return self.gather_users(torch.stack(codes, dim=1)), healths, scales

    def untrained_control(self) -> torch.Tensor:
        """``(U, P)`` ids: the untrained start quantised by as many E-steps as the trained IDs get (``uip_epochs``
        more after the first), on copies of the codebooks and of the k-means generator taken right after the first
        E-step. Call it then, while the offsets are still the untrained ones.

        The trained IDs come from ``1 + uip_epochs`` warm-started E-steps of ``uip_kmeans_iters`` Lloyd iterations
        each. Against the first E-step's IDs alone, the extra iterations would count as training: on ml-100k (3
        rounds), 16% of the users' ``hobby`` codes moved in round 1 although the line search left the encoder
        unchanged. Only the E-steps draw from the generator, so with offsets that never move the control equals
        the trained IDs exactly (tested).
        """
        if self.settings.epochs == 0:
            return self.assignments.clone()
        codebooks = copy.deepcopy(self.codebooks)
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())
        for _ in range(self.settings.epochs):
            assignments, _, _ = self.e_step(self.settings.kmeans_iters, codebooks, generator)
        return assignments

    def start_random_step_control(self) -> dict | None:
        """The random-direction control's state, taken right after the first E-step (like
        :meth:`untrained_control`): the untrained encoder, copies of the codebooks and of the k-means generator,
        and the first E-step's IDs. None where it is not defined: without an encoder, or with free per-user tokens
        (their rows move by their own steps, which a random encoder step does not mimic)."""
        if self.soft.encoder is None or self.free is not None:
            return None
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())
        return {"encoder": self.soft.encoder.detach().cpu().clone(), "codebooks": copy.deepcopy(self.codebooks),
                "generator": generator, "codes": self.assignments.clone(),
                "directions": torch.Generator().manual_seed(self.seed + 3)}

    def offset_change(self, step: torch.Tensor) -> torch.Tensor:
        """``(P,)``: how far ``step`` ``(P, D, k)`` of the encoder moves the users apart, as the mean over the
        training users of ``||step[p] (z[u] - mean z)||`` (a shift of every user alike does not count)."""
        z = self.summaries - self.summaries.mean(0, keepdim=True)                            # (U, k)
        return torch.einsum("pdk,uk->upd", step.float().cpu(), z).norm(dim=-1).mean(0)

    def advance_random_step_control(self, control: dict, step: torch.Tensor) -> None:
        """One round of the random-direction control: move its encoder by ``step`` ``(P, D, k)`` (the trained
        encoder's step this round, zero where the line search took none) with, per profile, its singular vectors
        replaced by random orthonormal ones and its singular values kept, scaled to the same :meth:`offset_change`;
        then one E-step on its own codebooks and generator.

        So the control's IDs get as many E-steps as the trained ones, and its encoder moves as far and is as
        concentrated on a few directions of ``z`` each round, but on random directions: what separates the two is
        which directions of ``z`` the likelihood chose. (A Gaussian step of the same length is no such control: it
        spreads over every direction of ``z`` alike, and on ml-100k moved 9% of the users' IDs where the trained
        step moved 53%.)"""
        move = torch.zeros_like(control["encoder"])
        for p in range(step.shape[0]):
            _, singular, _ = torch.linalg.svd(step[p].double(), full_matrices=False)              # (r,)
            rank = singular.shape[0]
            left = _random_orthonormal(step.shape[1], rank, control["directions"])                # (D, r)
            right = _random_orthonormal(step.shape[2], rank, control["directions"])               # (k, r)
            move[p] = (left * singular[None]) @ right.T
        target = self.offset_change(step)
        move = move * (target / self.offset_change(move).clamp(min=1e-30))[:, None, None]
        control["encoder"] = control["encoder"] + move
        control["codes"], _, _ = self.e_step(self.settings.kmeans_iters, control["codebooks"], control["generator"],
                                             encoder=control["encoder"])

    def training_users(self) -> np.ndarray:
        """``(n,)`` rows of the users the M-step may train on, over all ranks: every user but the validation users."""
        users = np.arange(len(self.histories))
        return users if self.validation is None else np.setdiff1d(users, self.validation.users)

    def pass_users(self, epoch: int) -> np.ndarray:
        """The rows of the users the M-step of round ``epoch`` may visit ``(n,)``, over all ranks: every user but
        the validation users, or ``uip_mstep_users`` of them drawn anew each round (from the run's seed and the
        round, so that every rank draws the same set and a resumed run the same as an unbroken one).

        Departs from the paper, which visits every user in every pass: the encoder is shared and takes one step
        per round, along the gradient summed over the visited users, so a sample estimates it at a fraction of the
        cost of the backward passes through the LLM (benchmarks/zoo.py measures what the sample's IDs are worth)."""
        users = self.training_users()
        count = self.settings.mstep_users
        if not count or count >= len(users):
            return users
        draw = np.random.default_rng([self.seed, epoch, 0x55])
        return np.sort(draw.choice(users, size=count, replace=False))

    def warmup_users(self) -> np.ndarray:
        """The users of the shift's warm-up before round 1's pass ``(uip_shift_warmup_batches * uip_batch_size,)``:
        this rank's training users (all of them, also under ``uip_mstep_users``) in shuffled passes, as many as it
        takes (none without a shared shift). A whole number of batches, so the pass proper starts a batch.

        Departs from the paper, which has no shared shift: the encoder's gradient accumulated while the shift is
        still learning how the text is written carries mostly that (on ml-100k the line search never stepped after
        such a round). Every rank warms up for the same number of steps, each step seeing one batch per rank."""
        count = self.settings.shift_warmup_batches * self.settings.batch_size
        users = np.intersect1d(self.local_users, self.training_users())
        if not count or not len(users) or self.settings.shared_learning_rate <= 0:
            return users[:0]
        passes = -(-count // len(users))
        return np.concatenate([users[self.rng.permutation(len(users))] for _ in range(passes)])[:count]

    def m_step(self, epoch: int, scales: list[float], shared_opt, progress: dict | None = None) -> torch.Tensor:
        """One pass over this rank's share of :meth:`pass_users`; returns each user's NLL ``(U,)`` as
        measured before its update (NaN for users not visited).

        ``progress`` (from a checkpoint): the pass's user order, the batches done and the NLLs so far; the pass goes
        on from there. With a checkpoint set, the state is saved every ``uip_checkpoint_every`` batches and at the
        end of the pass.

        Distributed, each rank passes over its own users in batches of ``uip_batch_size``, and the ranks step
        together: at step ``i`` the shared shift moves by the mean of the ranks' gradients of their ``i``-th batch
        (a rank whose users are done contributes none). The shift thus sees ``world_size`` batches per step, the
        usual data-parallel semantics, so with ``uip_epochs`` > 0 the IDs depend on the number of ranks."""
        self.comm.phase = f"the M-step of round {epoch}"
        batch_size = self.settings.batch_size
        if progress is None:
            nll_seen = torch.full((len(self.histories),), float("nan"))
            users = np.intersect1d(self.local_users, self.pass_users(epoch))
            warmup = self.warmup_users() if epoch == 1 else users[:0]
            order, done = np.concatenate([warmup, users[self.rng.permutation(len(users))]]), 0
            warmup_batches, warmup_nll = len(warmup) // batch_size, []
            if self.soft.encoder is not None:
                self.soft.encoder.grad = None
                self._loop["odd_batches_gradient"] = None
        else:
            nll_seen, order, done = progress["nll_seen"], progress["order"], progress["done"]
            warmup_batches, warmup_nll = progress.get("warmup_batches", 0), progress.get("warmup_nll", [])
        batches = list(_batches(order, batch_size))     # the warm-up's whole batches first, then the pass proper
        steps = self.comm.max_int(len(batches))
        bar = tqdm(total=len(order), desc=f"UIP M-step {epoch:>2}", ncols=100, disable=not self.show_progress,
                   initial=sum(len(b) for b in batches[:done]))
        self.codebooks = [cb.to(self.device) for cb in self.codebooks]
        for index in range(done, steps):
            if index < len(batches):
                batch_users = batches[index]
                warming = index < warmup_batches
                odd = self.soft.encoder is not None and not warming and (index - warmup_batches) % 2 == 1
                before = self.soft.encoder.grad.detach().clone() if odd and self.soft.encoder.grad is not None else None
                nll = self.train_batch(self.targets(batch_users, self.rng), scales, shared_opt, (epoch, index + 1),
                                       shift_only=warming)
                if odd:                                   # the odd batches' share, for the split-half agreement
                    self._add_to_odd_half(before)
                if warming:                               # not the pass's NLL: the users are visited again in it
                    warmup_nll.append(float(nll.mean()))
                else:
                    nll_seen[torch.as_tensor(batch_users)] = nll.float().cpu()
                bar.update(len(batch_users))
                bar.set_postfix(nll=f"{float(nll.mean()):.3f}")
            else:                                         # this rank's users are done; the others' are not
                self._step_shared(shared_opt, contributed=False)
            if warmup_batches and index + 1 == warmup_batches and warmup_nll:
                summary = self._loop["shift_warmup"] = {"batches": warmup_batches, "nll_first_batch": warmup_nll[0],
                                                        "nll_last_batches": float(np.mean(warmup_nll[-5:]))}
                self.logger.info(f"UIP shift warm-up: {warmup_batches} batches, NLL {summary['nll_first_batch']:.4f} in "
                                 f"the first, {summary['nll_last_batches']:.4f} in the last {min(5, len(warmup_nll))}.")
            last = index + 1 == steps
            if self.checkpoint is not None and (last or (self.checkpoint_every and (index + 1) % self.checkpoint_every == 0)):
                self.codebooks = [cb.cpu() for cb in self.codebooks]
                self._save("m_step", epoch, shared_opt, {"nll_seen": nll_seen, "order": order, "done": index + 1,
                                                         "warmup_batches": warmup_batches, "warmup_nll": warmup_nll})
                self.codebooks = [cb.to(self.device) for cb in self.codebooks]
            fault_point("m_step_batch")
        bar.close()
        self.codebooks = [cb.cpu() for cb in self.codebooks]
        if self.comm.distributed:                         # each rank visited its own users: combine
            seen = ~torch.isnan(nll_seen)
            total = self.comm.sum(torch.stack([torch.where(seen, nll_seen, 0.0).double(), seen.double()]))
            nll_seen = torch.where(total[1] > 0, total[0] / total[1].clamp(min=1), float("nan")).float()
        return nll_seen

    def _add_to_odd_half(self, before: torch.Tensor | None) -> None:
        """Add what the last batch added to the encoder's gradient (its gradient now minus ``before``, ``(P, D, k)``
        or None for zero) to the pass's odd-batch half (:mod:`recbole_uip.inference.gradient_agreement`)."""
        added = self.soft.encoder.grad.detach() - (before if before is not None else 0)
        half = self._loop.get("odd_batches_gradient")
        self._loop["odd_batches_gradient"] = added.clone() if half is None else half + added

    def train_batch(self, targets: Targets, scales: list[float], shared_opt, where: tuple[int, int] = (0, 0),
                    shift_only: bool = False, teacher: torch.Tensor | None = None) -> torch.Tensor:
        """One M-step batch: returns the users' plain NLL ``(B,)`` before the update. The shared shift and the
        free rows step now; the encoder's gradient accumulates until :meth:`line_search`. ``shift_only`` (the
        shift's warm-up): the shared shift alone learns; the encoder gets no gradient and the free rows no step.
        ``teacher`` ``(B, L - 1, V)`` (:meth:`teacher_probabilities` of ``targets``): the objective is the
        cross-entropy against it (:func:`soft_target_nll`, distillation; not used by the EM loop), which is also
        what is returned.

        Raises:
            InferenceDivergedError: the loss is NaN or infinite (``where``: round and batch, for the message);
                nothing is updated.
        """
        users = targets.users
        free_rows = self.free.rows(torch.as_tensor(users)) if self.free is not None and not shift_only else None
        encoder = None if self.soft.encoder is None or not shift_only else self.soft.encoder.detach()
        offsets = self.offsets(users, targets.inputs, free_rows, encoder=encoder, batch_centred=True)  # (B, P, D)
        if teacher is None:
            nll, objective = behaviour_nll(self.llm.model, self.layout, self.prompt_batch(targets), self.soft(offsets),
                                           weighted=True)
        else:
            nll = objective = soft_target_nll(self.llm.model, self.layout, self.prompt_batch(targets),
                                              self.soft(offsets), teacher)
        loss = objective.mean() + self.commitment(offsets, users, scales)
        if not bool(torch.isfinite(loss)):
            kept = (f" The last good checkpoint is kept: {self.checkpoint.path}." if self.checkpoint is not None
                    and self.checkpoint.path.exists() else "")
            raise InferenceDivergedError(
                f"UIP inference diverged in round {where[0]}, batch {where[1]}: the M-step loss is {float(loss.detach())}. "
                f"Lower uip_shared_learning_rate or uip_free_token_learning_rate, or use uip_llm_dtype=float32.{kept}")
        if shared_opt is not None:
            shared_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._step_shared(shared_opt, contributed=True)
        if free_rows is not None:
            self.free.step(torch.as_tensor(users), free_rows, grad_scale=len(users))
        return nll.detach()

    def _step_shared(self, shared_opt, contributed: bool) -> None:
        """Step the shared shift with its gradient averaged over the ranks that trained a batch at this step
        (``contributed``: whether this rank did). One process: the plain step."""
        if shared_opt is None:
            return
        shared = self.soft.shared
        if self.comm.distributed:
            local = shared.grad.detach().flatten().double() if contributed and shared.grad is not None \
                else torch.zeros(shared.numel(), dtype=torch.float64, device=shared.device)
            total = self.comm.sum(torch.cat([local, torch.tensor([float(contributed)], dtype=torch.float64,
                                                                 device=shared.device)]))
            shared.grad = (total[:-1] / total[-1].clamp(min=1)).to(shared.dtype).view_as(shared)
        if shared.grad is not None:
            shared_opt.step()

    def commitment(self, offsets: torch.Tensor, users: np.ndarray, scales: list[float],
                   per_user: bool = False) -> torch.Tensor:
        """``beta * sum_p ||offset - sg(code)||^2 / sigma_p^2`` for the users' assigned codes: the mean over the batch,
        or with ``per_user`` each user's term ``(B,)``."""
        beta = self.settings.commitment_weight
        if beta <= 0:
            return offsets.new_zeros(len(users) if per_user else ())
        assigned = self.assignments[torch.as_tensor(users)].to(self.device)
        method = "commitment_per_row" if per_user else "commitment"
        return beta * sum(getattr(codebook, method)(offsets[:, p], assigned[:, p], scales[p])
                          for p, codebook in enumerate(self.codebooks))

    @torch.no_grad()
    def line_search(self, scales: list[float]) -> dict:
        """One step of the encoder along minus its gradient accumulated over the M-step, of the length (possibly
        zero) that minimises the M-step objective of the validation users (``uip_line_search_criterion: ctr``:
        that maximises :meth:`held_out_auc`). Returns what was tried and chosen.

        ``uip_line_search: joint`` searches one length for every profile's part of the gradient; ``per_profile``
        searches each profile's length in turn (the profiles before it already stepped), so a profile whose
        gradient is noise (its split-half agreement near 0) does not hold back one whose gradient carries signal.
        ``uip_line_search_min_z`` > 0 keeps a length out unless its gain is that many standard errors above 0 (over
        the validation users), so a gain the size of the validation users' noise takes no step.

        Distributed: the gradient is summed over the ranks, and each rank scores its block of the validation users
        (the objective is summed over the ranks), so every rank takes the same step."""
        comm = self.comm
        comm.phase = "the line search"
        gradient = self.soft.encoder.grad
        self.soft.encoder.grad = None
        odd = self._loop.pop("odd_batches_gradient", None)
        if comm.distributed:
            gradient = comm.sum(gradient if gradient is not None else torch.zeros_like(self.soft.encoder))
            odd = comm.sum(odd if odd is not None else torch.zeros_like(self.soft.encoder))
        agreement = None if gradient is None or odd is None else \
            split_half_agreement(gradient - odd, odd, self.settings.profile_names)
        if gradient is None or not float(gradient.norm()) > 0:
            return {"step": 0.0, "gain": 0.0, "gain_z": {}, "best_z": None, "gradient_agreement": agreement}
        validation = self.validation
        z = self.features(validation.users, validation.inputs).to(self.device)
        z_mean = z.mean(0, keepdim=True)     # a step changes how users differ, not the validation users' mean
        shift = torch.einsum("pdk,bk->bpd", self.soft.encoder.detach(), z_mean)
        current = self.soft.encoder.detach().clone()
        batch = self.prompt_batch(validation)
        self.codebooks = [cb.to(self.device) for cb in self.codebooks]
        names = self.settings.profile_names
        if self.settings.line_search == "joint":
            search = self._search_length(gradient, None, current, z, z_mean, shift, batch, scales)
            current = search.pop("encoder")
        else:
            searches = {}
            for p, name in enumerate(names):
                direction = torch.zeros_like(gradient)
                direction[p] = gradient[p]
                searches[name] = self._search_length(direction, p, current, z, z_mean, shift, batch, scales)
                current = searches[name].pop("encoder")
            first, last = searches[names[0]]["tried"], searches[names[-1]]["tried"]
            search = {"step": max(s["step"] for s in searches.values()),
                      "steps": {name: s["step"] for name, s in searches.items()},
                      "gain": first[0.0] - last[searches[names[-1]]["step"]],
                      "tried": {name: s["tried"] for name, s in searches.items()},
                      "gain_z": {name: s["gain_z"] for name, s in searches.items()},
                      "best_z": {name: s["best_z"] for name, s in searches.items()},
                      "nll_gain": sum(s["nll_gain"] for s in searches.values()),
                      "commitment_gain": sum(s["commitment_gain"] for s in searches.values())}
            if self.settings.line_search_criterion == "ctr":
                search["ctr_auc"] = {name: s["ctr_auc"] for name, s in searches.items()}
        self.codebooks = [cb.cpu() for cb in self.codebooks]
        self.soft.encoder.data = current
        return {**search, "gradient_agreement": agreement}

    def _search_length(self, direction: torch.Tensor, profile: int | None, current: torch.Tensor, z: torch.Tensor,
                       z_mean: torch.Tensor, shift: torch.Tensor, batch, scales: list[float]) -> dict:
        """The best of the candidate lengths (0 among them) along minus ``direction`` ``(P, D, k)`` from the encoder
        ``current``, each scored by the frozen LLM on the validation users (``z`` ``(V, k)``, ``z_mean`` ``(1, k)``,
        ``shift`` ``(1, P, D)`` the encoder's offset of the mean user, held fixed). A length is the mean change of a
        validation user's offset, of every profile (``profile`` None) or of that profile alone, relative to the
        mean token-embedding norm. With ``uip_line_search_min_z`` > 0 only lengths whose gain is that many standard
        errors above 0 (paired over the validation users: :func:`paired_gain_z`) may be chosen. With
        ``uip_line_search_criterion: ctr`` the chosen length is the one of highest :meth:`held_out_auc` (the
        objective is still measured and recorded). Returns the step, its gain, what was tried, each length's
        ``gain_z`` (and ``ctr_auc``) and the moved encoder."""
        change = torch.einsum("pdk,bk->bpd", direction, z - z_mean).norm(dim=-1)                   # (V, P)
        change_per_unit = float(change.mean() if profile is None else change[:, profile].mean())
        parts: dict[float, dict] = {}

        def candidate(relative: float) -> torch.Tensor:
            return current - (relative * self.embedding_norm / change_per_unit) * direction

        def objective(relative: float) -> float:
            parts[relative] = self._validation_objective(candidate(relative), z, z_mean, shift, batch, scales)
            return parts[relative]["nll"] + parts[relative]["commitment"]

        by_ctr = self.settings.line_search_criterion == "ctr"
        ctr_auc: dict[float, float] = {}

        def score(relative: float) -> float:
            """The likelihood objective, always recorded; the criterion's value: the objective, or minus the AUC."""
            value = objective(relative)
            if by_ctr:
                ctr_auc[relative] = self.held_out_auc(candidate(relative))
                return -ctr_auc[relative]
            return value

        if not change_per_unit > 0:                       # this profile's gradient is zero: nothing to search
            found = {"step": 0.0, "gain": 0.0, "tried": {0.0: objective(0.0)}, "gain_z": {}, "best_z": None,
                     "nll_gain": 0.0, "commitment_gain": 0.0, "encoder": current}
            return {**found, "ctr_auc": {0.0: self.held_out_auc(current)}} if by_ctr else found
        lengths = self.settings.line_search_lengths
        criterion = {relative: score(relative) for relative in (0.0,) + lengths}

        def lowest(candidates):                       # the lowest criterion; among equals, the shortest length
            return min(candidates, key=lambda r: (criterion[r], r))

        relative = lengths[-1]
        for _ in range(LINE_SEARCH_EXPANSIONS):      # the longest step was best: try longer ones while they help
            if lowest(criterion) != relative:
                break
            relative *= 3
            criterion[relative] = score(relative)
        tried = {r: parts[r]["nll"] + parts[r]["commitment"] for r in criterion}
        gain_z = {r: paired_gain_z(parts[0.0]["per_user"], parts[r]["per_user"]) for r in tried if r > 0}
        min_z = self.settings.line_search_min_z      # 0 with the ctr criterion (config)
        best = lowest(r for r in tried if r == 0 or not min_z > 0 or (gain_z[r] is not None and gain_z[r] >= min_z))
        best_z = gain_z.get(lowest(tried))                                 # at the best length, gate or not
        found = {"step": best, "gain": tried[0.0] - tried[best], "tried": tried, "gain_z": gain_z, "best_z": best_z,
                 "nll_gain": parts[0.0]["nll"] - parts[best]["nll"],
                 "commitment_gain": parts[0.0]["commitment"] - parts[best]["commitment"], "encoder": candidate(best)}
        return {**found, "ctr_auc": ctr_auc} if by_ctr else found

    @torch.no_grad()
    def held_out_auc(self, encoder: torch.Tensor) -> float:
        """The CTR criterion's score of the encoder ``encoder`` ``(P, D, k)``: the held-out AUC (:mod:`ctr_proxy`)
        of the IDs it gives every user from their kept training interactions, quantised like an E-step (as many
        Lloyd iterations, warm-started) on copies of the codebooks and of the k-means generator, so the run's own
        draws and codebooks are untouched. The same on every rank."""
        if self._held_out is None:       # built on first use from the seed alone: a resumed run builds the same
            labels = HeldOutLabels.split(self.histories, self.settings.ctr_label_threshold, self.seed)
            users = self.local_users
            z = [self.features(part, [labels.kept[u] for u in part]) for part in _batches(users, 4096)]
            self._held_out = {"labels": labels, "z": torch.cat(z) if z else torch.zeros(0, self.feature_map.dims)}
        z = self._held_out["z"].to(self.device)                                                  # (U_r, k)
        offsets = torch.einsum("pdk,uk->upd", encoder.to(self.device), z)
        if self.free is not None:
            offsets = offsets + self.free.table[torch.as_tensor(self.local_users)].to(self.device)
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())
        codes, _, _ = self.e_step(self.settings.kmeans_iters, copy.deepcopy(self.codebooks), generator,
                                  offsets=offsets.cpu())
        self.comm.phase = "the line search"
        return self._held_out["labels"].auc(codes.numpy())

    @torch.no_grad()
    def _validation_objective(self, encoder: torch.Tensor, z: torch.Tensor, z_mean: torch.Tensor, shift: torch.Tensor,
                              batch, scales: list[float]) -> dict:
        """The M-step objective of the validation users with the encoder ``encoder`` ``(P, D, k)`` (the other
        arguments as in :meth:`_search_length`; ``batch``: their collated prompts), forward only: ``{"nll",
        "commitment"}`` (means over the users, summed over the ranks as before the per-user terms existed) and
        ``"per_user"`` ``(V,)`` float64, each user's weighted NLL plus commitment (every rank's rows)."""
        comm, validation = self.comm, self.validation
        n_users = len(validation.users)
        nll, commitment = 0.0, 0.0
        per_user = torch.zeros(n_users, dtype=torch.float64)           # this rank's rows; the others' are summed in
        for rows in _batches(comm.shard(n_users), self.settings.batch_size * 2):
            users = validation.users[rows]
            offsets = torch.einsum("pdk,bk->bpd", encoder, z[rows] - z_mean) + shift
            if self.free is not None:
                offsets = offsets + self.free.table[torch.as_tensor(users)].to(self.device)
            _, weighted = behaviour_nll(self.llm.model, self.layout, self._sub_batch(batch, rows), self.soft(offsets),
                                        weighted=True)
            nll += float(weighted.double().sum())
            commitment += float(self.commitment(offsets, users, scales)) * len(rows)
            per_user[torch.as_tensor(rows)] = (weighted.double()
                                               + self.commitment(offsets, users, scales, per_user=True).double()).cpu()
        nll, commitment = comm.sum(torch.tensor([nll, commitment], dtype=torch.float64)).tolist()
        return {"nll": nll / n_users, "commitment": commitment / n_users, "per_user": comm.sum(per_user).numpy()}

    @staticmethod
    def _sub_batch(batch, rows):
        """Rows of a collated batch (trimmed to their own longest text)."""
        from recbole_uip.inference.prompt import PromptBatch

        index = torch.as_tensor(rows)
        width = int(batch.behaviour_lengths[index].max()) + (batch.input_ids.shape[1] - int(batch.behaviour_lengths.max()))
        return PromptBatch(batch.input_ids[index, :width], batch.labels[index, :width],
                           batch.allowed[index, :width, :width], batch.behaviour_lengths[index],
                           None if batch.weights is None else batch.weights[index, :width])

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def score(self, targets: Targets, modes=("own", "mean", "other", "none", "code"), permutation_seed: int = 0,
              with_ratings: bool = False) -> dict:
        """Per-user NLL (plain and, where ratings are marked, weighted) of ``targets``' texts with each user's own
        soft tokens (their encoder reading ``targets.inputs``), the mean token (no user information), another
        user's tokens, no profile tokens at all, and their assigned codes. Forward only.

        Returns ``{mode: (B,)}`` and ``{"weighted_" + mode: (B,)}`` float64 arrays; with ``with_ratings`` also
        ``{"rating_" + mode: (B,)}``, the mean NLL over each user's rating tokens alone (nan for a user whose text
        has none; from the same forward pass).

        Raises:
            ValueError: ``with_ratings`` while the behaviour text marks no rating tokens."""
        users = targets.users
        own = self.offsets(users, targets.inputs if self.soft.encoder is not None else None).cpu()
        other = own[np.random.default_rng(permutation_seed).permutation(len(users))]
        mean = own.mean(0, keepdim=True)          # the mean of the very tokens "own" uses: no user information
        batch = self.prompt_batch(targets)
        rating_weights = self.prompt_batch(targets, ratings_only=True).weights if with_ratings else None
        out: dict[str, np.ndarray] = {}
        for mode in tqdm(modes, desc="UIP scoring", ncols=100, disable=not self.show_progress):
            if mode == "code":
                assigned = self.assignments[torch.as_tensor(users)]
                offsets = torch.stack([cb.codes[assigned[:, p]] for p, cb in enumerate(self.codebooks)], 1)
            else:
                offsets = {"own": own, "other": other, "none": own}.get(mode, mean.expand(len(users), -1, -1))
            out[mode], weighted, rating = self._nll_per_user(batch, offsets, hide_profiles=mode == "none",
                                                             rating_weights=rating_weights)
            if weighted is not None:
                out["weighted_" + mode] = weighted
            if rating is not None:
                out["rating_" + mode] = nan_without_ratings(targets, rating)
        return out

    def score_offsets(self, targets: Targets, offsets: torch.Tensor, with_ratings: bool = False,
                      contexts: list[list[int]] | None = None, prefix: torch.Tensor | None = None):
        """Plain NLL per user ``(B,)`` float64 of ``targets``' texts with the offsets ``(B, P, D)`` (the shared
        center added). With ``with_ratings``, the pair ``(plain, rating)``, ``rating`` the mean over each user's
        rating tokens alone (nan for a user whose text has none), from the same forward pass: collated with the
        ratings-only weights, the batch's weighted NLL is that mean, and the plain NLL does not depend on the
        weights. Forward only.

        ``contexts``: per user, token ids read between the template and the text and never scored (the in-context
        reference of ``benchmarks/token_probe.py --context_tokens``: what the user's history adds when read as plain
        text beside the soft tokens); empty contexts give the numbers without.

        ``prefix``: ``(B, N, 2, H, m, d)``, each user's deep prompt read before the template at every layer
        (:meth:`fit_user_prefixes`), or None."""
        if contexts is not None:
            batch = self.prompt_batch(after_contexts(targets, contexts), ratings_only=with_ratings,
                                      unscored=[len(c) for c in contexts])
        else:
            batch = self.prompt_batch(targets, ratings_only=with_ratings)
        plain, rating, _ = self._nll_per_user(batch, offsets, prefix=prefix)
        return (plain, nan_without_ratings(targets, rating)) if with_ratings else plain

    @torch.no_grad()
    def _nll_per_user(self, batch, offsets: torch.Tensor, hide_profiles: bool = False,
                      rating_weights: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Per user of the collated ``batch``, with the offsets ``(B, P, D)`` (and each user's deep prompt ``prefix``
        ``(B, N, 2, H, m, d)``, or None): the plain NLL ``(B,)``, the weighted one
        where the batch marks rating tokens (else None) and, given ``rating_weights`` ``(B, L)`` (the ratings-only
        weights of the same texts), the NLL of the rating tokens alone (else None); float64, all from one forward
        pass in sub-batches of twice ``uip_batch_size`` (each trimmed to its own longest text)."""
        plain, weighted, rating = [], [], []
        for rows in _batches(np.arange(len(offsets)), self.settings.batch_size * 2):
            tokens = self.soft(offsets[torch.as_tensor(rows)].to(self.device))
            sub_batch = self._sub_batch(batch, rows)
            rows_prefix = None if prefix is None else prefix[torch.as_tensor(rows)]
            token_nll = behaviour_token_nll(self.llm.model, self.layout, sub_batch, tokens, hide_profiles, rows_prefix)
            plain.append(token_mean(token_nll, sub_batch.labels).double().cpu())
            if sub_batch.weights is not None:
                weighted.append(weighted_token_mean(token_nll, sub_batch.weights).double().cpu())
            if rating_weights is not None:
                index = torch.as_tensor(rows)
                rating.append(weighted_token_mean(token_nll, rating_weights[index, :token_nll.shape[1] + 1]).double().cpu())
        return (torch.cat(plain).numpy(), torch.cat(weighted).numpy() if weighted else None,
                torch.cat(rating).numpy() if rating else None)

    @torch.no_grad()
    def teacher_probabilities(self, targets: Targets, contexts: list[list[int]], offsets: torch.Tensor,
                              prefix: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen LLM's next-token distributions over ``targets``' texts when it reads ``contexts[b]`` (token
        ids) between the template (with the offsets ``(B, P, D)``) and the text, as :meth:`score_offsets` reads
        ``contexts``, and with ``prefix`` ``(B, N, 2, H, m, d)``, a deep prompt per user, read before it all (None:
        none): float32 ``(B, L - 1, V)``, aligned with the positions of ``prompt_batch(targets)`` (position ``t``
        predicts that batch's ``labels[:, t + 1]``; zero rows elsewhere). The teacher of :meth:`fit_user_tokens`'s
        and :meth:`fit_user_prefixes`' distillation."""
        read = after_contexts(targets, contexts)
        lp = self.layout.prefix_length
        width = lp + max(len(text) for text in targets.texts)
        probabilities = None
        for rows in _batches(np.arange(len(targets.texts)), self.settings.batch_size * 2):
            batch = collate(self.layout, [read.texts[r] for r in rows], self.llm.tokenizer.pad_token_id)
            index = torch.as_tensor(rows)
            logits = behaviour_logits(self.llm.model, self.layout, batch, self.soft(offsets[index].to(self.device)),
                                      prefix=None if prefix is None else prefix[index].to(self.device))
            if probabilities is None:
                probabilities = torch.zeros(len(targets.texts), width - 1, logits.shape[-1])
            for i, r in enumerate(rows):
                n, c = len(targets.texts[r]), len(contexts[r])
                # the text's token j is predicted at lp + j - 1 here and at lp + c + j - 1 after the context
                probabilities[r, lp - 1:lp - 1 + n] = torch.softmax(logits[i, lp + c - 1:lp + c - 1 + n].float(), -1).cpu()
        return probabilities

    def fit_user_tokens(self, targets: Targets | list[Targets], start: torch.Tensor, steps: int,
                        learning_rate: float, weighted: bool = False,
                        teacher: torch.Tensor | list[torch.Tensor] | None = None,
                        texts_per_step: int = 1) -> torch.Tensor:
        """Each user's offsets fitted alone to their own text in ``targets``: ``steps`` Adam steps (one step count
        per user, :class:`FreeTokens`) on the plain NLL (with ``weighted``, the M-step's objective, whose rating
        tokens weigh ``uip_rating_weight``) from ``start`` ``(B, P, D)``, the shared shift and the LLM fixed. A
        list of ``Targets`` (the same users, other texts) is cycled through, one per step (``texts_per_step`` per
        step, each step on the mean of their gradients). Returns the fitted offsets ``(B, P, D)`` float32 on CPU.
        ``learning_rate`` is relative to the mean token-embedding norm: an Adam step moves a row by about
        ``learning_rate * |e|``.

        What the paper's free token can learn about a user when it gets as many steps as it needs (the EM loop gives
        each row one step per round); ``benchmarks/token_probe.py`` asks whether that carries to text it never saw.
        Each user's loss term is their own, so their gradient is too (the batch's losses are summed, not averaged).

        ``teacher`` ``(B, L - 1, V)`` (:meth:`teacher_probabilities` of ``targets``), or one per ``Targets`` of a
        list: distillation instead of the NLL, the tokens fitted to what the LLM predicts for each text given the
        teacher's context (:func:`soft_target_nll`), not to the one text drawn."""
        step = learning_rate * self.embedding_norm / start.shape[-1] ** 0.5
        center = self.soft.center().detach()[None]                  # (1, P, D): no gradient into the shared shift
        return self._fit_rows(targets, start, steps, step, weighted, teacher,
                              lambda rows: (center + rows.to(self.device), None), texts_per_step)

    def shared_keys_values(self) -> torch.Tensor:
        """``(N, 2, H, P, d)``: the keys and values the shared soft tokens give each layer at their positions."""
        return soft_token_keys_values(self.llm.model, self.layout, self.soft.center().detach(),
                                      self.llm.tokenizer.pad_token_id)

    def shared_prefix(self, count: int) -> torch.Tensor:
        """``(count, N, 2, H, P, d)``: every user's deep prompt before any fitting, one entry per profile: at every
        layer the keys the shared soft tokens have there (:func:`soft_token_keys_values`) and zero values. A prompt
        whose values are zero adds nothing to what a position reads, it only takes attention from the rest (on
        ml-100k with SmolLM2, 16 users' held-out items: within 0.01 nats/token of the shared token alone after one
        pass of the shift, where a copy of the shared tokens' values too, the profiles read twice, was 0.24 worse;
        after the probe's eight passes 0.37 worse, the trained tokens' keys drawing much attention, which a fit
        recovers in its first steps)."""
        start = self.shared_keys_values()
        start[:, 1] = 0.0
        return start[None].expand(count, *start.shape).clone()

    def fit_user_prefixes(self, targets: Targets | list[Targets], start: torch.Tensor, steps: int,
                          learning_rate: float, weighted: bool = False,
                          teacher: torch.Tensor | list[torch.Tensor] | None = None,
                          texts_per_step: int = 1) -> torch.Tensor:
        """:meth:`fit_user_tokens` with a deep prompt in place of the soft tokens' offsets: each user's keys and
        values at every layer ``(B, N, 2, H, m, d)`` fitted alone from ``start`` (:meth:`shared_prefix`), the soft
        tokens kept at the shared token. ``learning_rate`` is relative to each layer's root mean square key (and
        value) of the shared soft tokens (:func:`prefix_step_scale`), as the soft tokens' is to the token-embedding
        norm. Returns the fitted prefixes, float32 on CPU; the arguments otherwise as :meth:`fit_user_tokens`'."""
        start = start.detach().cpu().float()
        scale = prefix_step_scale(self.shared_keys_values())[None]  # (1, N, 2, 1, 1, 1)
        tokens = self.soft.center().detach()[None].expand(start.shape[0], -1, -1)
        steps_taken = self._fit_rows(targets, torch.zeros_like(start), steps, learning_rate, weighted, teacher,
                                     lambda rows: (tokens, start + scale * rows), texts_per_step)
        return start + scale * steps_taken

    def _fit_rows(self, targets: Targets | list[Targets], start: torch.Tensor, steps: int, learning_rate: float,
                  weighted: bool, teacher, inputs, texts_per_step: int = 1) -> torch.Tensor:
        """The loop of :meth:`fit_user_tokens` and :meth:`fit_user_prefixes`: ``steps`` Adam steps of
        ``learning_rate`` (absolute) on per-user rows ``(B, ...)`` from ``start``; ``inputs(rows)`` gives the LLM's
        soft tokens ``(B, P, D)`` and deep prompt (or None) for the current rows. Step ``s`` takes the mean
        gradient of texts ``s * texts_per_step`` to ``(s + 1) * texts_per_step - 1`` of ``targets`` (cycled), one
        forward and backward pass each: a less noisy step on as many texts as that many single-text steps. Returns
        the fitted rows, float32 on CPU."""
        if texts_per_step < 1:
            raise ValueError(f"A fit step takes at least one text, not {texts_per_step}.")
        targets = targets if isinstance(targets, list) else [targets]
        batches = [self.prompt_batch(t) for t in targets]
        if weighted and targets[0].flags is None:
            raise ValueError("The weighted objective needs rating tokens, and the behaviour text marks none.")
        teachers = None if teacher is None else teacher if isinstance(teacher, list) else [teacher]
        if teachers is not None and (weighted or len(teachers) != len(targets)):
            raise ValueError(f"Distillation fits each text to its own teacher, on no other objective: {len(targets)} "
                             f"texts, {len(teachers)} teachers{', weighted' if weighted else ''}.")
        rows = FreeTokens(start.detach().cpu(), "adam", learning_rate)
        index = torch.arange(start.shape[0])
        for step in range(steps):
            leaf = rows.rows(index)
            for j in range(texts_per_step):                         # the inputs anew: each backward frees its graph
                tokens, prefix = inputs(leaf)
                k = (step * texts_per_step + j) % len(batches)      # this text (and its teacher)
                if teachers is not None:
                    loss = soft_target_nll(self.llm.model, self.layout, batches[k], tokens, teachers[k], prefix)
                else:
                    plain, objective = behaviour_nll(self.llm.model, self.layout, batches[k], tokens, weighted=True,
                                                     prefix=prefix)
                    loss = objective if weighted else plain
                (loss.sum() / texts_per_step).backward()            # the leaf's gradient accumulates the mean
            rows.step(index, leaf)
        return rows.table.clone()

    def diagnose(self) -> dict[str, np.ndarray]:
        """Do the soft tokens carry *user* information? Each user's newest items within the budget, scored with the
        modes of :meth:`score` while the encoder reads their other items. On with ``uip_diagnostics``.
        Distributed, each rank scores its users (the mean and another user's tokens are those of its own users) and
        the scores are gathered."""
        self.comm.phase = "the diagnostics"
        users = self.local_users
        texts, flags, inputs = [], [], []
        for u in users:
            target = self.text.newest_target(u, self.settings.max_behaviour_tokens)
            ids, rating_flags = self.text.tokens(u, target, self.settings.max_behaviour_tokens)
            texts.append(ids)
            flags.append(rating_flags)
            inputs.append(np.setdiff1d(np.arange(len(self.histories.items[u])), target))
        scores = self.score(Targets(users, texts, None if self.text.rating_flags is None else flags, inputs))
        scores = {key: self.gather_users(torch.from_numpy(value)).numpy() for key, value in scores.items()}
        means = ", ".join(f"{mode} {scores[mode].mean():.4f}" for mode in ("own", "mean", "other", "none", "code"))
        self.logger.info(f"UIP diagnostics, NLL of each user's newest items (nats/token): {means}.")
        return {f"nll_{key}": value for key, value in scores.items()}

    # ------------------------------------------------------------------------------------------------ fit
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the shared soft-token parameters (the free tokens are a row-updated table, not parameters);
        the LLM is asserted frozen and codebooks are buffers."""
        assert_frozen(self.llm.model)
        return [p for p in (self.soft.shared, self.soft.encoder) if p is not None]

    def fit(self) -> InferenceResult:
        """Run the EM loop (see module docstring) with ``uip_num_threads`` torch threads."""
        threads_before = torch.get_num_threads()
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads_before)

    def _fit(self) -> InferenceResult:
        settings, logger = self.settings, self.logger
        start = time.perf_counter()
        assert_frozen(self.llm.model)
        logger.info(
            f"UIP inference: {len(self.histories)} users, profiles {settings.profile_names}, codebooks "
            f"{list(settings.codebook_sizes.values())}, encoder {settings.encoder}, prompt prefix "
            f"{self.layout.prefix_length} tokens, {torch.get_num_threads()} threads, {self.llm.dtype}, {self.device}"
            + (f", {self.comm.world_size} ranks ({len(self.local_users)} users on rank 0)." if self.comm.distributed else ".")
        )
        state = self.checkpoint.load() if self.checkpoint is not None else None
        if self.comm.distributed:
            where = None if state is None else (state["phase"], state["epoch"], (state.get("progress") or {}).get("done"))
            if not self.comm.same_on_all(where):       # a kill between two ranks' saves: no common point
                if state is not None:
                    logger.warning("UIP: the ranks' checkpoints stop at different points; starting afresh.")
                state = None
        shared_opt = None
        if state is None:
            self.setup()
            shared_opt = self.shared_optimizer()
            self._loop = {"initial_offsets": self.local_offsets(), "first_nll": None, "last_nll": None,
                          "changes": torch.zeros(len(self.histories), len(self.codebooks), dtype=torch.long)}
            self.assignments, healths, self._loop["scales"] = self.e_step(settings.kmeans_iters)
            self._loop["initial_assignments"] = self.untrained_control()
            self._loop["random_step"] = self.start_random_step_control()
            self._log_round(0, None, healths, None, start)
            self._save("round", 0, shared_opt)
            epoch, progress = 1, None
        else:
            shared_opt = self._restore(state)
            start -= state["elapsed"]
            epoch, progress = state["epoch"] + (state["phase"] == "round"), state.get("progress")
            where = (f"round {state['epoch']}, batch {progress['done']} of its M-step" if progress is not None
                     else f"the end of round {state['epoch']}")
            logger.info(f"UIP: resuming from the checkpoint {self.checkpoint.path} at {where}.")
        loop = self._loop
        for epoch in range(epoch, settings.epochs + 1):
            nll = self.m_step(epoch, loop["scales"], shared_opt, progress)
            progress = None
            loop["first_nll"] = nll if loop["first_nll"] is None else loop["first_nll"]
            loop["last_nll"] = nll
            control = loop.get("random_step")
            before = None if control is None else self.soft.encoder.detach().cpu().clone()
            search = self.line_search(loop["scales"]) if self.validation is not None else None
            if control is not None:
                self.advance_random_step_control(control, self.soft.encoder.detach().cpu() - before)
            previous = self.assignments
            self.assignments, healths, loop["scales"] = self.e_step(settings.kmeans_iters)
            changed = self.assignments != previous
            loop["changes"] += changed.long()
            stability = (~changed).float().mean(0).tolist()
            record = self._log_round(epoch, nll, healths, stability, start, loop["first_nll"], search)
            self._save("round", epoch, shared_opt, elapsed=record["seconds"])
            for hook in self.epoch_end_hooks:
                hook(self, epoch, record)
        initial_offsets, initial_assignments = loop["initial_offsets"], loop["initial_assignments"]
        first_nll, last_nll, changes = loop["first_nll"], loop["last_nll"], loop["changes"]
        self.comm.phase = "gathering the results"
        local_offsets = self.local_offsets()
        movement = self.gather_users((local_offsets - initial_offsets).norm(dim=-1)
                                     / initial_offsets.norm(dim=-1).clamp(min=1e-12))             # (U, P)
        final_offsets = self.gather_users(local_offsets)                                           # (U, P, D)
        unvisited = np.full(len(self.histories), np.nan)
        per_user = {
            "nll_first_round": unvisited if first_nll is None else first_nll.numpy(),
            "nll_last_round": unvisited if last_nll is None else last_nll.numpy(),
            "relative_movement": movement.numpy(),                      # (U, P)
            "code_changes": changes.numpy(),                            # (U, P) E-steps where the code moved
        }
        if settings.epochs:
            self._log_convergence(per_user)
        if settings.diagnostics:
            per_user.update(self.diagnose())
        encoder = self.soft.encoder
        return InferenceResult(
            users=list(self.histories.users),
            codes=self.assignments.numpy().astype(np.int64),
            initial_codes=initial_assignments.numpy().astype(np.int64),
            random_step_codes=None if loop.get("random_step") is None
            else loop["random_step"]["codes"].numpy().astype(np.int64),
            codebooks=[cb.codes.numpy().copy() for cb in self.codebooks],
            projections=None if self.codebooks[0].projection is None else [cb.projection.numpy().copy() for cb in self.codebooks],
            offsets=final_offsets.numpy(),
            summaries=None if self.summaries is None else self.summaries.numpy(),
            item_ids=None if self.item_embeddings is None else list(self.histories.item_ids),
            item_embeddings=None if self.item_embeddings is None else self.item_embeddings.numpy(),
            feature_map=self.feature_map,
            anchors=self.soft.anchors.detach().cpu().numpy(),
            shared=self.soft.shared.detach().cpu().numpy(),
            encoder=None if encoder is None else encoder.detach().cpu().numpy(),
            history=self.history,
            per_user=per_user,
        )

    # ---------------------------------------------------------------------------------------- checkpoints
    def shared_optimizer(self) -> torch.optim.Adam | None:
        """A fresh Adam on the shared shift ``b (P, D)`` at ``uip_shared_learning_rate``; None when that is 0 (the
        paper's setting: no shift)."""
        if self.settings.shared_learning_rate > 0:
            return torch.optim.Adam([self.soft.shared], lr=self.settings.shared_learning_rate)
        return None

    def _save(self, phase: str, epoch: int, shared_opt, progress: dict | None = None, elapsed: float | None = None) -> None:
        """Checkpoint the whole state (see :mod:`recbole_uip.inference.checkpoint`); no-op without a checkpoint.

        ``phase``: ``round`` (round ``epoch`` complete, E-step included) or ``m_step`` (``progress``: the position
        in round ``epoch``'s M-step pass; the encoder's accumulated gradient is kept)."""
        if self.checkpoint is None:
            return
        free = None if self.free is None else {k: getattr(self.free, k) for k in ("table", "exp_avg", "exp_avg_sq",
                                                                                   "step_count") if hasattr(self.free, k)}
        self.checkpoint.save({
            "phase": phase, "epoch": epoch, "progress": progress,
            "elapsed": elapsed if elapsed is not None else (self.history[-1]["seconds"] if self.history else 0.0),
            "item_embeddings": self.item_embeddings, "feature_map": self.feature_map, "summaries": self.summaries,
            "soft": {k: v.detach().cpu().clone() for k, v in self.soft.state_dict().items()},
            "encoder_grad": None if self.soft.encoder is None or self.soft.encoder.grad is None
            else self.soft.encoder.grad.detach().cpu().clone(),
            "free": free, "shared_opt": None if shared_opt is None else shared_opt.state_dict(),
            "codebooks": [{"codes": cb.codes.cpu(), "initialised": cb.initialised.cpu(), "projection": cb.projection,
                           "projection_share": cb.projection_share} for cb in self.codebooks],
            "assignments": self.assignments, "loop": self._loop, "history": self.history,
            "generator": self.generator.get_state(), "rng": self.rng.bit_generator.state,
        })

    def _restore(self, state: dict):
        """Put a checkpoint's state back (the item embeddings are not recomputed); returns the shared optimiser."""
        self.item_embeddings, self.feature_map, self.summaries = (state["item_embeddings"], state["feature_map"],
                                                                 state["summaries"])
        self._setup_tokens()
        self.soft.load_state_dict(state["soft"])
        if state["encoder_grad"] is not None:
            self.soft.encoder.grad = state["encoder_grad"].to(self.device)
        if state["free"] is not None:
            for key, value in state["free"].items():
                setattr(self.free, key, value)
        shared_opt = self.shared_optimizer()
        if shared_opt is not None and state["shared_opt"] is not None:
            shared_opt.load_state_dict(state["shared_opt"])
        for codebook, saved in zip(self.codebooks, state["codebooks"]):
            codebook.codes.copy_(saved["codes"])
            codebook.initialised.copy_(saved["initialised"])
            codebook.projection = saved["projection"]
            codebook.projection_share = saved["projection_share"]
        self.assignments, self._loop, self.history = state["assignments"], state["loop"], state["history"]
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        return shared_opt

    # -------------------------------------------------------------------------------------------- logging
    def _log_round(self, epoch, nll, healths, stability, start, first_nll=None, search=None) -> dict:
        record = {"round": epoch, "seconds": round(time.perf_counter() - start, 1)}
        if epoch == 1 and "shift_warmup" in self._loop:
            record["shift_warmup"] = self._loop["shift_warmup"]
        parts = [f"UIP round {epoch}/{self.settings.epochs}"]
        if nll is not None:
            seen = ~torch.isnan(nll)
            record["nll"] = float(nll[seen].mean())
            parts.append(f"NLL {record['nll']:.4f}")
            both = seen & ~torch.isnan(first_nll)   # users visited in round 1 and now (all without uip_mstep_users)
            if epoch > 1 and bool(both.any()):
                drop = (first_nll - nll)[both].numpy()
                record["nll_drop_median"] = float(np.median(drop))
                record["users_nll_improved"] = float((drop > 0).mean())
                parts.append(f"per-user drop since round 1 median {record['nll_drop_median']:.4f} "
                             f"({100 * record['users_nll_improved']:.0f}% improved)")
        if search is not None:
            record["line_search"] = search
            step = ("steps " + ", ".join(f"{name} {value:g}" for name, value in search["steps"].items())
                    if "steps" in search else f"step {search['step']:g}")
            z = format_step_z(search.get("steps", search["step"]), search.get("gain_z", {}), search.get("best_z"))
            change = {k: 0.0 - search.get(k, 0.0) for k in ("gain", "nll_gain", "commitment_gain")}  # never -0
            parts.append(f"encoder {step} (validation objective {change['gain']:+.4f}: NLL "
                         f"{change['nll_gain']:+.4f}, commitment {change['commitment_gain']:+.4f}; "
                         f"gain/standard error {z})")
            if "ctr_auc" in search:
                parts.append("held-out AUC of the IDs " + format_ctr_auc(search.get("steps", search["step"]),
                                                                          search["ctr_auc"]))
            agreement = search.get("gradient_agreement")
            if agreement:
                parts.append("gradient split-half cosine " + ", ".join(
                    f"{name} {'n/a' if a['cosine'] is None else format(a['cosine'], '.3f')}" for name, a in agreement.items()))
        for p, name in enumerate(self.settings.profile_names):
            h = healths[p]
            record[name] = {"usage": h.usage, "perplexity": round(h.perplexity, 3), "dead_codes": h.dead_codes,
                            "restarted": h.restarted}
            text = f"{name}: perplexity {h.perplexity:.2f}/{len(h.usage)}, dead {h.dead_codes}"
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
        drop = per_user["nll_first_round"] - per_user["nll_last_round"]
        drop = drop[~np.isnan(drop)]
        if len(self.history) > 2 and len(drop):
            text += f"; NLL drop per user median {np.median(drop):.4f}, p10 {np.quantile(drop, 0.1):.4f}"
        self.logger.info(text + ".")
