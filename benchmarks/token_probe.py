"""What can one soft token per profile carry about a user, when it is fitted to that user alone with many steps?

    python benchmarks/token_probe.py --dataset=ml-100k [--users=48] [--fit_steps=20] [--fit_learning_rate=0.02]
        [--shift_passes=2] [--resample=false] [--fit_objective=plain] [--oracle=true] [--encoder_passes=0]

The generalisation benchmark asks whether the trained tokens explain behaviour they never saw; this one asks the
question beneath it, without the encoder and without the EM loop's one step per user and round. The held-out
protocol is the generalisation benchmark's (each user's newest training items within ``--holdout_tokens`` are out
of everything). Then:

1. the shared shift ``b`` is trained alone (``--shift_passes`` M-step passes over ``--shift_users`` users who are
   not probed), so that the tokens below start from a token that already writes this kind of text; with
   ``--shift_objective=distil``, on the teacher of ``--fit_objective=distil`` instead of the text drawn (the start
   learns, before any per-user fit, what reading a history in context does for every user);
2. for each of ``--users`` other users, their tokens are fitted alone (``--fit_steps`` Adam steps,
   ``ProfileInferenceTrainer.fit_user_tokens``) on a random ``uip_max_behaviour_tokens`` of their remaining
   training text (with ``--draws=K``, K draws, one per step in turn; with ``--resample``, a new random draw at every
   step, as the EM loop draws anew at every visit),
   starting from the shared token, on the plain NLL or (``--fit_objective=weighted``) the M-step's objective, whose
   rating tokens weigh ``uip_rating_weight``, or (``--fit_objective=distil``) to what the frozen LLM predicts for
   that text, with the shared token, when it reads the user's newest ``--distil_context_tokens`` tokens of their
   other remaining items before it (distillation: the in-context effect of the history, not the one draw), or
   (``--fit_objective=teacher_text``) on the plain NLL of the teacher's whole text, those newest tokens followed by
   the draw (what distillation reads, fitted without a teacher: the control that tells distillation from the
   recency and length of the teacher's text), or (``--fit_objective=mult_vae``) on the plain NLL of a new text at
   every step, written from items a Mult-VAE of the training histories predicts for the user among those they have
   not seen (``recbole_uip.collaborative_text``: the user's predicted taste, never one text to memorise).
   ``--also_fit=OBJECTIVE[,...]`` fits the same users' tokens again from the same start, draws and steps on each
   further objective (modes ``<objective>_own`` and so on) and reports ``own`` minus ``<objective>_own``, a paired
   comparison of the objectives;
3. the frozen LLM scores each user's held-out text with their own fitted tokens, the mean of the fitted tokens of
   the users in their batch of 16, another user's fitted tokens (the batch rotated by one), their own shrunk halfway
   towards that mean (``own_halfway``: a noisy estimate of a user's token can lose to the mean and still carry
   something of the user; with ``--keep=K[,K...]``, also shrunk keeping the share K of their own part,
   ``own_keep<percent>``) and the shared token before any fitting; and their fitted text (the first draw) with
   their own tokens and the mean of the fitted tokens; where the text marks rating tokens, the held-out text is
   also scored on its rating tokens alone (``rating_*``: the part of the text a user's taste should predict best);
4. with ``--oracle`` (the default), the tokens are also fitted on the held-out text itself: the most one token per
   profile can lower the NLL of that text (an upper bound, not a method);
5. with ``--encoder_passes`` > 0, the amortised path gets the steps the EM loop does not give it: after the shift,
   the linear encoder ``A`` is trained by Adam at every batch (``--encoder_passes`` passes over the shift's users,
   the M-step's batch-centred objective, the shift training on beside it), where the EM loop takes one
   line-searched step per round. The probed users' held-out text is then scored with ``A z`` (``encoder``: ``z``
   from their remaining items), its mean over their batch (``encoder_mean``) and another user's
   (``encoder_other``). With ``--encoder_objective=distil``, ``A`` (and the shift beside it) learn from the
   teacher of ``--fit_objective=distil`` at every batch instead of the text drawn; with
   ``--encoder_objective=mult_vae``, on texts drawn from a Mult-VAE as ``--fit_objective=mult_vae``'s, a new one per
   user and batch, the encoder reading all of the user's remaining items. With
   ``--encoder_input=mult_vae``, ``z`` is instead the mean code of a Mult-VAE with as many dimensions, trained on
   the remaining histories of the users the encoder does not train on (the collaborative compression that predicts
   the held-out items best, ``benchmarks/count_reference.py``). ``--fit_steps=0`` skips the per-user fits (steps
   2-4) and scores the encoder alone;
6. with ``--context_tokens=N[,N...]``, the in-context reference beside the shared token: each probed user's
   held-out text is scored with the shared token after the newest ``L`` tokens of their own remaining training text
   (``context<N>_own``) and after as many of another user's (``context<N>_other``, the batch rotated by one), ``L``
   the smaller of ``N`` and what each one has (``benchmarks/in_context.py``'s conditions, with the trained shift in
   place; with ``--context_from=oldest``, their oldest N tokens instead, and another user's oldest: the user's
   history away from the held-out items' time). ``context<N>_own`` minus ``shared`` is what the user's whole recent
   history, read verbatim, adds to the mean token: the same question as the goal's own minus mean, asked of the history itself.
7. with ``--group_tokens=K``, one token per group of users instead of per user: the users who are not probed are
   put in ``K`` groups by the pipeline's quantiser (a whitened k-means, ``ProfileCodebook``) of ``--group_by``'s
   vector of their remaining items (``items``: the pipeline's untrained ``z``, the start its IDs are quantised from;
   ``mult_vae``: a Mult-VAE's code of as many dimensions, trained on those users' remaining histories), and each
   group's token is the shared shift trained on for ``--group_passes`` more passes over that group's users alone
   (a batch of the group's users' texts per step where a per-user fit has one text). Each probed user, put in the
   group of the nearest code, is scored with their group's token (``group_own``), its mean over their batch
   (``group_mean``), the next group's (``group_other``), and the token of the group that explains a draw of their
   remaining training text best (``group_likeliest``: the assignment an EM step by likelihood would make), with its
   two controls: the likeliest group of the next user in the batch (``group_likeliest_other``) and the one group
   whose token explains all the probed users' draws best (``group_best``: a choice made once for everyone); and the
   group whose token explains the draw best against how it explains every probed user's (``group_relative``, an
   E-step with how good a token is for everyone taken out, :func:`relative_choice`). Every
   group's token scores every probed user, so the own, the likeliest and the relatively likeliest group's tokens
   also have additive twins
   (``*_additive``: the user's mean over the tokens plus the token's mean over the users), the difference to which
   is the group's part alone, how good a token is for everyone taken out (:func:`group_modes`); the relative
   choice's part minus the nearest code's group's part says whether the likelihood places a user better than the
   untrained code (:func:`relative_part_differences`); with ``--group_choice_draws=N``, the same choice by the mean
   NLL of N draws (``group_relative_pooled``), whether more of the user's text makes it better. A per-user fit
   averages one user's noise; a group's fit averages ``U / K`` users', so this asks whether the soft token can carry
   the taste that users share with their neighbours when the noise is gone. With ``--group_training=joint``, the
   groups' tokens are trained together instead, beside the shift, each on its batch-centred gradient (what every
   user needs goes to the shift, what sets a group apart to its token; :func:`fit_group_tokens_jointly`). Beside
   them, with no LLM, the same matrix from count models of each group's remaining histories, and a count model of
   each user's own history (``count_*``, :func:`group_count_modes`): how much a token per group could take of these
   very items. With ``--group_score_every=N`` (joint training), the group's part is also scored every N passes, on
   the probed users' held-out text, on a fixed draw of the training text of as many users the tokens train on and
   on those users' held-out items (:class:`GroupPartTrajectory`; beside it, the count models' part on those items,
   :func:`count_group_part`): whether it grows with passes, and whether the tokens set their own users apart on the
   text they are trained on, on their unseen items, or on neither.

Own minus mean on the fitted text is memorisation; on the held-out text it is what generalises, the quantity the
issue's goal (0.05 nats/token below the mean token) is about (``encoder`` minus ``encoder_mean`` without the
per-user fits). Writes ``results/<dataset>/<settings fingerprint>/token_probe[_resampled|_draws<K>][_<objective>][_vs_<objective>...]
[_encoder[_distil]][_shiftdistil][_keep][_context[_oldest]][_groups<K>_<group_by>[_joint][_choice<N>]][_<variant>].{json,md}``. The JSON
also keeps each probed user's score in every mode (``per_user``, in the order of its ``users``, the trainer's user
indices), so that two runs over the same users (the same dataset, split, ``--probe_seed`` and ``--users``) can be
compared user by user.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from recbole_uip.benchmarking import (
    CONTEXT_ENDS, HeldOutInference, benchmark_parser, comma_separated, configure, context_positions, difference_summary,
    finite_or_none, goal_verdict, interval_summary, matched_contexts, mean_ci, newest_tokens, parse_known_with_overrides,
    publish_benchmark, run_record, settings_fingerprint, settings_table,
)
from recbole_uip.inference.codebook import ProfileCodebook
from recbole_uip.inference.trainer import Targets, after_contexts

BATCH = 16          # users fitted together (each alone: their losses are summed); "mean" and "other" are per batch
PAIRS = [("own", "mean"), ("own", "other_user"), ("own_halfway", "mean"), ("mean", "shared"), ("oracle", "mean"),
         ("own_on_fitted_text", "mean_on_fitted_text")]
PAIRS += [("encoder", "encoder_mean"), ("encoder", "encoder_other"), ("encoder_mean", "shared")]
NEW_DRAW_PAIRS = [("own_on_new_draw", "mean_on_new_draw"), ("own_on_new_draw", "other_user_on_new_draw")]
PAIRS += NEW_DRAW_PAIRS + [("encoder_on_new_draw", "encoder_mean_on_new_draw"),
                           ("encoder_on_new_draw", "encoder_other_on_new_draw")]
GROUP_PAIRS = [("group_own", "group_mean"), ("group_own", "group_other"), ("group_mean", "shared"),
               ("group_likeliest", "group_own"), ("group_likeliest", "group_mean"),
               ("group_likeliest", "group_likeliest_other"), ("group_likeliest", "group_best"),
               ("group_best", "shared"), ("group_own", "group_own_additive"),
               ("group_likeliest", "group_likeliest_additive"), ("group_relative", "group_own"),
               ("group_relative", "group_relative_additive"),
               ("group_relative_pooled", "group_own"), ("group_relative_pooled", "group_relative_pooled_additive")]
# no LLM (group_count_modes): a count model of each group beside the population, and of the user's own history
COUNT_PAIRS = [("count_group_own", "count_population"), ("count_group_own", "count_group_other"),
               ("count_group_own", "count_group_own_additive"), ("count_set", "count_population")]
PAIRS += GROUP_PAIRS + COUNT_PAIRS
HELD_OUT_MODES = ("own", "mean", "other_user", "own_halfway", "shared", "oracle",   # also on the rating tokens alone
                  "encoder", "encoder_mean", "encoder_other",
                  "group_own", "group_mean", "group_other", "group_likeliest", "group_likeliest_other", "group_best",
                  "group_own_additive", "group_likeliest_additive", "group_relative", "group_relative_additive",
                  "group_relative_pooled", "group_relative_pooled_additive",
                  "count_population", "count_group_own", "count_group_other", "count_group_own_additive", "count_set")
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


def _reading_order(key: str) -> tuple:
    """Report rows in reading order, whatever order a JSON file kept them in: every held-out token before the
    rating tokens alone, then by name with context budgets as numbers (``context64`` before ``context128``)."""
    return key.startswith("rating_"), [int(part) if part.isdigit() else part
                                       for part in re.split(r"(\d+)", key.removeprefix("rating_"))]


def _true(value: str) -> bool:
    """A true/false flag's value."""
    return value.lower() in ("1", "true", "yes")


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM", help="whose split defines the training data (default DeepFM)")
    parser.add_argument("--holdout_tokens", type=int, default=64, help="held-out text per user, in tokens")
    parser.add_argument("--users", type=int, default=48, help="users whose tokens are fitted and scored")
    parser.add_argument("--fit_steps", type=int, default=20, help="Adam steps per user")
    parser.add_argument("--fit_learning_rate", type=float, default=0.02,
                        help="Adam's step, relative to the mean token-embedding norm")
    parser.add_argument("--shift_users", type=int, default=256, help="users the shared shift is trained on")
    parser.add_argument("--shift_passes", type=int, default=2, help="passes of the shift's training")
    parser.add_argument("--shift_objective", choices=("nll", "distil"), default="nll",
                        help="what the shift trains on: the M-step's objective (default) or the LLM's predictions "
                             "given each user's other items in context (distil, --distil_context_tokens)")
    parser.add_argument("--oracle", type=_true, default=True,
                        help="also fit the tokens on the held-out text itself (true/false; default true)")
    parser.add_argument("--resample", type=_true, default=False,
                        help="fit each step on a new random draw of the user's remaining training text (true/false; "
                             "default false: one draw for every step)")
    parser.add_argument("--draws", type=int, default=1,
                        help="fit each user's tokens on this many random draws of their remaining training text, one "
                             "per step in turn, each with its own teacher under distil (default 1; --resample=true is "
                             "a new draw at every step)")
    parser.add_argument("--fit_objective", choices=OBJECTIVES, default="plain",
                        help="what the tokens are fitted on: the plain NLL of the draw (default), the M-step's "
                             "rating-weighted one, the LLM's predictions of the draw given the user's other items in "
                             "context (distil), or the plain NLL of that context followed by the draw (teacher_text)")
    parser.add_argument("--also_fit", default="",
                        help="further objectives, comma-separated: the same users' tokens fitted again from the same "
                             "draws on each, and compared with the --fit_objective's user by user (default: none)")
    parser.add_argument("--distil_context_tokens", type=int, default=128,
                        help="the teacher's context for --fit_objective=distil and --encoder_objective=distil: the "
                             "user's newest N tokens of their remaining items outside the fitted text (default 128)")
    parser.add_argument("--probe_seed", type=int, default=7, help="draws the probed and the shift's users")
    parser.add_argument("--encoder_passes", type=int, default=0,
                        help="after the shift, train the linear encoder by Adam at every batch for this many passes "
                             "over the shift's users, and score it (default 0: no encoder stage)")
    parser.add_argument("--encoder_input", choices=ENCODER_INPUTS, default="items",
                        help="what the encoder stage's A reads: the pipeline's z from the user's item embeddings "
                             "(default), or mult_vae: the mean code of a Mult-VAE with as many dimensions "
                             "(uip_encoder_dims), trained on the remaining training histories of the users the "
                             "encoder does not train on")
    parser.add_argument("--encoder_objective", choices=("nll", "distil", "mult_vae"), default="nll",
                        help="what the encoder stage trains on: the M-step's objective (default), the LLM's "
                             "predictions given the user's other items in context (distil, --distil_context_tokens), "
                             "or texts drawn from a Mult-VAE's prediction of the user's unseen items (mult_vae)")
    parser.add_argument("--encoder_learning_rate", type=float, default=0.005,
                        help="the encoder's Adam step, relative to the mean token-embedding norm per embedding "
                             "dimension (as --fit_learning_rate)")
    parser.add_argument("--context_tokens", default="",
                        help="context budgets N, comma-separated: also score the held-out text with the shared token "
                             "after N tokens of the user's own recent history and of another user's (default: none)")
    parser.add_argument("--context_from", choices=CONTEXT_ENDS, default="newest",
                        help="which end of each history --context_tokens reads: the newest tokens (default), next to "
                             "the held-out items in time, or the oldest")
    parser.add_argument("--group_tokens", type=int, default=0,
                        help="also fit one token per group of users: K groups of the users not probed, each group's "
                             "token the shift trained on over its users alone, scored on the probed users (default 0: "
                             "none)")
    parser.add_argument("--group_by", choices=GROUP_BY, default="items",
                        help="the vector the groups are a whitened k-means of: the pipeline's untrained z (items, the "
                             "default) or a Mult-VAE's code (mult_vae)")
    parser.add_argument("--group_passes", type=int, default=4,
                        help="passes over each group's users when fitting its token (default 4)")
    parser.add_argument("--group_learning_rate", type=float, default=0.0,
                        help="the Adam step of each group's token (default 0: uip_shared_learning_rate, the shift's)")
    parser.add_argument("--group_offset_learning_rate", type=float, default=0.0,
                        help="with --group_training=joint, the Adam step of the groups' offsets from the shift, apart "
                             "from the shift's own (default 0: the same step, --group_learning_rate's)")
    parser.add_argument("--group_training", choices=GROUP_TRAINING, default="separate",
                        help="separate: each group's token the shift trained on over its users alone; joint: every "
                             "group's token trained together beside the shift, each on its batch-centred gradient")
    parser.add_argument("--group_score_every", type=int, default=0,
                        help="with --group_training=joint, every N passes score the group's part (own group's token "
                             "- its additive twin) on the probed users' held-out text, on a draw of the training "
                             "text of as many users the tokens train on and on those users' held-out items: does it "
                             "grow with passes, and where is it (default 0: only at the end, on the probed users)")
    parser.add_argument("--group_choice_draws", type=int, default=1,
                        help="with --group_tokens, also choose each probed user's relatively likeliest group by the "
                             "mean NLL of N draws of their remaining training text (group_relative_pooled; "
                             "group_relative keeps the first draw's choice; default 1: one draw only)")
    parser.add_argument("--keep", default="",
                        help="shares of each user's own fitted token kept when shrinking it towards the mean of the "
                             "fitted tokens, comma-separated in (0, 1), e.g. 0.1,0.25,0.75 (modes own_keep<percent>; "
                             "own_halfway is 0.5 and always scored; default: none)")
    args, overrides = parse_known_with_overrides(parser, argv)
    args.keep = comma_separated(parser, "--keep", args.keep, float)
    if any(not 0 < k < 1 for k in args.keep) or len({keep_mode(k) for k in args.keep}) < len(args.keep):
        parser.error("--keep takes distinct shares strictly between 0 and 1 (0: the mean, 1: own, 0.5: own_halfway)")
    args.context_tokens = comma_separated(parser, "--context_tokens", args.context_tokens, int)
    if any(n < 1 for n in args.context_tokens):
        parser.error("--context_tokens must be positive")
    if args.distil_context_tokens < 1:
        parser.error("--distil_context_tokens must be positive")
    args.also_fit = [o.strip() for o in args.also_fit.split(",") if o.strip()]
    if unknown := [o for o in args.also_fit if o not in OBJECTIVES]:
        parser.error(f"--also_fit takes objectives among {', '.join(OBJECTIVES)}, not {', '.join(unknown)}")
    if args.fit_objective in args.also_fit or len(set(args.also_fit)) < len(args.also_fit):
        parser.error("--also_fit names each objective once, and not the --fit_objective")
    if args.also_fit and not args.fit_steps:
        parser.error("--also_fit fits per-user tokens: --fit_steps must be positive")
    if args.draws < 1 or (args.resample and args.draws != 1):
        parser.error("--draws must be positive, and --resample=true already draws anew at every step")
    if args.resample and {"distil", "teacher_text"} & {args.fit_objective, *args.also_fit}:
        parser.error("distil and teacher_text keep a teacher per draw: give them a few with --draws, not --resample")
    args.draws = args.fit_steps if args.resample else args.draws
    if args.group_tokens == 1 or args.group_tokens < 0 or args.group_passes < 1 or args.group_learning_rate < 0:
        parser.error("--group_tokens takes 0 (none) or at least 2 groups, --group_passes must be positive and "
                     "--group_learning_rate not negative")
    if args.group_score_every < 0 or args.group_score_every and (
            not args.group_tokens or args.group_training != "joint"):
        parser.error("--group_score_every takes 0 (none) or N > 0 with --group_tokens and --group_training=joint (the "
                     "separate tokens are trained one group after another: no pass holds every group's token)")
    if args.group_choice_draws < 1 or args.group_choice_draws > 1 and not args.group_tokens:
        parser.error("--group_choice_draws takes N >= 1 draws, more than one only with --group_tokens")
    if args.group_offset_learning_rate < 0 or args.group_offset_learning_rate and (
            not args.group_tokens or args.group_training != "joint"):
        parser.error("--group_offset_learning_rate takes 0 (the shift's step) or a positive step with --group_tokens "
                     "and --group_training=joint (only there are the groups' offsets apart from the shift)")
    return args, overrides


