"""One soft token per group of users (``benchmarks/token_probe.py --group_tokens``, step 7 of its docstring): the
groups, their tokens trained one group at a time or all together beside the shift, each probed user's group chosen
by the nearest code or by likelihood (an E-step), and the group's part scored as training goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recbole_uip.inference.codebook import ProfileCodebook
from recbole_uip.inference.trainer import Targets
from recbole_uip.token_probe.group_parts import group_part_summary
from recbole_uip.token_probe.modes import BATCH
from recbole_uip.token_probe.stages import batch_passes, mult_vae_of, train_passes


GROUP_BY = ("items", "mult_vae")
GROUP_TRAINING = ("separate", "joint")


@dataclass
class GroupTokens:
    """One token per group of users (``--group_tokens``): ``tokens (K, P, D)``, each group's offset from the shared
    shift it started from; ``group`` and ``likeliest`` ``(n,)``, per probed user (in the probe's order of users), the
    group of the nearest code and the group whose token explains a draw of their remaining training text best;
    ``best``, the group whose
    token explains those draws best over all the probed users (the same choice made once for everyone);
    ``sizes (K,)`` the groups' training users; ``nll`` each group's NLL per pass (``--group_training=joint``: one
    list, every group's together); ``fit_users`` and ``fit_group`` the users the tokens were trained on and their
    groups; ``trajectory``, the :class:`GroupPartTrajectory` (None without ``--group_score_every``); ``relative``
    ``(n,)``, per probed user the group whose token explains their draw best against how it explains every probed
    user's (:func:`relative_choice`); ``relative_pooled`` ``(n,)``, the same choice by the mean NLL of
    ``--group_choice_draws`` draws, the first of them ``relative``'s (None with one draw)."""
    tokens: torch.Tensor
    group: np.ndarray
    likeliest: np.ndarray
    best: int
    sizes: list[int]
    nll: list
    fit_users: np.ndarray
    fit_group: np.ndarray
    trajectory: GroupPartTrajectory | None = None
    relative: np.ndarray | None = None
    relative_pooled: np.ndarray | None = None

    def final_held_out_scores(self, batch: int) -> tuple[np.ndarray, ...] | None:
        """Batch ``batch``'s ``score_every_token`` tuple of the probed users' held-out texts with the final tokens,
        where the trajectory's last scoring was after the last pass (the same tokens, texts and batches as the
        probe's: the scores to the last digit); None where it was not, so that the probe scores them."""
        last = self.trajectory.last_held_out if self.trajectory is not None else None
        return last[1][batch] if last is not None and last[0] == len(self.nll) else None


def group_vectors(trainer, group_by: str, fit_users: np.ndarray) -> np.ndarray:
    """Every user's vector ``(U, k)`` of their remaining training items that the groups are drawn on: ``items``, the
    pipeline's untrained ``z`` (``trainer.summaries``); ``mult_vae``, the mean code of a Mult-VAE with as many
    dimensions (``uip_encoder_dims``) trained on the remaining histories of ``fit_users`` alone."""
    if group_by == "items":
        return trainer.summaries.cpu().numpy()
    from recbole_uip import mult_vae

    return mult_vae.latent_means(*mult_vae_of(trainer, fit_users, trainer.settings.encoder_dims))


def user_groups(vectors: np.ndarray, fit_users: np.ndarray, users: np.ndarray, k: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The groups ``(len(fit_users),)`` and ``(len(users),)`` of a whitened k-means with ``k`` codes (the pipeline's
    quantiser, 20 Lloyd iterations) fitted on ``vectors[fit_users]`` (``vectors``: ``(U, k')``); ``users`` take their
    nearest code."""
    codebook = ProfileCodebook(k, vectors.shape[1], metric="whitened")
    fitted, _ = codebook.fit(torch.as_tensor(vectors[fit_users]), 20, torch.Generator().manual_seed(seed))
    return fitted.numpy(), codebook.assign(torch.as_tensor(vectors[users])).numpy()


def fit_group_tokens(trainer, fit_users: np.ndarray, groups: np.ndarray, k: int, passes: int, learning_rate: float,
                     rng: np.random.Generator, logger) -> tuple[torch.Tensor, list[list[float]]]:
    """Each group's token ``(K, P, D)``, as an offset from the shared shift ``b``: the shift trained on for
    ``passes`` passes over the group's users of ``fit_users`` alone (:func:`train_passes`, a fresh Adam per group at
    ``learning_rate``, 0: the shift's own), then ``b`` put back; and each group's NLL per pass."""
    base = trainer.soft.shared.detach().clone()
    tokens, losses = [], []
    try:
        for g in range(k):
            with torch.no_grad():
                trainer.soft.shared.copy_(base)
            members = fit_users[groups == g]
            logger.info(f"token probe: group {g + 1} of {k}, {len(members)} users")
            losses.append(train_passes(trainer, members, passes, rng, logger, shift_learning_rate=learning_rate))
            tokens.append(trainer.soft.shared.detach().clone() - base)
    finally:
        with torch.no_grad():
            trainer.soft.shared.copy_(base)
    return torch.stack(tokens), losses


def fit_group_tokens_jointly(trainer, fit_users: np.ndarray, groups: np.ndarray, k: int, passes: int,
                             learning_rate: float, rng: np.random.Generator, logger,
                             after_pass=None, offset_learning_rate: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Each group's token ``(K, P, D)`` as an offset from the shared shift ``b`` it started from, all groups trained
    together (``--group_training=joint``): ``passes`` passes over ``fit_users`` in M-step batches of every group's
    users, a user's token ``b + O[g]`` with ``O (K, P, D)`` (zeros at the start) stepping on its batch-centred
    gradient and ``b`` beside it on the batch's whole gradient, each by a fresh Adam at ``learning_rate`` (0: the
    shift's own step; as :func:`fit_group_tokens` trains each group's copy of ``b``, so that the two compare at one
    step: a fresh Adam at the shift's own 0.01 overshoots on ml-100k); ``O`` at ``offset_learning_rate`` where it is
    given (0: the same step as ``b``). A group's token is then ``b' - b + O[g]``,
    and ``b`` is put back. The mean NLL of each pass. ``after_pass(passes_done, tokens)``, if given, is called after
    every pass with the groups' tokens as they stand (``(K, P, D)``, as returned at the end).

    Batch-centred as the encoder's gradient is (``ProfileInferenceTrainer.offsets``): ``O[g]`` enters a batch as
    ``O[g_u] - mean_B O[g_u]`` plus that mean held fixed, so group ``g``'s rows get their users' gradient less their
    share of the batch's mean, and what every user needs goes to ``b`` alone. Trained one group at a time
    (:func:`fit_group_tokens`), each token also learns what every user needs, with as many steps as its group has
    batches; here every group's token steps at every batch that holds one of its users, on what sets them apart."""
    from recbole_uip.inference.soft_profiles import behaviour_nll

    base = trainer.soft.shared.detach().clone()
    table = torch.zeros(k, *base.shape, requires_grad=True)
    shared_opt = trainer.shared_optimizer()
    if learning_rate:
        shared_opt.param_groups[0]["lr"] = learning_rate
    table_opt = torch.optim.Adam([table], lr=offset_learning_rate or shared_opt.param_groups[0]["lr"])
    group_of = np.zeros(len(trainer.histories.items), dtype=np.int64)       # (U,): each fit user's group
    group_of[fit_users] = groups

    def step(targets) -> float:
        with torch.no_grad():
            start = trainer.offsets(targets.users, targets.inputs)                      # (B, P, D): A z, as the shift's
        part = table[torch.as_tensor(group_of[targets.users])]                          # (B, P, D)
        mean = part.mean(0, keepdim=True)
        offsets = start.to(trainer.device) + (part - mean + mean.detach()).to(trainer.device)
        plain, objective = behaviour_nll(trainer.llm.model, trainer.layout, trainer.prompt_batch(targets),
                                         trainer.soft(offsets), weighted=True)
        shared_opt.zero_grad(set_to_none=True)
        table_opt.zero_grad(set_to_none=True)
        objective.mean().backward()
        shared_opt.step()
        table_opt.step()
        return float(plain.detach().mean())

    def scored(passes_done: int) -> None:        # scored as at the end: the tokens as offsets from b, b in place
        trained = trainer.soft.shared.detach().clone()
        with torch.no_grad():
            trainer.soft.shared.copy_(base)
        after_pass(passes_done, trained - base + table.detach())
        with torch.no_grad():
            trainer.soft.shared.copy_(trained)

    try:
        means = batch_passes(trainer, fit_users, passes, rng, logger, step, f"the {k} group tokens together,",
                             after_pass=scored if after_pass is not None else None)
        tokens = trainer.soft.shared.detach() - base + table.detach()
    finally:
        with torch.no_grad():
            trainer.soft.shared.copy_(base)
    return tokens, means


def score_every_token(trainer, targets, tokens: torch.Tensor, with_ratings: bool = False) -> tuple[np.ndarray, ...]:
    """``targets``' texts scored with each of ``tokens (K, P, D)`` in turn, the same token for every user:
    ``(plain,)`` or, ``with_ratings``, ``(plain, rating)``, each ``(K, B)`` (as
    :meth:`ProfileInferenceTrainer.score_offsets`)."""
    scored = [trainer.score_offsets(targets, token.expand(len(targets.users), *token.shape), with_ratings=with_ratings)
              for token in tokens]
    return tuple(np.stack(part) for part in zip(*scored)) if with_ratings else (np.stack(scored),)


def group_likelihoods(trainer, users: np.ndarray, tokens: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """``(K, n)``: the plain NLL of one draw of each user's remaining training text
    (:meth:`ProfileInferenceTrainer.targets`) with each group's token ``tokens (K, P, D)``; its argmin over groups is
    an E-step by likelihood."""
    return np.concatenate([score_every_token(trainer, trainer.targets(users[start:start + BATCH], rng), tokens)[0]
                           for start in range(0, len(users), BATCH)], axis=1)


def build_group_tokens(trainer, fit_users: np.ndarray, users: np.ndarray, args, logger,
                       held_out_targets=None) -> GroupTokens:
    """``--group_tokens``: the groups of ``fit_users`` and ``users`` (the probed), the groups' tokens and the probed
    users' groups (``benchmarks/token_probe.py``'s docstring, step 7; ``args``, its parsed arguments). The stage
    draws from a generator of its own, so that no other mode's draws change; with ``--group_score_every``, the
    group's part after every N passes
    (:class:`GroupPartTrajectory`, ``GroupTokens.trajectory``; ``held_out_targets``:
    ``HeldOutInference.held_out_targets``), its training users' texts drawn from one more generator so that the
    training's draws do not change either."""
    if trainer.shared_optimizer() is None:
        raise SystemExit("--group_tokens trains the shared shift per group: uip_shared_learning_rate must be > 0.")
    vectors = group_vectors(trainer, args.group_by, fit_users)
    fitted, probed = user_groups(vectors, fit_users, users, args.group_tokens, args.probe_seed)
    rng = np.random.default_rng([args.probe_seed, 3])
    trajectory = None
    if args.group_score_every:
        sample_rng = np.random.default_rng([args.probe_seed, 4])
        sample = np.sort(sample_rng.choice(fit_users, min(len(users), len(fit_users)), replace=False))
        trajectory = GroupPartTrajectory(
            trainer, args.group_score_every,
            [held_out_targets(users[s:s + BATCH]) for s in range(0, len(users), BATCH)], probed,
            sample, fitted[np.searchsorted(fit_users, sample)],              # the benchmark sorts fit_users
            [trainer.targets(sample[s:s + BATCH], sample_rng) for s in range(0, len(sample), BATCH)],
            [held_out_targets(sample[s:s + BATCH]) for s in range(0, len(sample), BATCH)], logger)
    if args.group_training == "joint":
        tokens, nll = fit_group_tokens_jointly(trainer, fit_users, fitted, args.group_tokens, args.group_passes,
                                               args.group_learning_rate, rng, logger, trajectory,
                                               args.group_offset_learning_rate)
    else:
        tokens, nll = fit_group_tokens(trainer, fit_users, fitted, args.group_tokens, args.group_passes,
                                       args.group_learning_rate, rng, logger)
    # (draws, K, n); the first draw comes first from rng, so that every choice made on it stays a one-draw run's
    nll_by_draw = np.stack([group_likelihoods(trainer, users, tokens, rng) for _ in range(args.group_choice_draws)])
    nll_by_group = nll_by_draw[0]
    likeliest, relative = nll_by_group.argmin(0), relative_choice(nll_by_group)
    pooled = relative_choice(nll_by_draw.mean(0)) if len(nll_by_draw) > 1 else None
    logger.info(f"token probe: {args.group_tokens} group tokens; the likeliest group is the nearest code's for "
                f"{np.mean(likeliest == probed):.0%} of the probed users, the relatively likeliest for "
                f"{np.mean(relative == probed):.0%}"
                + (f", over {len(nll_by_draw)} draws for {np.mean(pooled == probed):.0%}" if pooled is not None
                   else ""))
    return GroupTokens(tokens, probed, likeliest, int(nll_by_group.mean(1).argmin()),
                       np.bincount(fitted, minlength=args.group_tokens).tolist(), nll, fit_users, fitted, trajectory,
                       relative, pooled)


def relative_choice(nll_by_group: np.ndarray) -> np.ndarray:
    """``(n,)``: per user (column of ``nll_by_group (K, n)``, each group's token on a draw of each user's remaining
    training text), the group whose token explains their draw best against its mean over all ``n`` users: an E-step
    by likelihood with how good a token is for everyone taken out. The plain argmin (``group_likeliest``) sends most
    users to the one token best for everyone (the experiment log, "One token per group of users"); this asks which
    token fits *this* user better than it fits the others, the choice a profile ID is for."""
    return (nll_by_group - nll_by_group.mean(1, keepdims=True)).argmin(0)


class GroupPartTrajectory:
    """``--group_score_every=N``: after every N passes of :func:`fit_group_tokens_jointly` (its ``after_pass``), the
    group's part (own group's token - :func:`additive_twin`) as it stands, mean and 95% interval over users, on

    * ``held_out``: the probed users' held-out texts (``held_out``, targets in batches; ``probed_groups (n,)``), as
      the probe scores them at the end: does what a group's token carries of new users grow with passes;
    * ``trained_users``: one draw of the remaining training text, fixed at the start, of ``sample (m,)``, users the
      tokens train on (``sample_texts``; ``sample_groups (m,)``): the kind of text the tokens are trained on, their
      own users' (a group's token that does not set its users apart there has not learnt its group);
    * ``trained_users_held_out``: the same users' held-out newest items (``sample_held_out``), which nothing trains
      on: there and not on the new users, a token has learnt its users' taste but the probed users' group does not
      share it; on neither, it has learnt its users' texts, not their taste over items;

    each also over the rating tokens alone (``rating_*``) where the text marks them. ``entries``: one dict per
    scoring, ``{"passes", "held_out", "trained_users", ...: {"mean", "ci"}}``; ``last_held_out``, the latest
    scoring's ``(passes, per batch of held_out: score_every_token's tuple)``, which the probe reuses at the end
    when it scored the final tokens (:meth:`GroupTokens.final_held_out_scores`)."""

    def __init__(self, trainer, every: int, held_out: list[Targets], probed_groups: np.ndarray,
                 sample: np.ndarray, sample_groups: np.ndarray, sample_texts: list[Targets],
                 sample_held_out: list[Targets], logger):
        self.trainer, self.every, self.logger = trainer, every, logger
        self.sample, self.sample_groups = sample, sample_groups
        self.texts = {"held_out": (held_out, probed_groups), "trained_users": (sample_texts, sample_groups),
                      "trained_users_held_out": (sample_held_out, sample_groups)}
        self.entries: list[dict] = []
        self.last_held_out: tuple[int, list[tuple[np.ndarray, ...]]] | None = None

    def __call__(self, passes_done: int, tokens: torch.Tensor) -> None:
        if passes_done % self.every:
            return
        entry: dict = {"passes": passes_done}
        for name, (batches, groups) in self.texts.items():
            scored = [score_every_token(self.trainer, t, tokens, with_ratings=t.flags is not None) for t in batches]
            if name == "held_out":
                self.last_held_out = (passes_done, scored)
            for prefix, parts in zip(("", "rating_"), zip(*scored)):
                entry[prefix + name] = group_part_summary(np.concatenate(parts, axis=1), groups)     # (K, n)
        self.entries.append(entry)
        self.logger.info(f"token probe: after {passes_done} passes, the group's part "
                         + ", ".join(f"{entry[name]['mean']:+.4f} on the {name.replace('_', ' ')}" for name in self.texts))
