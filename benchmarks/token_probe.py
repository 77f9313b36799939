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
   that text, with the shared token (``--teacher_prompt=start``: with the fit's start prompt), when it reads the
   user's newest ``--distil_context_tokens`` tokens of their other remaining items before it (distillation: the
   in-context effect of the history, not the one draw; ``--teacher_context=mult_vae``: as many tokens of a text of
   items a Mult-VAE predicts for the user instead, ``mult_vae_top`` its most probable items; with
   ``--teacher_alone_weight=w``, the teacher is the mixture of ``w`` times the prediction without the context and
   ``1 - w`` times the prediction after it (with ``--teacher_context_prompt=shared``, the context read after the
   shared token alone, not after the start's prompt); modes ``teacher`` and ``teacher_other`` score the held-out
   text as the teacher reads it, after the user's context and another user's), or
   (``--fit_objective=teacher_text``) on the plain NLL of the teacher's whole text, those newest tokens followed by
   the draw (what distillation reads, fitted without a teacher: the control that tells distillation from the
   recency and length of the teacher's text), or (``--fit_objective=mult_vae``) on the plain NLL of a new text at
   every step, written from items a Mult-VAE of the training histories predicts for the user among those they have
   not seen (``recbole_uip.collaborative_text``: the user's predicted taste, never one text to memorise); with
   ``--fit_texts_per_step=K``, K new texts at every step and the step on their mean gradient (less noise per step;
   on the other objectives, K of the ``--draws`` at every step in turn, each with its own teacher under distil).
   With ``--fit_prefix=deep``, each fit trains a deep prompt instead of the soft tokens' offsets: keys and values
   at every layer of the LLM, one entry per profile, read before the prompt by every position
   (``recbole_uip.inference.deep_prefix``; P-Tuning v2's remedy for shallow prompts too weak to steer a small
   model), starting at each layer with the keys the shared tokens have there and zero values (mode
   ``shared_prefix``: it reads nothing, yet takes attention from the prompt), the soft tokens kept at the shared
   token; every mode below is then scored with the deep prompts in their place. With ``--fit_start=encoder``,
   every fit starts instead from what the encoder stage (step 5) writes for the user: a per-user refinement on top of
   the amortised path (with ``--encoder_prefix=deep_shared``, of one deep prompt trained for every user, so that the
   fits' steps go to what is the user's, not to what every user needs; ``own`` minus ``encoder`` is what they add).
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
   2-4) and scores the encoder alone. With ``--encoder_prefix=deep``, the encoder writes a deep prompt instead
   (``train_deep_encoder``: ``start + scale * (S + W z)``, a shared deep prompt ``S`` trained beside ``W``), and
   with ``--encoder_prefix=deep_shared`` its control, ``S`` trained alone (one deep prompt for every user, which
   the users' prompts, paired user by user with ``benchmarks/token_probe_pair.py``, must beat);
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
   text they are trained on, on their unseen items, or on neither. With ``--group_shuffle=true``, the shuffled-ID
   control: each group's token is trained on as many users drawn at random (:func:`shuffled_members`), so that its
   group's part is the measure's own bias, and its scores, paired user by user with those of the same command
   without it (``benchmarks/token_probe_pair.py``), say whether a group's token beats a token trained as long on
   random users.
   ``group_any`` is each user's mean over every group's token, a random group's token.

Own minus mean on the fitted text is memorisation; on the held-out text it is what generalises, the quantity the
issue's goal (0.05 nats/token below the mean token) is about (``encoder`` minus ``encoder_mean`` without the
per-user fits). Writes ``results/<dataset>/<settings fingerprint>/token_probe[_resampled|_draws<K>][_<objective>][_deep][_vs_<objective>...]
[_encoder[_deep|_deepshared][_distil]][_shiftdistil][_keep][_context[_oldest]][_groups<K>_<group_by>[_joint][_choice<N>][_shuffled]][_<variant>].{json,md}``. The JSON
also keeps each probed user's score in every mode (``per_user``, in the order of its ``users``, the trainer's user
indices), so that two runs over the same users (the same dataset, split, ``--probe_seed`` and ``--users``) can be
compared user by user. With ``--start_cache=DIR``, the trained start (steps 1 and 5) is kept in ``DIR`` and loaded
by any later run whose settings, stage arguments, data and code are the same (``recbole_uip.token_probe.start_cache``).

This script parses the arguments, runs the stages in order and scores every mode (:func:`probe`); the stages, the
group tokens, what they carry and the report live in ``recbole_uip.token_probe`` (``stages``, ``groups``,
``group_scores``, ``report``, ``start_cache``; the modes and pairs in ``modes``), where the tests reach them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recbole_uip.benchmarking import (
    CONTEXT_ENDS, HeldOutInference, benchmark_parser, comma_separated, configure, context_positions, finite_or_none,
    interval_summary, matched_contexts, parse_known_with_overrides, publish_benchmark, run_record,
)
from recbole_uip.collaborative_text import collaborative_contexts
from recbole_uip.token_probe.group_scores import (
    GroupTokens, count_group_part, group_count_modes, group_modes, relative_part_differences, score_every_token,
)
from recbole_uip.token_probe.groups import GROUP_BY, GROUP_TRAINING, build_group_tokens
from recbole_uip.token_probe.modes import (
    BATCH, OBJECTIVES, PAIRS, context_pairs, keep_mode, keep_pairs, objective_pairs,
)
from recbole_uip.token_probe.report import render
from recbole_uip.token_probe.start_cache import StartCache, TrainedStart, source_digest, start_key
from recbole_uip.token_probe.stages import (
    ENCODER_INPUTS, DeepEncoder, DeepPrompts, collaborative_draws, fit_tokens, score_mode, still_learning,
    train_deep_encoder, teacher_prompt, teacher_scores, train_encoder, train_shift, use_mult_vae_features, user_fit,
)


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
    parser.add_argument("--fit_prefix", choices=("shallow", "deep"), default="shallow",
                        help="what the per-user fits (and the oracle) train: the soft tokens' offsets (shallow, the "
                             "paper's soft token; the default) or a deep prompt, keys and values at every layer of "
                             "the LLM, one entry per profile, starting with the keys the shared tokens have at each "
                             "layer and zero values (deep; recbole_uip.inference.deep_prefix)")
    parser.add_argument("--fit_start", choices=("shared", "encoder"), default="shared",
                        help="where each per-user fit (and the oracle) starts: the shared token, or for deep fits its "
                             "keys with zero values (shared, the default), or what the encoder stage writes for the "
                             "user (encoder: a refinement on top of the amortised path; needs --encoder_passes, with "
                             "--encoder_prefix=deep or deep_shared for deep fits and shallow for shallow ones)")
    parser.add_argument("--fit_texts_per_step", type=int, default=1,
                        help="texts per fit step, each step on the mean of their gradients: new Mult-VAE texts with "
                             "--fit_objective=mult_vae, else K of the --draws in turn (--draws >= K; with --draws=K "
                             "every step takes all of them); default 1; K costs K times the passes of one text per "
                             "step")
    parser.add_argument("--also_fit", default="",
                        help="further objectives, comma-separated: the same users' tokens fitted again from the same "
                             "draws on each, and compared with the --fit_objective's user by user (default: none)")
    parser.add_argument("--teacher_prompt", choices=("shared", "start"), default="shared",
                        help="what the distillation teacher of the per-user fits reads before the user's history: "
                             "the shared token (shared, the default), or each fit's start (start: with "
                             "--fit_start=encoder, what the encoder stage writes for the user, a deep prompt for deep "
                             "fits; a teacher that knows what the start knows, and the history besides)")
    parser.add_argument("--teacher_context", choices=("history", "mult_vae", "mult_vae_top"), default="history",
                        help="what the per-user fits' distillation teacher reads before the text: the user's newest "
                             "remaining items (history, the default), or the last --distil_context_tokens tokens of "
                             "a text of items a Mult-VAE predicts for the user among those they have not seen, drawn "
                             "(mult_vae) or most probable first (mult_vae_top)")
    parser.add_argument("--teacher_alone_weight", type=float, default=0.0,
                        help="the per-user fits' distillation teacher as a mixture: this weight on the LLM's "
                             "prediction without the context (after the teacher's prompt alone), the rest on its "
                             "prediction after the context; modes teacher and teacher_other score the mixture "
                             "(default 0: the prediction after the context alone)")
    parser.add_argument("--teacher_context_prompt", choices=("same", "shared"), default="same",
                        help="with --teacher_alone_weight, what the mixture's context part reads before the context: "
                             "the teacher's prompt (same, the default), or the shared token alone (shared: the "
                             "start's prompt only in the part without the context)")
    parser.add_argument("--distil_context_tokens", type=int, default=128,
                        help="the teacher's context for --fit_objective=distil and --encoder_objective=distil: the "
                             "user's newest N tokens of their remaining items outside the fitted text, or with "
                             "--teacher_context=mult_vae the last N tokens of their Mult-VAE text (default 128)")
    parser.add_argument("--probe_seed", type=int, default=7, help="draws the probed and the shift's users")
    parser.add_argument("--start_cache", default="",
                        help="a folder for trained starts (the shift and the encoder stage): a run whose settings, "
                             "stage arguments, data and code match a cached start loads it instead of training it "
                             "again, with the same results to the last digit; any code change trains anew "
                             "(default: no cache; start_cache from benchmarks/ is a folder git ignores)")
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
    parser.add_argument("--encoder_prefix", choices=("shallow", "deep", "deep_shared"), default="shallow",
                        help="what the encoder stage's encoder writes: the soft tokens' offsets A z (shallow, the "
                             "default) or a deep prompt start + scale * (S + W z), S trained beside W, the soft tokens "
                             "kept at the shared token (deep; --encoder_learning_rate is then relative to each "
                             "layer's root mean square key and value), or its control, S trained alone with W held "
                             "at zero: one deep prompt for every user (deep_shared)")
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
    parser.add_argument("--group_shuffle", type=_true, default=False,
                        help="with --group_tokens, train each group's token on as many users drawn at random instead "
                             "of its own (the groups' members shuffled, sizes kept; the probed users keep their "
                             "nearest code's group): the shuffled-ID control for the tokens (default false)")
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
    if args.encoder_prefix != "shallow" and (not args.encoder_passes or args.encoder_objective == "distil"):
        parser.error("--encoder_prefix=deep and deep_shared train deep prompts in the encoder stage: --encoder_passes "
                     "must be positive, and they learn from the texts (nll or mult_vae), not from a teacher")
    if args.fit_prefix == "deep" and not args.fit_steps:
        parser.error("--fit_prefix=deep fits per-user deep prompts: --fit_steps must be positive")
    if args.fit_start == "encoder" and (not args.fit_steps or not args.encoder_passes
                                        or (args.fit_prefix == "deep") != (args.encoder_prefix != "shallow")):
        parser.error("--fit_start=encoder starts the per-user fits from the encoder stage's prompts: --fit_steps and "
                     "--encoder_passes must be positive, and deep fits need a deep encoder (--encoder_prefix=deep or "
                     "deep_shared), shallow fits the shallow one")
    if args.fit_texts_per_step < 1 or args.fit_texts_per_step > 1 and (
            args.also_fit or not args.fit_steps or args.fit_objective != "mult_vae" and (
                args.resample or args.draws < args.fit_texts_per_step)):
        parser.error("--fit_texts_per_step takes K >= 1 texts, more than one only with positive --fit_steps and no "
                     "--also_fit, and on objectives other than mult_vae (a new text for each) with at least K --draws "
                     "and no --resample (a step takes K different draws)")
    if not 0 <= args.teacher_alone_weight < 1:
        parser.error("--teacher_alone_weight is the weight of the prediction without the context in the teacher's "
                     "mixture: at least 0 and below 1 (at 1 the teacher would not read the context at all)")
    if args.teacher_context_prompt == "shared" and (args.teacher_prompt != "start" or not args.teacher_alone_weight):
        parser.error("--teacher_context_prompt=shared reads the context without the start's prompt, which the part "
                     "without the context keeps: give --teacher_prompt=start and --teacher_alone_weight above 0")
    if (args.teacher_prompt != "shared" or args.teacher_context != "history" or args.teacher_alone_weight) \
            and "distil" not in {args.fit_objective, *args.also_fit}:
        parser.error("--teacher_prompt, --teacher_context and --teacher_alone_weight are the per-user fits' "
                     "distillation teacher's: give --fit_objective=distil (or --also_fit=distil)")
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
    if args.group_shuffle and not args.group_tokens:
        parser.error("--group_shuffle=true shuffles the groups of --group_tokens: give --group_tokens too")
    if args.group_choice_draws < 1 or args.group_choice_draws > 1 and not args.group_tokens:
        parser.error("--group_choice_draws takes N >= 1 draws, more than one only with --group_tokens")
    if args.group_offset_learning_rate < 0 or args.group_offset_learning_rate and (
            not args.group_tokens or args.group_training != "joint"):
        parser.error("--group_offset_learning_rate takes 0 (the shift's step) or a positive step with --group_tokens "
                     "and --group_training=joint (only there are the groups' offsets apart from the shift)")
    return args, overrides


def probe(run: HeldOutInference, users: np.ndarray, args, rng: np.random.Generator, show_progress: bool,
          collaborative=None, groups: GroupTokens | None = None, encode=None, predicted=None) -> tuple[dict, dict]:
    """Per-user plain NLL ``{mode: (n,)}`` of the modes in the module docstring, and ``{"rating_" + mode: (n,)}``
    on the held-out rating tokens alone where the text marks them (nan for a user whose held-out text has none);
    and per context budget, the mean context length in tokens (``{}`` without ``--context_tokens``).
    ``collaborative``: :func:`collaborative_draws`'s ``draw``, needed by the ``mult_vae`` objectives; its texts are
    drawn from a generator of their own, so that the other objectives' draws stay those of a run without it. Tokens
    fitted (or an encoder trained) on its texts are also scored on one more text drawn for each user from the same
    distribution and fitted on by nothing (``*_on_new_draw``, from a third generator): whether they learnt the
    user's distribution at all, apart from whether it carries to the user's real held-out items. ``groups``:
    :func:`build_group_tokens`'s, for the ``group_*`` modes. ``encode``: :func:`train_deep_encoder`'s, whose deep
    prompts the ``encoder*`` modes then are (None: the trainer's shallow encoder ``A z``). ``predicted``:
    ``--teacher_context=mult_vae``'s texts (:func:`~recbole_uip.collaborative_text.collaborative_contexts`), what the
    distillation teacher reads. Under distil the held-out text is also scored as the teacher reads it (``teacher``,
    ``teacher_other``: :func:`teacher_scores`)."""
    trainer = run.trainer
    scores: dict[str, list] = {}

    remaining = {u: np.arange(len(trainer.text.user_pieces[u])) for u in users}   # the trainer's text: no held-out item
    context_length: dict[int, list[int]] = {}
    group_scores: dict[str, list[np.ndarray]] = {}       # per prefix, every group's token on each batch (K, B)
    likeliest_other: list[np.ndarray] = []
    sample_rng, new_draw_rng = np.random.default_rng([args.probe_seed, 1]), np.random.default_rng([args.probe_seed, 2])
    deep = args.fit_prefix == "deep"
    wrap = DeepPrompts if deep else (lambda fitted: fitted)           # what the fits return, as a mode holds it
    bar = tqdm(total=len(users), desc="token probe", ncols=100, disable=not show_progress)
    for start in range(0, len(users), BATCH):
        batch = users[start:start + BATCH]
        held = run.held_out_targets(batch)
        rotate = torch.as_tensor(np.roll(np.arange(len(batch)), 1))
        shared = torch.zeros(len(batch), *trainer.soft.anchors.shape)
        modes = {"shared": (held, shared)}
        new_draw = collaborative(batch, new_draw_rng) if collaborative else None
        if args.encoder_passes:
            with torch.no_grad():                                           # A z, z from the remaining items
                encoded = trainer.offsets(batch, held.inputs).cpu() if encode is None else encode(batch, held.inputs)
            as_mode = (lambda values: values) if encode is None else DeepPrompts
            modes.update({"encoder": (held, as_mode(encoded)), "encoder_other": (held, as_mode(encoded[rotate])),
                          "encoder_mean": (held, as_mode(encoded.mean(0, keepdim=True).expand_as(encoded)))})
            if args.encoder_objective == "mult_vae":
                modes.update({m + "_on_new_draw": (new_draw, modes[m][1])
                              for m in ("encoder", "encoder_other", "encoder_mean")})
        if args.fit_start == "encoder":                                     # parse_args: with an encoder stage
            start_rows = encoded                    # a refinement of what the amortised path gives each user
        else:
            start_rows = trainer.shared_prefix(len(batch)) if deep and args.fit_steps else shared
            if deep and args.fit_steps:
                modes["shared_prefix"] = (held, wrap(start_rows))
        if args.fit_steps:
            draws = [trainer.targets(batch, rng) for _ in range(args.draws)]
            sampled = [collaborative(batch, sample_rng) for _ in range(args.fit_steps * args.fit_texts_per_step)] \
                if "mult_vae" in (args.fit_objective, *args.also_fit) else None   # not for the encoder's alone
            for objective in (args.fit_objective, *args.also_fit):
                p = "" if objective == args.fit_objective else objective + "_"
                own, fitted_text = fit_tokens(trainer, objective, draws, start_rows, args, sampled, predicted)
                mean = own.mean(0, keepdim=True).expand_as(own)
                fitted = {p + "own": (held, own), p + "mean": (held, mean), p + "other_user": (held, own[rotate]),
                          p + "own_halfway": (held, (own + mean) / 2), p + "own_on_fitted_text": (fitted_text, own),
                          p + "mean_on_fitted_text": (fitted_text, mean)}
                if objective == "mult_vae":
                    fitted.update({p + "own_on_new_draw": (new_draw, own), p + "mean_on_new_draw": (new_draw, mean),
                                   p + "other_user_on_new_draw": (new_draw, own[rotate])})
                if not p:                   # a token shrunk towards the mean: how much of a fit is the user's
                    fitted.update({keep_mode(k): (held, k * own + (1 - k) * mean) for k in args.keep})
                modes.update({mode: (targets, wrap(values)) for mode, (targets, values) in fitted.items()})
            if "distil" in (args.fit_objective, *args.also_fit):        # the teacher itself, on the held-out text
                for mode, (plain, rating) in teacher_scores(trainer, held, args.distil_context_tokens, rotate.numpy(),
                                                            predicted=predicted,
                                                            alone_weight=args.teacher_alone_weight,
                                                            bare_context=args.teacher_context_prompt == "shared",
                                                            **teacher_prompt(args, start_rows)).items():
                    scores.setdefault(mode, []).append(plain)
                    if rating is not None:
                        scores.setdefault("rating_" + mode, []).append(rating)
        if groups is not None:
            own = groups.tokens[torch.as_tensor(groups.group[start:start + len(batch)])]
            modes["group_mean"] = (held, own.mean(0, keepdim=True).expand_as(own))
            likeliest_other.append(groups.likeliest[start:start + len(batch)][rotate.numpy()])
            scored = groups.final_held_out_scores(start // BATCH)
            if scored is None:
                scored = score_every_token(trainer, held, groups.tokens, with_ratings=held.flags is not None)
            for prefix, values in zip(("", "rating_"), scored):
                group_scores.setdefault(prefix, []).append(values)
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
            modes["oracle"] = (held, wrap(user_fit(trainer, args)(held, start_rows, args.fit_steps,
                                                                   args.fit_learning_rate,
                                                                   args.fit_objective == "weighted")))
        for mode, (targets, offsets) in modes.items():
            if targets is held and held.flags is not None:          # the held-out modes, also on their rating tokens
                plain, rating = score_mode(trainer, targets, offsets, with_ratings=True)
                scores.setdefault("rating_" + mode, []).append(rating)
            else:
                plain = score_mode(trainer, targets, offsets)
            scores.setdefault(mode, []).append(plain)
        bar.update(len(batch))
    bar.close()
    scores = {mode: np.concatenate(values) for mode, values in scores.items()}
    if groups is not None:
        for prefix, values in group_scores.items():          # (K, n): group g's token on user j
            scores.update(group_modes(np.concatenate(values, axis=1), groups, np.concatenate(likeliest_other), prefix))
    return scores, {budget: float(np.mean(lengths)) for budget, lengths in context_length.items()}


def train_start(trainer, shift_users: np.ndarray, args, rng: np.random.Generator, logger,
                collaborative) -> TrainedStart:
    """Steps 1 and 5 of the module docstring on ``shift_users``: the shared shift, then the encoder stage (the
    shallow encoder ``A`` in the trainer's soft tokens, or a :class:`DeepEncoder`), drawing from ``rng``; what they
    leave behind, as :class:`~recbole_uip.token_probe.start_cache.StartCache` keeps it."""
    shift_nll = train_shift(trainer, shift_users, args.shift_passes, rng, logger,
                            args.distil_context_tokens if args.shift_objective == "distil" else 0)
    encoder_nll, deep = [], None
    if args.encoder_passes and args.encoder_prefix != "shallow":
        encoder_nll, deep = train_deep_encoder(trainer, shift_users, args.encoder_passes, args.encoder_learning_rate,
                                               rng, logger,
                                               collaborative if args.encoder_objective == "mult_vae" else None,
                                               user_part=args.encoder_prefix == "deep")
    elif args.encoder_passes:
        encoder_nll = train_encoder(
            trainer, shift_users, args.encoder_passes, args.encoder_learning_rate, rng, logger,
            args.distil_context_tokens if args.encoder_objective == "distil" else 0,
            collaborative if args.encoder_objective == "mult_vae" else None)
    return TrainedStart(soft={k: v.detach().cpu().clone() for k, v in trainer.soft.state_dict().items()},
                        deep_encoder=None if deep is None else deep.tensors(), rng_state=rng.bit_generator.state,
                        shift_nll=shift_nll, encoder_nll=encoder_nll)


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
        collaborative = collaborative_draws(trainer, logger) if (
            "mult_vae" in {args.fit_objective, *args.also_fit} and args.fit_steps
            or args.encoder_passes and args.encoder_objective == "mult_vae") else None
        cache = StartCache(args.start_cache, start_key(args, settings, trainer.histories.items,
                                                       source_digest(Path(__file__)))) if args.start_cache else None
        saved = cache.load(logger) if cache is not None else None
        if saved is None:
            saved = train_start(trainer, shift_users, args, rng, logger, collaborative)
            if cache is not None:
                cache.save(saved)
                logger.info(f"token probe: the trained start written to the start cache ({cache.path.name})")
        else:
            trainer.soft.load_state_dict(saved.soft)
            rng.bit_generator.state = saved.rng_state
            logger.info(f"token probe: the start (shift and encoder stage) loaded from the start cache "
                        f"({cache.path.name}); shift NLL per pass {saved.shift_nll}, encoder {saved.encoder_nll}")
        shift_nll, encoder_nll = saved.shift_nll, saved.encoder_nll
        encode = None if saved.deep_encoder is None else DeepEncoder(trainer, **saved.deep_encoder)
        if still_learning(shift_nll) is not None:
            logger.warning(f"token probe: the shared shift was still learning after {args.shift_passes} passes (NLL "
                           f"{shift_nll[-2]:.4f} -> {shift_nll[-1]:.4f}); more --shift_passes would give another start")
        groups = None
        if args.group_tokens:
            fit_users = np.sort(np.setdiff1d(order, users))
            if len(fit_users) < args.group_tokens:
                raise SystemExit(f"--group_tokens={args.group_tokens} needs as many users outside the probed ones; "
                                 f"there are {len(fit_users)}.")
            groups = build_group_tokens(trainer, fit_users, users, args, logger, run.held_out_targets)
        predicted = None if args.teacher_context == "history" else collaborative_contexts(
            trainer.text, users, seed=args.probe_seed, most_likely_first=args.teacher_context == "mult_vae_top")
        scores, context_length = probe(run, users, args, rng, bool(config["show_progress"]), collaborative, groups,
                                       encode, predicted)
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
        **({"fit_prefix": args.fit_prefix} if args.fit_prefix != "shallow" else {}),
        **({"encoder_prefix": args.encoder_prefix} if args.encoder_prefix != "shallow" else {}),
        **({"fit_start": args.fit_start} if args.fit_start != "shared" else {}),
        **({"fit_texts_per_step": args.fit_texts_per_step} if args.fit_texts_per_step > 1 else {}),
        **({"teacher_prompt": args.teacher_prompt} if args.teacher_prompt != "shared" else {}),
        **({"teacher_context": args.teacher_context} if args.teacher_context != "history" else {}),
        **({"teacher_alone_weight": args.teacher_alone_weight} if args.teacher_alone_weight else {}),
        **({"teacher_context_prompt": args.teacher_context_prompt} if args.teacher_context_prompt != "same" else {}),
        **({"start_cache": "loaded" if cache.loaded else "written"} if cache is not None else {}),
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
        **({"group_by": args.group_by, "group_shuffle": args.group_shuffle, "group_passes": args.group_passes,
            "group_training": args.group_training,
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
            + ("_deep" if args.fit_prefix == "deep" else "")
            + ("_fromencoder" if args.fit_start == "encoder" else "")
            + ("_teacherstart" if args.teacher_prompt == "start" else "")
            + {"history": "", "mult_vae": "_teachermultvae", "mult_vae_top": "_teachermultvaetop"}[args.teacher_context]
            + (f"_teacheralone{args.teacher_alone_weight:g}" if args.teacher_alone_weight else "")
            + ("_contextbare" if args.teacher_context_prompt == "shared" else "")
            + (f"_texts{args.fit_texts_per_step}" if args.fit_texts_per_step > 1 else "")
            + "".join("_vs_" + objective for objective in args.also_fit)
            + ("_encoder" if args.encoder_passes else "")
            + ({"deep": "_deep", "deep_shared": "_deepshared"}.get(args.encoder_prefix, "") if args.encoder_passes else "")
            + (f"_{args.encoder_objective}" if args.encoder_passes and args.encoder_objective != "nll" else "")
            + ("_multvae" if args.encoder_passes and args.encoder_input == "mult_vae" else "")
            + ("_shiftdistil" if args.shift_objective == "distil" else "")
            + ("_keep" if args.keep and args.fit_steps else "")
            + ("_context" if args.context_tokens else "")
            + ("_oldest" if args.context_tokens and args.context_from == "oldest" else "")
            + (f"_groups{args.group_tokens}_{args.group_by}" if args.group_tokens else "")
            + ("_joint" if args.group_tokens and args.group_training == "joint" else "")
            + (f"_choice{args.group_choice_draws}" if args.group_choice_draws > 1 else "")
            + ("_shuffled" if args.group_tokens and args.group_shuffle else ""))
    publish_benchmark(args, name, data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
