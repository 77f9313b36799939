"""The token probe's modes and the paired differences it reports (``benchmarks/token_probe.py``).

A mode is one way of scoring a probed user's text (``own``: their own fitted tokens, ``group_own``: their group's
token, ``count_set``: a count model of their history, ...); a pair ``(a, b)`` is reported as ``a_minus_b``, user by
user. ``rating_*`` modes are the same scores over the rating tokens alone.
"""

from __future__ import annotations

import re


BATCH = 16          # users fitted together (each alone: their losses are summed); "mean" and "other" are per batch

PAIRS = [("own", "mean"), ("own", "other_user"), ("own_halfway", "mean"), ("mean", "shared"), ("oracle", "mean"),
         ("own_on_fitted_text", "mean_on_fitted_text"), ("mean", "shared_prefix"), ("shared_prefix", "shared")]
PAIRS += [("encoder", "encoder_mean"), ("encoder", "encoder_other"), ("encoder_mean", "shared")]
PAIRS += [("own", "encoder"), ("mean", "encoder")]            # --fit_start=encoder: what the fits add to their start
NEW_DRAW_PAIRS = [("own_on_new_draw", "mean_on_new_draw"), ("own_on_new_draw", "other_user_on_new_draw")]
PAIRS += NEW_DRAW_PAIRS + [("encoder_on_new_draw", "encoder_mean_on_new_draw"),
                           ("encoder_on_new_draw", "encoder_other_on_new_draw")]
GROUP_PAIRS = [("group_own", "group_mean"), ("group_own", "group_other"), ("group_mean", "shared"),
               ("group_likeliest", "group_own"), ("group_likeliest", "group_mean"),
               ("group_likeliest", "group_likeliest_other"), ("group_likeliest", "group_best"),
               ("group_best", "shared"), ("group_own", "group_own_additive"),
               ("group_likeliest", "group_likeliest_additive"), ("group_relative", "group_own"),
               ("group_relative", "group_relative_additive"),
               ("group_relative_pooled", "group_own"), ("group_relative_pooled", "group_relative_pooled_additive"),
               ("group_own", "group_any")]
# no LLM (group_count_modes): a count model of each group beside the population, and of the user's own history
COUNT_PAIRS = [("count_group_own", "count_population"), ("count_group_own", "count_group_other"),
               ("count_group_own", "count_group_own_additive"), ("count_set", "count_population")]
PAIRS += GROUP_PAIRS + COUNT_PAIRS
# distil: the held-out text as the teacher reads it, with the user's own context and with another user's
TEACHER_PAIRS = [("teacher", "teacher_other"), ("teacher", "shared"), ("teacher", "encoder"), ("own", "teacher")]
PAIRS += TEACHER_PAIRS
HELD_OUT_MODES = ("own", "mean", "other_user", "own_halfway", "shared", "oracle",   # also on the rating tokens alone
                  "shared_prefix",
                  "encoder", "encoder_mean", "encoder_other",
                  "group_own", "group_mean", "group_other", "group_likeliest", "group_likeliest_other", "group_best",
                  "group_own_additive", "group_likeliest_additive", "group_relative", "group_relative_additive",
                  "group_relative_pooled", "group_relative_pooled_additive", "group_any",
                  "count_population", "count_group_own", "count_group_other", "count_group_own_additive", "count_set",
                  "teacher", "teacher_other")
PAIRS += [("rating_" + a, "rating_" + b) for a, b in PAIRS if a in HELD_OUT_MODES and b in HELD_OUT_MODES]

OBJECTIVES = ("plain", "weighted", "distil", "teacher_text", "mult_vae")


def objective_pairs(objectives: list[str]) -> list[tuple[str, str]]:
    """The paired differences of the tokens fitted on each ``--also_fit`` objective (modes ``<objective>_*``): the
    main objective's own tokens - these (the same users, draws and steps), and within the objective what ``PAIRS``
    asks of the main one; on every held-out token and, but for the fitted text, on the rating tokens alone."""
    pairs, rating = [], []
    for objective in objectives:
        p = objective + "_"
        within = [(p + "own", p + "mean"), (p + "own", p + "other_user"), (p + "own_halfway", p + "mean"),
                  (p + "mean", "shared"), ("own", p + "own")]
        pairs += within + [(p + "own_on_fitted_text", p + "mean_on_fitted_text")]
        pairs += [(p + a, p + b) for a, b in NEW_DRAW_PAIRS]
        rating += [("rating_" + a, "rating_" + b) for a, b in within]
    return pairs + rating


def _with_rating_twins(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` on every held-out token, then the same pairs on the rating tokens alone (``rating_<mode>``)."""
    return pairs + [("rating_" + a, "rating_" + b) for a, b in pairs]


def context_pairs(budgets: list[int]) -> list[tuple[str, str]]:
    """The in-context stage's paired differences per budget ``N``: own history - the shared token alone, own history
    - another user's, on every held-out token and on the rating tokens alone."""
    return _with_rating_twins([pair for n in budgets
                               for pair in ((f"context{n}_own", "shared"), (f"context{n}_own", f"context{n}_other"))])


def keep_mode(keep: float) -> str:
    """The mode of own tokens shrunk towards the mean, keeping the share ``keep`` of their own part:
    ``keep * own + (1 - keep) * mean``, named by its percentage (``own_keep25``)."""
    return f"own_keep{round(100 * keep):g}"


def keep_pairs(keeps: list[float]) -> list[tuple[str, str]]:
    """``--keep``'s paired differences: each shrunk token - the mean, on every held-out token and its rating tokens."""
    return _with_rating_twins([(keep_mode(k), "mean") for k in keeps])


def reading_order(key: str) -> tuple:
    """Report rows in reading order, whatever order a JSON file kept them in: every held-out token before the
    rating tokens alone, then by name with context budgets as numbers (``context64`` before ``context128``)."""
    return key.startswith("rating_"), [int(part) if part.isdigit() else part
                                       for part in re.split(r"(\d+)", key.removeprefix("rating_"))]