def teacher_contexts(trainer, targets, context_tokens: int) -> list[list[int]]:
    """What the teacher reads before each user's text in ``targets``: the user's newest ``context_tokens`` tokens
    of the items the text leaves out (token ids)."""
    return [newest_tokens(trainer.text, u, targets.inputs[j], context_tokens) for j, u in enumerate(targets.users)]


def distillation_teacher(trainer, targets, context_tokens: int) -> torch.Tensor:
    """The teacher of ``targets`` ``(B, L - 1, V)``: the frozen LLM's predictions of each user's text, with the
    shared token, after :func:`teacher_contexts`."""
    return trainer.teacher_probabilities(targets, teacher_contexts(trainer, targets, context_tokens),
                                         torch.zeros(len(targets.users), *trainer.soft.anchors.shape))


def collaborative_draws(trainer, logger):
    """A function ``draw(users, rng) -> Targets``: per user of ``users``, one text of ``uip_max_behaviour_tokens``
    written from items drawn from a Mult-VAE's distribution over the items they have not seen given their (remaining)
    training items (:class:`~recbole_uip.collaborative_text.CollaborativeTexts`); the Mult-VAE is trained once here
    on every user's remaining training items (no held-out item)."""
    from recbole_uip import mult_vae
    from recbole_uip.collaborative_text import CollaborativeTexts, unseen_item_probabilities

    histories = trainer.histories
    num_items = len(histories.item_texts)
    model = mult_vae.fit_mult_vae(mult_vae.user_item_matrix(histories.items, num_items))
    writer = CollaborativeTexts(trainer.text)
    budget = trainer.settings.max_behaviour_tokens
    logger.info(f"token probe: texts drawn from a Mult-VAE trained on {len(histories.items)} users' remaining "
                f"training items")

    def draw(users: np.ndarray, rng: np.random.Generator) -> Targets:
        probabilities = unseen_item_probabilities(model, trainer.history_items(users), num_items)
        texts, flags = zip(*(writer.sample(p, budget, rng) for p in probabilities))
        return Targets(np.asarray(users), list(texts), None if trainer.text.rating_flags is None else list(flags),
                       [np.arange(len(histories.items[u])) for u in users])     # the encoder would read them all

    return draw


