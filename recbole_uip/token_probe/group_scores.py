"""The group stage's output and what it says (``benchmarks/token_probe.py --group_tokens``): the group tokens and
each probed user's choices of group (:class:`GroupTokens`), every group's token scored on every probed user
(:func:`score_every_token`), and from that matrix the group's part (a token's score less its additive twin), as
training goes on and at the end, the scores of each choice of group, the part differences between choices, and the
same matrix from count models of the groups with no LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recbole_uip.benchmarking import HeldOutInference, difference_summary, mean_ci
from recbole_uip.inference.trainer import Targets


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


def score_every_token(trainer, targets, tokens: torch.Tensor, with_ratings: bool = False) -> tuple[np.ndarray, ...]:
    """``targets``' texts scored with each of ``tokens (K, P, D)`` in turn, the same token for every user:
    ``(plain,)`` or, ``with_ratings``, ``(plain, rating)``, each ``(K, B)`` (as
    :meth:`ProfileInferenceTrainer.score_offsets`)."""
    scored = [trainer.score_offsets(targets, token.expand(len(targets.users), *token.shape), with_ratings=with_ratings)
              for token in tokens]
    return tuple(np.stack(part) for part in zip(*scored)) if with_ratings else (np.stack(scored),)


def additive_twin(matrix: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``(n,)``: what the token ``chosen[j]`` would score on user ``j`` of ``matrix (K, n)`` (every group's token on
    every user, nan where a user has nothing to score) if a token's effect did not depend on whose group it is: the
    user's mean over every token plus that token's mean over the users, less the grand mean (a two-way additive
    fit). The user's own group's score minus it is the group's part."""
    return np.nanmean(matrix, 0) + np.nanmean(matrix, 1)[chosen] - np.nanmean(matrix)


def group_part_summary(matrix: np.ndarray, group: np.ndarray) -> dict:
    """The group's part over the users of ``matrix (K, n)``, each scored by their own group ``group (n,)`` minus
    :func:`additive_twin`: ``{"mean", "ci"}``, the mean and its 95% interval over the users with a score."""
    part = matrix[group, np.arange(len(group))] - additive_twin(matrix, group)
    mean, low, high = mean_ci(part[np.isfinite(part)])
    return {"mean": mean, "ci": [low, high]}


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


def chosen_group_modes(matrix: np.ndarray, name: str, chosen: np.ndarray) -> dict[str, np.ndarray]:
    """From ``matrix (K, n)``, each user scored by the group ``chosen (n,)`` picked for them: ``group_<name>`` and
    its :func:`additive_twin` ``group_<name>_additive``, each ``(n,)``; the first minus the second is the choice's
    group part."""
    return {f"group_{name}": matrix[chosen, np.arange(matrix.shape[1])],
            f"group_{name}_additive": additive_twin(matrix, chosen)}


def nearest_group_modes(matrix: np.ndarray, nearest: np.ndarray) -> dict[str, np.ndarray]:
    """From ``matrix (K, n)``, each user scored by the nearest code's group ``nearest (n,)``: ``group_own`` (that
    group's token or model), ``group_other`` (the next group's) and ``group_own_additive`` (:func:`additive_twin`),
    each ``(n,)``: the modes that need no choice by likelihood, shared by the tokens and the count models."""
    return {**chosen_group_modes(matrix, "own", nearest),
            "group_other": matrix[(nearest + 1) % len(matrix), np.arange(matrix.shape[1])]}


def group_modes(matrix: np.ndarray, groups: GroupTokens, likeliest_other: np.ndarray,
                prefix: str = "") -> dict[str, np.ndarray]:
    """The ``group_*`` modes ``{prefix + mode: (n,)}`` from ``matrix (K, n)``, every group's token scored on every
    probed user's held-out text (nan where a user has nothing to score): the user's group's token, the next
    group's, the likeliest group's, ``likeliest_other`` ``(n,)`` (another user's likeliest group), the one group
    best for everyone, the user's mean over every group's token (``group_any``: a group's token drawn at random);
    and ``group_own_additive`` / ``group_likeliest_additive``, what those tokens would score if
    a token's effect did not depend on whose group it is: the user's mean over every token plus how that token
    does on all the probed users against every token (a two-way additive fit, ``row + column - grand`` means).
    ``own - own_additive`` is then the user-by-token interaction: the group's part alone, with how good a token is
    for everyone and how hard a user is taken out (the means absorb part of it: of a bonus a token has on its own
    group's users alone, equal groups show ``1 - 1/K``)."""
    modes = {**nearest_group_modes(matrix, groups.group),
             "group_likeliest_other": matrix[likeliest_other, np.arange(matrix.shape[1])],
             "group_best": matrix[groups.best], "group_any": np.nanmean(matrix, 0)}
    for name, chosen in (("likeliest", groups.likeliest), ("relative", groups.relative),
                         ("relative_pooled", groups.relative_pooled)):
        if chosen is not None:
            modes.update(chosen_group_modes(matrix, name, chosen))
    return {prefix + mode: values for mode, values in modes.items()}


PART_PAIRS = [("relative", "own"), ("relative_pooled", "own"), ("relative_pooled", "relative")]


