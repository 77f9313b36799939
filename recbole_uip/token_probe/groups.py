"""One soft token per group of users (``benchmarks/token_probe.py --group_tokens``, step 7 of its docstring): the
groups, their tokens trained one group at a time or all together beside the shift, and each probed user's group
chosen by the nearest code or by likelihood (an E-step); what they carry is scored in :mod:`.group_scores`.
"""

from __future__ import annotations

import numpy as np
import torch

from recbole_uip.inference.codebook import ProfileCodebook
from recbole_uip.token_probe.group_scores import GroupPartTrajectory, GroupTokens, score_every_token
from recbole_uip.token_probe.modes import BATCH
from recbole_uip.token_probe.stages import batch_passes, mult_vae_of, train_passes


GROUP_BY = ("items", "mult_vae")
GROUP_TRAINING = ("separate", "joint")


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


def shuffled_members(fitted: np.ndarray, seed: int) -> np.ndarray:
    """``--group_shuffle``, the shuffled-ID control at the level of the tokens: the training users' groups
    ``fitted (m,)`` permuted among them (by a generator of their own, ``[seed, 5]``), so that each group keeps its size
    and its index (the probed users keep the nearest code's group) but its token is trained on as many users drawn
    at random. What such a token carries of its group's new users is what training alone gives, with no taste in
    common; a group's part measured on it is the measure's own bias."""
    return np.random.default_rng([seed, 5]).permutation(fitted)


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
    if args.group_shuffle:
        fitted = shuffled_members(fitted, args.probe_seed)
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