def fit_tokens(trainer, objective: str, draws: list, start: torch.Tensor, args,
               sampled: list | None = None) -> tuple[torch.Tensor, object]:
    """Each user's tokens ``(B, P, D)`` fitted on ``objective`` (``--fit_objective``'s choices) from ``start``, one
    of ``draws`` per step in turn, and the first text they were fitted to (``Targets``): ``draws[0]``, or for
    ``teacher_text`` the teacher's context followed by it; for ``mult_vae``, one of ``sampled`` (texts from
    :func:`collaborative_draws`, one per step) per step, the first of them."""
    if objective == "mult_vae":
        return trainer.fit_user_tokens(sampled, start, args.fit_steps, args.fit_learning_rate), sampled[0]
    if objective == "teacher_text":
        texts = [after_contexts(d, teacher_contexts(trainer, d, args.distil_context_tokens)) for d in draws]
        return trainer.fit_user_tokens(texts, start, args.fit_steps, args.fit_learning_rate), texts[0]
    teachers = [distillation_teacher(trainer, d, args.distil_context_tokens) for d in draws] \
        if objective == "distil" else None
    return trainer.fit_user_tokens(draws, start, args.fit_steps, args.fit_learning_rate, objective == "weighted",
                                   teachers), draws[0]


def train_passes(trainer, users: np.ndarray, passes: int, rng: np.random.Generator, logger, encoder_optimizer=None,
                 distil_context_tokens: int = 0, collaborative=None, shift_learning_rate: float = 0.0) -> list[float]:
    """``passes`` passes over ``users`` in M-step batches (:meth:`ProfileInferenceTrainer.train_batch`); the mean
    NLL of each pass. Without ``encoder_optimizer``, the shared shift alone learns (nothing to train without a
    shift: ``[]``); with it, the encoder steps at every batch on its batch-centred gradient, the shift beside it, on
    the M-step's objective or, given ``distil_context_tokens``, against :func:`distillation_teacher` (the mean
    cross-entropy of each pass is returned then); given ``collaborative`` (:func:`collaborative_draws`'s ``draw``),
    on its texts instead of the users' own. ``shift_learning_rate``: the shift's Adam step (0: the settings',
    ``uip_shared_learning_rate``)."""
    shared_opt = trainer.shared_optimizer()
    if shared_opt is not None and shift_learning_rate:
        shared_opt.param_groups[0]["lr"] = shift_learning_rate
    if shared_opt is None and encoder_optimizer is None:
        return []

    def step(targets) -> float:
        if encoder_optimizer is not None:
            encoder_optimizer.zero_grad(set_to_none=True)
        teacher = distillation_teacher(trainer, targets, distil_context_tokens) if distil_context_tokens else None
        nll = float(trainer.train_batch(targets, [1.0] * len(trainer.codebooks), shared_opt,
                                        shift_only=encoder_optimizer is None, teacher=teacher).mean())
        if encoder_optimizer is not None:
            encoder_optimizer.step()
        return nll

    means = batch_passes(trainer, users, passes, rng, logger, step, "shift" if encoder_optimizer is None else "encoder",
                         collaborative)
    if encoder_optimizer is not None:
        encoder_optimizer.zero_grad(set_to_none=True)
    return means