def relative_part_differences(scores: dict[str, np.ndarray]) -> dict[str, dict]:
    """One choice's group part minus another's, per user, on the held-out text and its rating tokens
    (``{"[rating_]group_<a>_part_minus_[rating_]group_<b>_part": {"mean", "ci", "share_below_zero"}}``, as
    ``interval_summary``'s, for ``PART_PAIRS``): ``(a - its twin) - (b - its twin)``, each token's score less what it
    scores on a user of any group. ``relative`` against ``own`` (the nearest code's group): below zero, choosing a
    user's group by likelihood places them better than the untrained code does; ``relative_pooled`` against
    ``relative``: below zero, more of the user's text makes that choice better (``{}`` without the modes)."""
    differences = {}
    for prefix in ("", "rating_"):
        for a, b in PART_PAIRS:
            names = [prefix + "group_" + m for m in (a, a + "_additive", b, b + "_additive")]
            if not all(name in scores for name in names):
                continue
            chosen, chosen_twin, other, other_twin = (scores[name] for name in names)
            differences[f"{prefix}group_{a}_part_minus_{prefix}group_{b}_part"] = difference_summary(
                (chosen - chosen_twin) - (other - other_twin))
    return differences


def group_count_modes(run: HeldOutInference, groups: GroupTokens, users: np.ndarray) -> dict[str, np.ndarray]:
    """The same question with no LLM, on the same groups, users and held-out items (``recbole_uip.count_reference``):
    each probed user's held-out items (texts and ratings) scored by the population's count model mixed with each
    group's, fitted on the remaining histories of the group's training users alone
    (:func:`~recbole_uip.count_reference.group_reference`), in nats per held-out token (``rating_*``: the ratings'
    part per held-out rating token). Modes: ``count_population``, ``count_group_own`` (the user's group),
    ``count_group_other`` (the next group's), ``count_group_own_additive`` (:func:`nearest_group_modes`' twin, so
    that own minus it is the group's part as it is for the tokens) and ``count_set`` (``count_population`` less what the count
    reference's model of the user's own history as a set gains, ``count_reference.md``'s ``set``): how much of these
    users' held-out text a token per group could take at most, as collaborative counts see it, beside what a
    profile of each user could. Only the differences between these modes are in the tokens' unit."""
    from recbole_uip.count_reference import count_reference, held_out_data, per_count

    data = held_out_data(run.full_text.histories, run.held)
    parts = group_count_matrices(run, groups, users, groups.group, data)
    set_text, set_rating = (gain[users] for gain in count_reference(data).gain("set"))
    modes = {}
    for prefix, matrix, population, count in parts:
        set_gain = set_rating if prefix else set_text + (set_rating if len(parts) > 1 else 0)
        modes.update({prefix + "count_" + m: values for m, values in nearest_group_modes(matrix, groups.group).items()})
        modes[prefix + "count_population"] = per_count(population, count)
        modes[prefix + "count_set"] = per_count(population - set_gain, count)
    return modes


def group_count_matrices(run: HeldOutInference, groups: GroupTokens, users: np.ndarray, user_group: np.ndarray,
                         data=None) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The count models of the groups (:func:`~recbole_uip.count_reference.group_reference`, each fitted on the
    remaining histories of its users among ``groups.fit_users``) on ``users``' held-out items, ``user_group (n,)``
    their groups (which the mixtures' weights are cross-fitted with): per part, ``(prefix, matrix, population,
    count)``, ``prefix`` "" for every held-out token and "rating_" for the rating tokens alone (where the text
    writes ratings), ``matrix (K, n)`` every group's model on each user in nats per held-out token, ``population
    (n,)`` the population model's nats in all and ``count (n,)`` the held-out tokens. ``data``: the run's
    ``count_reference.held_out_data`` where the caller has it already (built here otherwise)."""
    from recbole_uip.count_reference import group_reference, held_out_data, held_out_token_counts, per_count

    if data is None:
        data = held_out_data(run.full_text.histories, run.held)
    member = np.full(len(data.held), -1)
    member[groups.fit_users] = groups.fit_group
    reference = group_reference(data, member, users, user_group, len(groups.tokens))
    tokens, rating_tokens = (counts[users] for counts in held_out_token_counts(run.full_text, run.held))
    with_ratings = reference.rating_nll is not None and bool(rating_tokens.any())   # the text writes the ratings
    parts = [("", reference.text_nll + (reference.rating_nll if with_ratings else 0),
              reference.population_text_nll + (reference.population_rating_nll if with_ratings else 0), tokens)]
    if with_ratings:
        parts.append(("rating_", reference.rating_nll, reference.population_rating_nll, rating_tokens))
    return [(prefix, per_count(nll, count[None]), population, count) for prefix, nll, population, count in parts]


def count_group_part(run: HeldOutInference, groups: GroupTokens, users: np.ndarray,
                     user_group: np.ndarray) -> dict[str, dict]:
    """The count models' group part (own group's model - :func:`additive_twin`) on ``users``' held-out items, mean
    and 95% interval over users, per prefix (:func:`group_count_matrices`): for the users the tokens train on
    (:class:`GroupPartTrajectory`'s sample), members of their own group's model as they are of its token's
    training."""
    return {prefix + "held_out": group_part_summary(matrix, user_group)
            for prefix, matrix, _, _ in group_count_matrices(run, groups, users, user_group)}