def batch_passes(trainer, users: np.ndarray, passes: int, rng: np.random.Generator, logger, step, label: str,
                 draw=None, after_pass=None) -> list[float]:
    """The loop every training stage of the probe shares: ``passes`` passes over ``users``, each in a new order
    (``rng``), in M-step batches; each batch's texts drawn by ``draw(batch, rng)`` (the users' own,
    :meth:`ProfileInferenceTrainer.targets`, when None) and handed to ``step(targets) -> float``, which trains on
    them and returns their mean loss. The mean of each pass, logged as ``label``'s; ``after_pass(passes_done)``, if
    given, called after every pass."""
    means = []
    for index in range(passes):
        order = users[rng.permutation(len(users))]
        losses = []
        for i in range(0, len(order), trainer.settings.batch_size):
            batch = order[i:i + trainer.settings.batch_size]
            losses.append(step(draw(batch, rng) if draw else trainer.targets(batch, rng)))
        means.append(float(np.mean(losses)))
        logger.info(f"token probe: {label} pass {index + 1}, NLL {means[-1]:.4f}")
        if after_pass is not None:
            after_pass(index + 1)
    return means


STILL_LEARNING = 0.01   # a last pass that lowers a stage's loss by more than this share of it: not converged


def still_learning(losses: list[float], tolerance: float = STILL_LEARNING) -> float | None:
    """The last pass's drop in loss, ``losses[-2] - losses[-1]``, where it exceeds ``tolerance`` times the last
    loss (the stage stopped while still learning); None otherwise, or with fewer than two passes. ``losses``: the
    mean loss of each pass (:func:`train_shift`, :func:`train_encoder`)."""
    if len(losses) < 2:
        return None
    drop = losses[-2] - losses[-1]
    return float(drop) if drop > tolerance * abs(losses[-1]) else None


def train_shift(trainer, users: np.ndarray, passes: int, rng: np.random.Generator, logger,
                distil_context_tokens: int = 0) -> list[float]:
    """The shared shift alone, ``passes`` passes over ``users`` in M-step batches, on the M-step's objective or,
    given ``distil_context_tokens``, against :func:`distillation_teacher`; the mean NLL (cross-entropy) of each
    pass."""
    return train_passes(trainer, users, passes, rng, logger, distil_context_tokens=distil_context_tokens)


ENCODER_INPUTS = ("items", "mult_vae")


def mult_vae_of(trainer, train_users: np.ndarray, latent: int):
    """A Mult-VAE (``recbole_uip.mult_vae``) with a ``latent``-dimensional code trained on the trainer's histories
    (no held-out item) of ``train_users`` alone, and every user's binary item matrix ``(U, I)``."""
    from recbole_uip import mult_vae

    histories = trainer.histories
    matrix = mult_vae.user_item_matrix(histories.items, len(histories.item_texts))
    return mult_vae.fit_mult_vae(matrix[train_users], latent=latent), matrix


def use_mult_vae_features(trainer, logger, unseen_users: np.ndarray) -> None:
    """Replace the trainer's user vector ``z (B, k)`` by the mean code of a Mult-VAE with ``k`` latent dimensions
    (``recbole_uip.mult_vae``) of the same items, standardised over the users' whole histories: the collaborative
    compression of a history that predicts its held-out items best (``benchmarks/count_reference.py``), read by the
    same encoder ``A``.

    The Mult-VAE is trained on the trainer's histories (no held-out item) of every user but ``unseen_users`` (the
    users the encoder trains on): had it seen their whole remaining histories, the code of the items an M-step batch
    lets ``z`` read could carry the very items it scores, which a probed user's held-out items never are."""
    from recbole_uip import mult_vae

    histories = trainer.histories
    num_items = len(histories.item_texts)
    seen = np.setdiff1d(np.arange(len(histories.items)), unseen_users)
    model, matrix = mult_vae_of(trainer, seen, trainer.soft.encoder.shape[-1])
    codes = mult_vae.latent_means(model, matrix)
    centre, scale = codes.mean(0), codes.std(0) + 1e-6

    def features(users: np.ndarray, positions: list[np.ndarray] | None = None) -> torch.Tensor:
        rows = mult_vae.user_item_matrix(trainer.history_items(users, positions), num_items)
        return torch.from_numpy((mult_vae.latent_means(model, rows) - centre) / scale)

    trainer.features = features
    logger.info(f"token probe: the encoder reads the {codes.shape[1]}-dimensional code of a Mult-VAE trained on "
                f"{len(seen)} users' histories (not the {len(histories.items) - len(seen)} it trains on)")


def train_encoder(trainer, users: np.ndarray, passes: int, learning_rate: float, rng: np.random.Generator,
                  logger, distil_context_tokens: int = 0, collaborative=None) -> list[float]:
    """The linear encoder ``A (P, D, k)`` trained by Adam at every M-step batch, ``passes`` passes over ``users``,
    on the M-step's objective with its batch-centred gradient (:meth:`ProfileInferenceTrainer.train_batch`), or on
    ``collaborative``'s texts (:func:`train_passes`); the shared shift trains beside it. The mean NLL of each pass.

    Departs from the EM loop, which accumulates ``A``'s gradient over a whole pass and takes one line-searched step
    per round: this gives the amortised path as many steps as it has batches."""
    if trainer.soft.encoder is None:
        raise SystemExit("--encoder_passes needs an encoder (uip_encoder: linear).")
    encoder = trainer.soft.encoder
    optimizer = torch.optim.Adam([encoder], lr=learning_rate * trainer.embedding_norm / encoder.shape[1] ** 0.5)
    return train_passes(trainer, users, passes, rng, logger, optimizer, distil_context_tokens, collaborative)


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
    users' groups (module docstring, step 7). The stage draws from a generator of its own, so that no other mode's
    draws change; with ``--group_score_every``, the group's part after every N passes
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
            sample, fitted[np.searchsorted(fit_users, sample)],              # fit_users is sorted (main)
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
                + (f", over {len(nll_by_draw)} draws for {np.mean(pooled == probed):.0%}" if pooled is not None else ""))
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


def group_modes(matrix: np.ndarray, groups: GroupTokens, likeliest_other: np.ndarray,
                prefix: str = "") -> dict[str, np.ndarray]:
    """The ``group_*`` modes ``{prefix + mode: (n,)}`` from ``matrix (K, n)``, every group's token scored on every
    probed user's held-out text (nan where a user has nothing to score): the user's group's token, the next
    group's, the likeliest group's, ``likeliest_other`` ``(n,)`` (another user's likeliest group), the one group
    best for everyone; and ``group_own_additive`` / ``group_likeliest_additive``, what those tokens would score if
    a token's effect did not depend on whose group it is: the user's mean over every token plus how that token
    does on all the probed users against every token (a two-way additive fit, ``row + column - grand`` means).
    ``own - own_additive`` is then the user-by-token interaction: the group's part alone, with how good a token is
    for everyone and how hard a user is taken out (the means absorb part of it: of a bonus a token has on its own
    group's users alone, equal groups show ``1 - 1/K``)."""
    rows, nearest, likeliest = np.arange(matrix.shape[1]), groups.group, groups.likeliest
    modes = {"group_own": matrix[nearest, rows], "group_other": matrix[(nearest + 1) % len(matrix), rows],
             "group_likeliest": matrix[likeliest, rows], "group_likeliest_other": matrix[likeliest_other, rows],
             "group_best": matrix[groups.best], "group_own_additive": additive_twin(matrix, nearest),
             "group_likeliest_additive": additive_twin(matrix, likeliest)}
    if groups.relative is not None:
        modes.update({"group_relative": matrix[groups.relative, rows],
                      "group_relative_additive": additive_twin(matrix, groups.relative)})
    if groups.relative_pooled is not None:
        modes.update({"group_relative_pooled": matrix[groups.relative_pooled, rows],
                      "group_relative_pooled_additive": additive_twin(matrix, groups.relative_pooled)})
    return {prefix + mode: values for mode, values in modes.items()}


def group_count_modes(run: HeldOutInference, groups: GroupTokens, users: np.ndarray) -> dict[str, np.ndarray]:
    """The same question with no LLM, on the same groups, users and held-out items (``recbole_uip.count_reference``):
    each probed user's held-out items (texts and ratings) scored by the population's count model mixed with each
    group's, fitted on the remaining histories of the group's training users alone
    (:func:`~recbole_uip.count_reference.group_reference`), in nats per held-out token (``rating_*``: the ratings'
    part per held-out rating token). Modes: ``count_population``, ``count_group_own`` (the user's group),
    ``count_group_other`` (the next group's), ``count_group_own_additive`` (:func:`group_modes`' twin, so that own
    minus it is the group's part as it is for the tokens) and ``count_set`` (``count_population`` less what the count
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
        kept = group_modes(matrix, groups, groups.likeliest, prefix + "count_")
        modes.update({prefix + "count_" + m: kept[prefix + "count_" + m]
                      for m in ("group_own", "group_other", "group_own_additive")})
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


def probe(run: HeldOutInference, users: np.ndarray, args, rng: np.random.Generator, show_progress: bool,
          collaborative=None, groups: GroupTokens | None = None) -> tuple[dict, dict]:
    """Per-user plain NLL ``{mode: (n,)}`` of the modes in the module docstring, and ``{"rating_" + mode: (n,)}``
    on the held-out rating tokens alone where the text marks them (nan for a user whose held-out text has none);
    and per context budget, the mean context length in tokens (``{}`` without ``--context_tokens``).
    ``collaborative``: :func:`collaborative_draws`'s ``draw``, needed by the ``mult_vae`` objectives; its texts are
    drawn from a generator of their own, so that the other objectives' draws stay those of a run without it. Tokens
    fitted (or an encoder trained) on its texts are also scored on one more text drawn for each user from the same
    distribution and fitted on by nothing (``*_on_new_draw``, from a third generator): whether they learnt the
    user's distribution at all, apart from whether it carries to the user's real held-out items. ``groups``:
    :func:`build_group_tokens`'s, for the ``group_*`` modes."""
    trainer = run.trainer
    scores: dict[str, list] = {}

    remaining = {u: np.arange(len(trainer.text.user_pieces[u])) for u in users}   # the trainer's text: no held-out item
    context_length: dict[int, list[int]] = {}
    group_scores: dict[str, list[np.ndarray]] = {}       # per prefix, every group's token on each batch (K, B)
    likeliest_other: list[np.ndarray] = []
    sample_rng, new_draw_rng = np.random.default_rng([args.probe_seed, 1]), np.random.default_rng([args.probe_seed, 2])
    bar = tqdm(total=len(users), desc="token probe", ncols=100, disable=not show_progress)
    for start in range(0, len(users), BATCH):
        batch = users[start:start + BATCH]
        held = run.held_out_targets(batch)
        rotate = torch.as_tensor(np.roll(np.arange(len(batch)), 1))
        shared = torch.zeros(len(batch), *trainer.soft.anchors.shape)
        modes = {"shared": (held, shared)}
        new_draw = collaborative(batch, new_draw_rng) if collaborative else None
        if args.fit_steps:
            draws = [trainer.targets(batch, rng) for _ in range(args.draws)]
            sampled = [collaborative(batch, sample_rng) for _ in range(args.fit_steps)] \
                if "mult_vae" in (args.fit_objective, *args.also_fit) else None   # not for the encoder's alone
            for objective in (args.fit_objective, *args.also_fit):
                p = "" if objective == args.fit_objective else objective + "_"
                own, fitted_text = fit_tokens(trainer, objective, draws, shared, args, sampled)
                mean = own.mean(0, keepdim=True).expand_as(own)
                modes.update({p + "own": (held, own), p + "mean": (held, mean), p + "other_user": (held, own[rotate]),
                              p + "own_halfway": (held, (own + mean) / 2), p + "own_on_fitted_text": (fitted_text, own),
                              p + "mean_on_fitted_text": (fitted_text, mean)})
                if objective == "mult_vae":
                    modes.update({p + "own_on_new_draw": (new_draw, own), p + "mean_on_new_draw": (new_draw, mean),
                                  p + "other_user_on_new_draw": (new_draw, own[rotate])})
                if not p:                   # a token shrunk towards the mean: how much of a fit is the user's
                    modes.update({keep_mode(k): (held, k * own + (1 - k) * mean) for k in args.keep})
        if groups is not None:
            own = groups.tokens[torch.as_tensor(groups.group[start:start + len(batch)])]
            modes["group_mean"] = (held, own.mean(0, keepdim=True).expand_as(own))
            likeliest_other.append(groups.likeliest[start:start + len(batch)][rotate.numpy()])
            scored = groups.final_held_out_scores(start // BATCH)
            if scored is None:
                scored = score_every_token(trainer, held, groups.tokens, with_ratings=held.flags is not None)
            for prefix, values in zip(("", "rating_"), scored):
                group_scores.setdefault(prefix, []).append(values)
        if args.encoder_passes:
            with torch.no_grad():
                encoded = trainer.offsets(batch, held.inputs).cpu()          # A z, z from the remaining items
            modes.update({"encoder": (held, encoded), "encoder_other": (held, encoded[rotate]),
                          "encoder_mean": (held, encoded.mean(0, keepdim=True).expand_as(encoded))})
            if args.encoder_objective == "mult_vae":
                modes.update({m + "_on_new_draw": (new_draw, modes[m][1])
                              for m in ("encoder", "encoder_other", "encoder_mean")})
        for budget in args.context_tokens:
            positions = context_positions(trainer.text, batch, remaining, budget, args.context_from)
            own_context, other_context = matched_contexts(trainer.text, batch, batch[rotate.numpy()], positions, budget)
            context_length.setdefault(budget, []).extend(len(c) for c in own_context)
            for mode, contexts in (("own", own_context), ("other", other_context)):
                name = f"context{budget}_{mode}"
                if held.flags is not None:
                    plain, rating = trainer.score_offsets(held, shared, with_ratings=True, contexts=contexts)
                    scores.setdefault("rating_" + name, []).append(rating)
                else:
                    plain = trainer.score_offsets(held, shared, contexts=contexts)
                scores.setdefault(name, []).append(plain)
        if args.oracle and args.fit_steps:
            modes["oracle"] = (held, trainer.fit_user_tokens(held, shared, args.fit_steps, args.fit_learning_rate,
                                                             args.fit_objective == "weighted"))
        for mode, (targets, offsets) in modes.items():
            if targets is held and held.flags is not None:          # the held-out modes, also on their rating tokens
                plain, rating = trainer.score_offsets(targets, offsets, with_ratings=True)
                scores.setdefault("rating_" + mode, []).append(rating)
            else:
                plain = trainer.score_offsets(targets, offsets)
            scores.setdefault(mode, []).append(plain)
        bar.update(len(batch))
    bar.close()
    scores = {mode: np.concatenate(values) for mode, values in scores.items()}
    if groups is not None:
        for prefix, values in group_scores.items():          # (K, n): group g's token on user j
            scores.update(group_modes(np.concatenate(values, axis=1), groups, np.concatenate(likeliest_other), prefix))
    return scores, {budget: float(np.mean(lengths)) for budget, lengths in context_length.items()}


def describe_objective(objective: str, data: dict) -> str:
    """What tokens fitted on ``objective`` were fitted to, for the report: "plain NLL of a random 64 tokens of ..."
    (of the newest 64 tokens where the settings say ``uip_target: newest``)."""
    settings = data["record"]["settings"]
    draws = data.get("draws", 1)
    if settings.get("target") == "newest":                  # uip_target: newest draws the same text every time
        draw = (f"the newest {settings['max_behaviour_tokens']} tokens of their remaining training text "
                "(`uip_target: newest`)")
    else:
        draw = (("a new random draw at every step of " if data.get("resample") else
                 f"{draws} random draws, one per step in turn, each of " if draws > 1 else "a random ")
                + f"{settings['max_behaviour_tokens']} tokens of their remaining training text")
    context = (f"the user's newest {data.get('distil_context_tokens')} tokens of their other remaining items")
    return {"weighted": f"M-step's objective (rating tokens weigh {settings['rating_weight']:g}) of {draw}",
            "distil": f"frozen LLM's predictions (distillation; the teacher reads {context} before the text) for {draw}",
            "teacher_text": f"plain NLL of the teacher's whole text ({context}, then {draw}; no teacher)",
            "mult_vae": (f"plain NLL of a new text at every step, {settings['max_behaviour_tokens']} tokens of items "
                         "drawn from a Mult-VAE's distribution over the items the user has not seen, given their "
                         "remaining training items (`recbole_uip.collaborative_text`)"),
            }.get(objective, f"plain NLL of {draw}")


def render(data: dict) -> str:
    modes, differences = data["modes"], data["differences"]
    labels = {"own_minus_mean": "own - mean (held-out text: what generalises)",
              "own_minus_other_user": "own - another user's (held-out text)",
              "own_halfway_minus_mean": "own shrunk halfway to the mean - mean (held-out text)",
              "mean_minus_shared": "mean of the fitted tokens - the shared token before fitting (held-out text)",
              "oracle_minus_mean": "fitted on the held-out text itself - mean (the most one token can do)",
              "own_on_fitted_text_minus_mean_on_fitted_text": "own - mean on the text they were fitted to (memorisation)",
              "own_on_new_draw_minus_mean_on_new_draw":
                  "own - mean on a new text from the distribution they were fitted to (fitted on by nothing)",
              "own_on_new_draw_minus_other_user_on_new_draw":
                  "own - another user's on a new text from the user's distribution (fitted on by nothing)",
              "encoder_on_new_draw_minus_encoder_mean_on_new_draw":
                  "encoder's A z - its mean on a new text from the distribution it was trained on",
              "encoder_on_new_draw_minus_encoder_other_on_new_draw":
                  "encoder's A z - another user's on a new text from the user's distribution",
              "rating_own_minus_rating_mean": "own - mean (held-out rating tokens)",
              "rating_own_minus_rating_other_user": "own - another user's (held-out rating tokens)",
              "rating_own_halfway_minus_rating_mean": "own shrunk halfway to the mean - mean (held-out rating tokens)",
              "rating_mean_minus_rating_shared": "mean of the fitted tokens - the shared token (held-out rating tokens)",
              "rating_oracle_minus_rating_mean": "fitted on the held-out text itself - mean (its rating tokens)",
              "encoder_minus_encoder_mean": "encoder's A z - its mean over the batch (held-out text)",
              "encoder_minus_encoder_other": "encoder's A z - another user's (held-out text)",
              "encoder_mean_minus_shared": "encoder's mean - the shared token (held-out text)",
              "rating_encoder_minus_rating_encoder_mean": "encoder's A z - its mean (held-out rating tokens)",
              "rating_encoder_minus_rating_encoder_other": "encoder's A z - another user's (held-out rating tokens)",
              "rating_encoder_mean_minus_rating_shared": "encoder's mean - the shared token (held-out rating tokens)"}
    pooled = data.get("group_choice_draws", 1)
    for prefix, what in (("", "held-out text"), ("rating_", "held-out rating tokens")):
        labels.update({f"{prefix}group_own_minus_{prefix}group_mean": f"own group's token - their mean ({what})",
                       f"{prefix}group_own_minus_{prefix}group_other": f"own group's token - the next group's ({what})",
                       f"{prefix}group_mean_minus_{prefix}shared":
                           f"mean of the group tokens - the shared token ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_own":
                           f"the likeliest group's token - the nearest code's group's ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_mean":
                           f"the likeliest group's token - the mean of the group tokens ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_likeliest_other":
                           f"the likeliest group's token - another user's likeliest ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_best":
                           f"the likeliest group's token - the one best for everyone ({what})",
                       f"{prefix}group_best_minus_{prefix}shared":
                           f"the group token best for everyone - the shared token ({what})",
                       f"{prefix}group_own_minus_{prefix}group_own_additive":
                           f"own group's token - what it scores on a user of any group (the group's part, {what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_likeliest_additive":
                           f"the likeliest group's token - what it scores on any user (the choice's part, {what})",
                       f"{prefix}group_relative_minus_{prefix}group_own":
                           f"the relatively likeliest group's token - the nearest code's group's ({what})",
                       f"{prefix}group_relative_minus_{prefix}group_relative_additive":
                           f"the relatively likeliest group's token - what it scores on any user (its part, {what})",
                       f"{prefix}group_relative_part_minus_{prefix}group_own_part":
                           f"the relatively likeliest group's part - the nearest code's group's part ({what})",
                       f"{prefix}group_relative_pooled_minus_{prefix}group_own":
                           f"the relatively likeliest group over {pooled} draws' token - the nearest code's group's "
                           f"({what})",
                       f"{prefix}group_relative_pooled_minus_{prefix}group_relative_pooled_additive":
                           f"the relatively likeliest group over {pooled} draws' token - what it scores on any user "
                           f"(its part, {what})",
                       f"{prefix}group_relative_pooled_part_minus_{prefix}group_own_part":
                           f"the relatively likeliest group over {pooled} draws' part - the nearest code's group's "
                           f"part ({what})",
                       f"{prefix}group_relative_pooled_part_minus_{prefix}group_relative_part":
                           f"the relatively likeliest group over {pooled} draws' part - over the first draw alone "
                           f"({what})",
                       f"{prefix}count_group_own_minus_{prefix}count_population":
                           f"no LLM: own group's count model - the population's ({what})",
                       f"{prefix}count_group_own_minus_{prefix}count_group_other":
                           f"no LLM: own group's count model - the next group's ({what})",
                       f"{prefix}count_group_own_minus_{prefix}count_group_own_additive":
                           f"no LLM: own group's count model - its additive twin (the group's part, {what})",
                       f"{prefix}count_set_minus_{prefix}count_population":
                           f"no LLM: a count model of the user's own history as a set - the population's ({what})"})
    for n in data.get("context_tokens", []):
        for prefix, what in (("", "held-out text"), ("rating_", "held-out rating tokens")):
            labels[f"{prefix}context{n}_own_minus_{prefix}shared"] = (
                f"shared token + own history in context (N={n}) - the shared token alone ({what})")
            labels[f"{prefix}context{n}_own_minus_{prefix}context{n}_other"] = (
                f"own history - another user's, both in context beside the shared token (N={n}, {what})")
    for objective in data.get("also_fit", []):
        for a, b in objective_pairs([objective]):
            plain_a, plain_b = (x.replace(objective + "_", "") for x in (a, b))
            labels[f"{a}_minus_{b}"] = (f"own ({data['fit_objective']}) - own fitted on {objective}" + (
                " (held-out rating tokens)" if a.startswith("rating_") else " (held-out text)")
                if plain_a == plain_b else f"{objective}: {labels.get(f'{plain_a}_minus_{plain_b}', f'{a} - {b}')}")
    settings = data["record"]["settings"]
    fitted = (f" Then {data['users']} other users' tokens each fitted alone with {data['fit_steps']} Adam steps (step "
              f"{data['fit_learning_rate']:g} of the mean token-embedding norm) on the "
              + describe_objective(data["fit_objective"], data) + "."
              + "".join(f" The same users' tokens also fitted from the same start, draws and steps on the "
                        f"{describe_objective(objective, data)} (`{objective}_*`)." for objective in data.get("also_fit", []))
              ) if data["fit_steps"] else ""
    teacher = (f"distillation; the teacher reads the user's newest {data.get('distil_context_tokens')} tokens of their "
               f"other remaining items before the text")
    def trained_on(objective: str, losses: list[float]) -> str:
        """What a stage (the shift, the encoder) trained on and its loss per pass, for the report."""
        per_pass = ", ".join(f"{v:.4f}" for v in losses)
        drop = still_learning(losses)
        # A shift stopped while still learning leaves part of what every user's text needs to the per-user fits,
        # each learning it alone in its few steps (seen with the genre-only text, results/ml-100k/5068856ecb02/);
        # an encoder stopped so is scored before it has learnt what it can.
        per_pass += (f"; **still falling**: the last pass lowered it by {drop:.4f} ({drop / abs(losses[-1]):.1%}), "
                     f"so more passes would still change it" if drop is not None else "")
        if objective == "mult_vae":
            return (f", on texts drawn from a Mult-VAE's prediction of each user's unseen items, a new one at every "
                    f"batch (NLL per pass {per_pass})")
        return (f", on the frozen LLM's predictions ({teacher}; cross-entropy per pass {per_pass})"
                if objective == "distil" else f" (NLL per pass {per_pass})")

    encoder = (f" Then the linear encoder trained by Adam at every batch (step {data['encoder_learning_rate']:g}) for "
               f"{data['encoder_passes']} passes over the same {data['shift_users']} users, the shift beside it"
               + trained_on(data.get("encoder_objective"), data["encoder_nll"])
               + f"; {data['users']} other users scored with `A z` from their remaining items"
               + (" (`z`: a Mult-VAE's code of the items, trained on the other users' remaining histories)"
                  if data.get("encoder_input") == "mult_vae" else "") + "."
               ) if data.get("encoder_passes") else ""
    grouped = (f" Then {data['group_tokens']} group tokens: the {sum(data['group_sizes'])} users not probed put in "
               f"groups of {', '.join(map(str, data['group_sizes']))} by a whitened k-means of "
               + ("the pipeline's untrained `z`" if data["group_by"] == "items" else "a Mult-VAE's code")
               + " of their remaining items, "
               + (f"every group's token trained together for {data['group_passes']} passes over those users beside "
                  f"the shift, each on its batch-centred gradient (Adam"
                  + (f", step {data['group_learning_rate']:g}" if "group_learning_rate" in data else "")
                  + (f", the groups' offsets {data['group_offset_learning_rate']:g}"
                     if data.get("group_offset_learning_rate") not in (None, data.get("group_learning_rate")) else "")
                  + "; NLL per pass " + " -> ".join(f"{v:.4f}" for v in data["group_nll"])
                  if data.get("group_training") == "joint" else
                  f"each group's token the shift trained on for {data['group_passes']} "
                  f"passes over its users alone (a fresh Adam"
                  + (f", step {data['group_learning_rate']:g}" if "group_learning_rate" in data else "")
                  + "; NLL per pass and group "
                  + "; ".join(" -> ".join(f"{v:.4f}" for v in nll) for nll in data["group_nll"]))
               + f"); each probed user scored with the nearest code's group's token, and with the group whose token "
               f"explains a draw of their remaining text best (the same group for "
               f"{data['group_likeliest_is_nearest']:.0%} of them)"
               + (f", and best against how it explains every probed user's draw (the relatively likeliest; the "
                  f"nearest code's group for {data['group_relative_is_nearest']:.0%})"
                  if "group_relative_is_nearest" in data else "")
               + (f"; the same over the mean NLL of {pooled} draws of their remaining text (the first one the draw "
                  f"above; the nearest code's group for {data['group_relative_pooled_is_nearest']:.0%}, the first "
                  f"draw's choice for {data['group_relative_pooled_is_relative']:.0%})"
                  if "group_relative_pooled_is_nearest" in data else "")
               + ".") if data.get("group_tokens") else ""
    context = (f" With the shared token in place, the probed users' held-out text also read after the "
               f"{data.get('context_from', 'newest')} N tokens of "
               "their own remaining training text, or as many of another user's (N = "
               + ", ".join(f"{n}: {data['context_tokens_mean'][str(n)]:.0f} tokens on average" for n in data["context_tokens"])
               + ").") if data.get("context_tokens") else ""
    lines = [f"# What one soft token per profile carries ({data['record']['dataset']})", "",
             f"Produced by `python benchmarks/token_probe.py {' '.join(data['record']['command'][1:])}`. Settings "
             f"`{settings_fingerprint(settings)}`. The shared shift trained alone for "
             f"{data['shift_passes']} passes over {data['shift_users']} users"
             f"{trained_on(data.get('shift_objective'), data['shift_nll'])}.{encoder}{fitted}{grouped}{context} "
             f"The probed users are scored on "
             f"their newest training items within {data['holdout_tokens']} tokens ({data['held_out_tokens_mean']:.1f} "
             f"on average), which nothing was fitted on. "
             f"Plain NLL, nats per token (`rating_*`: over the held-out rating tokens alone); mean over users with its "
             f"95% interval. Took {data['seconds']:.0f} s.", "",
             "| tokens | NLL |", "|---|---|"]
    for mode, summary in sorted(modes.items(), key=lambda item: _reading_order(item[0])):
        note = " (no LLM: a count model's nats per token; only differences compare)" if "count_" in mode else ""
        lines.append(f"| {mode}{note} | {summary['mean']:.4f} [{summary['ci'][0]:.4f}, {summary['ci'][1]:.4f}] |")
    lines += ["", "| paired difference | mean | 95% interval | users below 0 |", "|---|---|---|---|"]
    for keep in data.get("keep", []):
        mode = keep_mode(keep)
        labels[f"{mode}_minus_mean"] = f"own kept {keep:.0%}, shrunk {1 - keep:.0%} towards the mean - mean (held-out text)"
        labels[f"rating_{mode}_minus_rating_mean"] = (f"own kept {keep:.0%}, shrunk {1 - keep:.0%} towards the mean - "
                                                      f"mean (held-out rating tokens)")
    for key, summary in sorted(differences.items(), key=lambda item: _reading_order(item[0])):
        lines.append(f"| {labels.get(key, key)} | {summary['mean']:+.4f} | [{summary['ci'][0]:+.4f}, "
                     f"{summary['ci'][1]:+.4f}] | {summary['share_below_zero']:.0%} |")
    if "own_minus_mean" in differences:
        lines += ["", goal_verdict(differences["own_minus_mean"], "The issue's goal for tokens fitted to each user alone",
                                   differences.get("own_minus_other_user"))]
    for objective in data.get("also_fit", []):
        if f"{objective}_own_minus_{objective}_mean" in differences:
            lines += ["", goal_verdict(differences[f"{objective}_own_minus_{objective}_mean"],
                                       f"The issue's goal for tokens fitted on {objective}",
                                       differences.get(f"{objective}_own_minus_{objective}_other_user"))]
    if "encoder_minus_encoder_mean" in differences:
        lines += ["", goal_verdict(differences["encoder_minus_encoder_mean"],
                                   "The issue's goal for the encoder trained at every batch",
                                   differences.get("encoder_minus_encoder_other"))]
    if "group_own_minus_group_mean" in differences:
        lines += ["", goal_verdict(differences["group_own_minus_group_mean"],
                                   "The issue's goal for one token per group of users")]
        if part := differences.get("group_own_minus_group_own_additive"):
            # Not own - the next group's: the users sit unevenly in the groups, so that difference carries how good
            # each group's token is for everyone; own - its additive twin takes that out.
            low, high = part["ci"]
            lines[-1] += (f" The group's part alone (own - what the same token scores on a user of any group) "
                          f"{part['mean']:+.4f}, interval [{low:+.4f}, {high:+.4f}]: "
                          + ("the tokens carry the user's group." if high < 0 else "not shown."))
        if choice := differences.get("group_relative_part_minus_group_own_part"):
            low, high = choice["ci"]
            lines[-1] += (f" Chosen by likelihood against how each token explains every user (an E-step), the "
                          f"group's part minus the nearest code's {choice['mean']:+.4f} [{low:+.4f}, {high:+.4f}]: "
                          + ("the likelihood places users better than the untrained code." if high < 0 else
                             "the untrained code places them better." if low > 0 else "no better than the code."))
        if choice := differences.get("group_relative_pooled_part_minus_group_own_part"):
            low, high = choice["ci"]
            gain = differences["group_relative_pooled_part_minus_group_relative_part"]
            lines[-1] += (f" The same E-step over {pooled} draws of each user's text: the group's part minus the "
                          f"nearest code's {choice['mean']:+.4f} [{low:+.4f}, {high:+.4f}] ("
                          + ("better than the untrained code" if high < 0 else
                             "the untrained code places them better" if low > 0 else "no better than the code")
                          + f"), minus the first draw's choice {gain['mean']:+.4f} [{gain['ci'][0]:+.4f}, "
                          f"{gain['ci'][1]:+.4f}].")
        if count := differences.get("count_group_own_minus_count_group_own_additive"):
            # the same matrix of groups by users from count models (no LLM): what a token per group could carry
            population = differences["count_group_own_minus_count_population"]
            lines[-1] += (f" With no LLM, the groups' own count models on the same users and items: the group's part "
                          f"{count['mean']:+.4f} [{count['ci'][0]:+.4f}, {count['ci'][1]:+.4f}], own group - the "
                          f"population {population['mean']:+.4f}; a count model of each user's own history as a set - "
                          f"the population {differences['count_set_minus_count_population']['mean']:+.4f}.")
    if trajectory := data.get("group_trajectory"):
        def cell(summary: dict | None) -> str:
            return f"{summary['mean']:+.4f} [{summary['ci'][0]:+.4f}, {summary['ci'][1]:+.4f}]" if summary else "-"

        count = data["group_trained_users_count_part"]
        every = data["group_score_every"]
        lines += ["", "The group's part (own group's token - its additive twin, 95% interval over users) as training "
                      "went on, " + ("after each pass" if every == 1 else f"every {every} passes")
                      + ": on the probed users' held-out text (new users, as above); on one draw of the remaining "
                      f"training text of {data['users']} of the users "
                      f"the tokens train on, fixed at the start (their own users, the kind of text trained on); and "
                      f"on those users' held-out newest items (their own users, items nothing trained on). With no "
                      f"LLM, the groups' count models' part on those users' held-out items: "
                      f"{cell(count['held_out'])}"
                      + (f" ({cell(count['rating_held_out'])} on the rating tokens)" if "rating_held_out" in count
                         else "") + "; on the probed users', above.", "",
                  "| passes | NLL of the pass | new users, held-out | its rating tokens | trained users, training "
                  "text | its rating tokens | trained users, held-out | its rating tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        for entry in trajectory:
            lines.append(f"| {entry['passes']} | {data['group_nll'][entry['passes'] - 1]:.4f} | "
                         + " | ".join(cell(entry.get(prefix + name)) for name in
                                      ("held_out", "trained_users", "trained_users_held_out")
                                      for prefix in ("", "rating_")) + " |")
    if data.get("context_tokens"):
        lines += ["", "In context, own history - the shared token alone is what any such history adds (the kind of "
                      "text, its time) together with what this user's adds; own - another user's history of the same "
                      "length is the user's part alone: the most of the user the frozen LLM can use from this history, "
                      "beside the goal's 0.05 nats/token for two soft tokens."]
    lines += ["", "## Run", "", settings_table(data["record"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    config, settings, logger = configure(args.model, args.dataset, overrides)
    run = HeldOutInference.build(config, settings, logger, args.holdout_tokens)
    trainer = run.trainer
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    try:
        trainer.setup()
        if args.encoder_input == "mult_vae" and (trainer.soft.encoder is None or not args.encoder_passes):
            raise SystemExit("--encoder_input=mult_vae needs an encoder stage (uip_encoder: linear, "
                             "--encoder_passes > 0).")
        rng = np.random.default_rng(args.probe_seed)
        order = rng.permutation(run.users())
        if len(order) < 2:
            raise SystemExit("The token probe needs at least two users with a held-out text.")
        shift_users = np.sort(order[:min(args.shift_users, len(order) // 2)])
        users = np.sort(order[len(shift_users):len(shift_users) + args.users])
        if args.encoder_input == "mult_vae":
            use_mult_vae_features(trainer, logger, shift_users)
        shift_nll = train_shift(trainer, shift_users, args.shift_passes, rng, logger,
                                args.distil_context_tokens if args.shift_objective == "distil" else 0)
        if still_learning(shift_nll) is not None:
            logger.warning(f"token probe: the shared shift was still learning after {args.shift_passes} passes (NLL "
                           f"{shift_nll[-2]:.4f} -> {shift_nll[-1]:.4f}); more --shift_passes would give another start")
        collaborative = collaborative_draws(trainer, logger) if (
            "mult_vae" in {args.fit_objective, *args.also_fit} and args.fit_steps
            or args.encoder_passes and args.encoder_objective == "mult_vae") else None
        encoder_nll = train_encoder(
            trainer, shift_users, args.encoder_passes, args.encoder_learning_rate, rng, logger,
            args.distil_context_tokens if args.encoder_objective == "distil" else 0,
            collaborative if args.encoder_objective == "mult_vae" else None) if args.encoder_passes else []
        groups = None
        if args.group_tokens:
            fit_users = np.sort(np.setdiff1d(order, users))
            if len(fit_users) < args.group_tokens:
                raise SystemExit(f"--group_tokens={args.group_tokens} needs as many users outside the probed ones; "
                                 f"there are {len(fit_users)}.")
            groups = build_group_tokens(trainer, fit_users, users, args, logger, run.held_out_targets)
        scores, context_length = probe(run, users, args, rng, bool(config["show_progress"]), collaborative, groups)
        trained_users_count_part = None
        if groups is not None:
            scores.update(group_count_modes(run, groups, users))
            if groups.trajectory is not None:
                trained_users_count_part = count_group_part(run, groups, groups.trajectory.sample,
                                                            groups.trajectory.sample_groups)
    finally:
        torch.set_num_threads(threads_before)
    group_step = args.group_learning_rate or settings.shared_learning_rate   # 0: the shift's, as the fits resolve it
    pairs = PAIRS + objective_pairs(args.also_fit) + context_pairs(args.context_tokens) + keep_pairs(args.keep)
    modes, differences = interval_summary(scores, [(a, b) for a, b in pairs if a in scores and b in scores])
    differences.update(relative_part_differences(scores))
    data = {
        "users": int(len(users)), "shift_users": int(len(shift_users)), "shift_passes": args.shift_passes,
        "shift_objective": args.shift_objective, "shift_nll": shift_nll, "fit_steps": args.fit_steps,
        "fit_learning_rate": args.fit_learning_rate, "resample": args.resample,
        "draws": args.draws, "keep": args.keep,
        "fit_objective": args.fit_objective, "also_fit": args.also_fit, "encoder_passes": args.encoder_passes,
        "encoder_objective": args.encoder_objective, "encoder_input": args.encoder_input,
        **({"distil_context_tokens": args.distil_context_tokens}
           if {"distil", "teacher_text"} & {args.fit_objective, args.encoder_objective, args.shift_objective,
                                            *args.also_fit} else {}),
        "encoder_learning_rate": args.encoder_learning_rate, "encoder_nll": encoder_nll,
        "context_tokens": args.context_tokens, "context_from": args.context_from,
        "context_tokens_mean": {str(n): v for n, v in context_length.items()},
        "group_tokens": args.group_tokens,
        **({"group_by": args.group_by, "group_passes": args.group_passes, "group_training": args.group_training,
            "group_learning_rate": group_step,
            **({"group_offset_learning_rate": args.group_offset_learning_rate or group_step}
               if args.group_training == "joint" else {}),
            "group_sizes": groups.sizes,
            "group_nll": groups.nll,
            "group_likeliest_is_nearest": float(np.mean(groups.likeliest == groups.group)),
            "group_best": groups.best,          # and per probed user (in per_user's order), each choice:
            "group_relative_is_nearest": float(np.mean(groups.relative == groups.group)),
            "group_per_user": {"nearest": groups.group.tolist(), "likeliest": groups.likeliest.tolist(),
                               "relative": groups.relative.tolist(),
                               **({"relative_pooled": groups.relative_pooled.tolist()}
                                  if groups.relative_pooled is not None else {})},
            **({"group_choice_draws": args.group_choice_draws,
                "group_relative_pooled_is_nearest": float(np.mean(groups.relative_pooled == groups.group)),
                "group_relative_pooled_is_relative": float(np.mean(groups.relative_pooled == groups.relative))}
               if groups.relative_pooled is not None else {}),
            **({"group_score_every": args.group_score_every, "group_trajectory": groups.trajectory.entries,
                "group_trained_users_count_part": trained_users_count_part}
               if groups.trajectory is not None else {})}
           if groups is not None else {}),
        "holdout_tokens": args.holdout_tokens,
        "held_out_tokens_mean": float(np.mean([len(t) for t in run.held_out_targets(users).texts])),
        "modes": modes, "differences": differences,
        "per_user": {"users": [int(u) for u in users],          # each mode's scores in this order; null: no value
                     **{mode: finite_or_none(values) for mode, values in scores.items()}},
        "seconds": round(time.perf_counter() - start, 1),
        "record": run_record(config, settings, ["benchmarks/token_probe.py", *args.argv]),
    }
    name = ("token_probe" + ("_resampled" if args.resample else f"_draws{args.draws}" if args.draws > 1 else "")
            + ("" if args.fit_objective == "plain" else "_" + args.fit_objective)
            + "".join("_vs_" + objective for objective in args.also_fit)
            + ("_encoder" if args.encoder_passes else "")
            + (f"_{args.encoder_objective}" if args.encoder_passes and args.encoder_objective != "nll" else "")
            + ("_multvae" if args.encoder_passes and args.encoder_input == "mult_vae" else "")
            + ("_shiftdistil" if args.shift_objective == "distil" else "")
            + ("_keep" if args.keep and args.fit_steps else "")
            + ("_context" if args.context_tokens else "")
            + ("_oldest" if args.context_tokens and args.context_from == "oldest" else "")
            + (f"_groups{args.group_tokens}_{args.group_by}" if args.group_tokens else "")
            + ("_joint" if args.group_tokens and args.group_training == "joint" else "")
            + (f"_choice{args.group_choice_draws}" if args.group_choice_draws > 1 else ""))
    publish_benchmark(args, name, data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
