"""The token probe's training stages (``benchmarks/token_probe.py``, steps 1, 2 and 5 of its docstring): the shared
shift, the per-user fits on each objective, the linear encoder, and the passes loop they share; each trains parts of
a :class:`~recbole_uip.inference.trainer.ProfileInferenceTrainer` on the users' remaining training text (no held-out
item).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from recbole_uip.benchmarking import common_length, newest_tokens
from recbole_uip.inference.deep_prefix import prefix_step_scale
from recbole_uip.inference.prompt import IGNORE_INDEX
from recbole_uip.inference.soft_profiles import (batch_centred_map, behaviour_nll, token_mean,
                                                   weighted_token_mean)
from recbole_uip.inference.trainer import Targets, after_contexts, nan_without_ratings


def teacher_contexts(trainer, targets, context_tokens: int, predicted=None) -> list[list[int]]:
    """What the teacher reads before each user's text in ``targets`` (token ids): the user's newest
    ``context_tokens`` tokens of the items the text leaves out, or with ``predicted``
    (:func:`~recbole_uip.collaborative_text.collaborative_contexts`' function, ``--teacher_context=mult_vae``) the
    last ``context_tokens`` tokens of a text of the items a Mult-VAE predicts for the user (never an item they
    have seen, so never one of the text's)."""
    if predicted is not None:
        return [predicted(u, context_tokens) for u in targets.users]
    return [newest_tokens(trainer.text, u, targets.inputs[j], context_tokens) for j, u in enumerate(targets.users)]


def distillation_teacher(trainer, targets, context_tokens: int, offsets: torch.Tensor | None = None,
                         prefix: torch.Tensor | None = None, predicted=None, alone_weight: float = 0.0,
                         bare_context: bool = False) -> torch.Tensor:
    """The teacher of ``targets`` ``(B, L - 1, V)``: the frozen LLM's predictions of each user's text after
    :func:`teacher_contexts` (``predicted``: see there), with the users' soft-token offsets ``(B, P, D)`` (None: the
    shared token) and deep prompts ``(B, N, 2, H, m, d)`` (None: none), as
    :meth:`ProfileInferenceTrainer.teacher_probabilities` reads them. With ``alone_weight`` ``w`` > 0, the mixture
    ``w * p(text | prompt) + (1 - w) * p(text | prompt, context)`` of the predictions without and with the context
    (``--teacher_alone_weight``): the frozen LLM reading a collaborative prediction in context beats a population
    mixture only when mixed half and half (``benchmarks/in_context.py``'s ``own_half``), and a deep prompt trained
    with nothing between it and the text loses part of what it gives when a context is read after it. With
    ``bare_context`` (``--teacher_context_prompt=shared``), the mixture's context part reads the context after the
    shared token alone, without the offsets and the deep prompt (which the part without the context keeps): read
    so, a user's Mult-VAE text holds the user (``in_context.py``), read after the start's deep prompt it hardly
    does."""
    if offsets is None:
        offsets = torch.zeros(len(targets.users), *trainer.soft.anchors.shape)
    return teacher_reading(trainer, targets, teacher_contexts(trainer, targets, context_tokens, predicted), offsets,
                           prefix, alone_weight, bare_context)


def teacher_reading(trainer, targets, contexts: list[list[int]], offsets: torch.Tensor, prefix: torch.Tensor | None,
                    alone_weight: float = 0.0, bare_context: bool = False,
                    alone: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's next-token distributions ``(B, L - 1, V)`` over ``targets``' texts after ``contexts`` (token
    ids), as :func:`distillation_teacher` describes them: read after the offsets ``(B, P, D)`` and deep prompts
    ``prefix`` (with ``bare_context``, after the shared token alone), and with ``alone_weight`` ``w`` > 0 the
    mixture ``w * alone + (1 - w) * read``, ``alone`` the prediction after the prompt without a context (computed
    when None; pass it to reuse it for other contexts of the same texts)."""
    read = trainer.teacher_probabilities(targets, contexts, *context_prompt(offsets, prefix, bare_context))
    if alone_weight <= 0:
        return read
    if alone is None:
        alone = teacher_alone(trainer, targets, offsets, prefix)
    return alone.mul(alone_weight).add_(read, alpha=1.0 - alone_weight)


def teacher_alone(trainer, targets, offsets: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """The teacher's prediction without a context ``(B, L - 1, V)``: the mixture's other part."""
    return trainer.teacher_probabilities(targets, [[] for _ in targets.users], offsets, prefix)


def context_prompt(offsets: torch.Tensor, prefix: torch.Tensor | None, bare: bool) -> tuple:
    """The ``(offsets, prefix)`` a teacher reads before its context: its own, or with ``bare`` the shared token
    alone (zero offsets, no deep prompt)."""
    return (torch.zeros_like(offsets), None) if bare else (offsets, prefix)


def teacher_prompt(args, start: torch.Tensor) -> dict:
    """What the per-user fits' distillation teacher reads before its context, as the ``offsets`` / ``prefix``
    keywords of :func:`distillation_teacher` and :func:`teacher_scores`: nothing (the shared token), or with
    ``--teacher_prompt=start`` the fits' ``start`` under the name its ``--fit_prefix`` gives (a deep prompt
    ``(B, N, 2, H, m, d)`` or offsets ``(B, P, D)``)."""
    if args.teacher_prompt == "shared":
        return {}
    return {"prefix" if args.fit_prefix == "deep" else "offsets": start}


def teacher_scores(trainer, held, context_tokens: int, rotate: np.ndarray, offsets: torch.Tensor | None = None,
                   prefix: torch.Tensor | None = None, predicted=None, alone_weight: float = 0.0,
                   bare_context: bool = False) -> dict[str, tuple]:
    """The held-out text ``held`` as the distillation teacher reads it: ``{"teacher": ..., "teacher_other": ...}``,
    each ``(plain (B,), rating (B,) or None)``, after the user's :func:`teacher_contexts` (the newest
    ``context_tokens`` of all their remaining items, or their Mult-VAE text) and after another user's (``rotate``:
    whose), the two cut to a common length, with the teacher's prompt as :func:`distillation_teacher` takes it
    (:func:`teacher_prompt`), and with ``alone_weight`` > 0 each mixed as :func:`distillation_teacher` mixes them
    with the prediction without a context (the held-out tokens' NLL under the mixture, :func:`label_scores`; with
    ``bare_context``, the context read after the shared token alone, as there). How much the teacher itself knows
    of the user's next items, and how much of that is the user's."""
    contexts = teacher_contexts(trainer, held, context_tokens, predicted)
    own, other = map(list, zip(*(common_length(contexts[i], contexts[r]) for i, r in enumerate(rotate))))
    if offsets is None:
        offsets = torch.zeros(len(held.users), *trainer.soft.anchors.shape)
    with_ratings = held.flags is not None
    alone = teacher_alone(trainer, held, offsets, prefix) if alone_weight > 0 else None     # shared by both modes
    out = {}
    for mode, read in (("teacher", own), ("teacher_other", other)):
        if alone is None:
            before, deep = context_prompt(offsets, prefix, bare_context)
            scored = trainer.score_offsets(held, before, with_ratings, contexts=read, prefix=deep)
        else:
            scored = label_scores(trainer, held, teacher_reading(trainer, held, read, offsets, prefix, alone_weight,
                                                                 bare_context, alone), with_ratings)
        out[mode] = scored if with_ratings else (scored, None)
    return out


def label_scores(trainer, targets, probabilities: torch.Tensor, with_ratings: bool = False):
    """``targets``' plain NLL per user ``(B,)`` float64 under next-token ``probabilities`` ``(B, L - 1, V)`` aligned as
    :meth:`~recbole_uip.inference.trainer.ProfileInferenceTrainer.teacher_probabilities` aligns them; with
    ``with_ratings``, the pair ``(plain, rating)`` as
    :meth:`~recbole_uip.inference.trainer.ProfileInferenceTrainer.score_offsets` returns it (``rating`` nan for a
    user whose text has none): the scores of a distribution no single forward pass gives, such as a mixture."""
    batch = trainer.prompt_batch(targets, ratings_only=with_ratings)
    labels = batch.labels[:, 1:probabilities.shape[1] + 1]
    picked = probabilities.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_nll = torch.where(labels == IGNORE_INDEX, 0.0, -torch.log(picked.clamp(min=1e-30)))
    plain = token_mean(token_nll, batch.labels).double().numpy()
    if not with_ratings:
        return plain
    rating = weighted_token_mean(token_nll, batch.weights).double().numpy()
    return plain, nan_without_ratings(targets, rating)


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


@dataclasses.dataclass(frozen=True)
class DeepPrompts:
    """Users' deep prompts ``(B, N, 2, H, m, d)`` (``--fit_prefix=deep``, ``--encoder_prefix=deep``, ``deep_shared``)
    where a mode holds what the LLM reads for each user: they are scored beside the shared soft tokens, not as
    offsets of them (:func:`score_mode`)."""

    values: torch.Tensor


def score_mode(trainer, targets, tokens, with_ratings: bool = False):
    """:meth:`~recbole_uip.inference.trainer.ProfileInferenceTrainer.score_offsets` of ``targets`` with a mode's
    ``tokens``: offsets ``(B, P, D)``, or :class:`DeepPrompts` read with the shared soft tokens."""
    if isinstance(tokens, DeepPrompts):
        shared = torch.zeros(len(targets.users), *trainer.soft.anchors.shape)
        return trainer.score_offsets(targets, shared, with_ratings, prefix=tokens.values)
    return trainer.score_offsets(targets, tokens, with_ratings)


def user_fit(trainer, args):
    """The per-user fit ``--fit_prefix`` asks for: ``fit_user_prefixes`` (deep prompts) or ``fit_user_tokens``."""
    return trainer.fit_user_prefixes if args.fit_prefix == "deep" else trainer.fit_user_tokens


def fit_tokens(trainer, objective: str, draws: list, start: torch.Tensor, args,
               sampled: list | None = None, predicted=None) -> tuple[torch.Tensor, object]:
    """Each user's tokens ``(B, P, D)`` fitted on ``objective`` (``--fit_objective``'s choices) from ``start``,
    ``args.fit_texts_per_step`` of ``draws`` per step in turn (each step on their mean gradient; each draw with its
    own teacher under distil, the teacher reading the user's history with :func:`teacher_prompt`; with
    ``predicted``, ``--teacher_context=mult_vae``, the user's Mult-VAE text in place of the history:
    :func:`teacher_contexts`), and the first text they were fitted to (``Targets``): ``draws[0]``, or for
    ``teacher_text`` the teacher's context followed by it; for ``mult_vae``, one of ``sampled`` (texts from
    :func:`collaborative_draws`, ``args.fit_texts_per_step`` per step, each step on their mean gradient), the first
    of them. With ``args.fit_prefix == "deep"``, each user's deep prompt
    ``(B, N, 2, H, m, d)`` instead, from ``start`` of that shape
    (:meth:`~recbole_uip.inference.trainer.ProfileInferenceTrainer.fit_user_prefixes`)."""
    fit = user_fit(trainer, args)
    if objective == "mult_vae":
        return fit(sampled, start, args.fit_steps, args.fit_learning_rate,
                   texts_per_step=args.fit_texts_per_step), sampled[0]
    if objective == "teacher_text":
        texts = [after_contexts(d, teacher_contexts(trainer, d, args.distil_context_tokens)) for d in draws]
        return fit(texts, start, args.fit_steps, args.fit_learning_rate,
                   texts_per_step=args.fit_texts_per_step), texts[0]
    teachers = [distillation_teacher(trainer, d, args.distil_context_tokens, **teacher_prompt(args, start),
                                     predicted=predicted, alone_weight=args.teacher_alone_weight,
                                     bare_context=args.teacher_context_prompt == "shared") for d in draws] \
        if objective == "distil" else None
    return fit(draws, start, args.fit_steps, args.fit_learning_rate, objective == "weighted", teachers,
               texts_per_step=args.fit_texts_per_step), draws[0]


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


class DeepEncoder:
    """A linear encoder from the user vector ``z (B, k)`` to a deep prompt (``--encoder_prefix=deep``)::

        prompt[u] = start + scale * (S + W z[u])        (N, 2, H, m, d)

    ``start`` is :meth:`~recbole_uip.inference.trainer.ProfileInferenceTrainer.shared_prefix`'s, ``scale`` each
    layer's root mean square key and value of the shared tokens (both from the trainer's soft tokens as they are
    when it is built), ``S`` (``shared``) a deep prompt every user shares (the shift's counterpart) and ``W``
    (``weights``, ``(N, 2, H, m, d, k)``) the encoder; from zero, or from the tensors of a trained one."""

    def __init__(self, trainer, shared: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        self.trainer = trainer
        self.start = trainer.shared_prefix(1)[0]                                # (N, 2, H, m, d)
        self.scale = prefix_step_scale(trainer.shared_keys_values())            # (N, 2, 1, 1, 1)
        self.shared = torch.zeros_like(self.start) if shared is None else shared.clone()
        self.weights = torch.zeros(*self.start.shape, trainer.soft.encoder.shape[-1]) if weights is None \
            else weights.clone()

    def prompts(self, users: np.ndarray, inputs, centred: bool = False) -> torch.Tensor:
        """The users' deep prompts ``(B, N, 2, H, m, d)`` from ``z`` of the items ``inputs``; with ``centred``, ``W``
        reads ``z`` minus its batch mean only (:func:`batch_centred_map`)."""
        z = self.trainer.features(users, inputs).float()                       # (B, k)
        part = batch_centred_map("...k,bk->b...", self.weights, z) if centred else \
            torch.einsum("...k,bk->b...", self.weights, z)
        return self.start + self.scale * (self.shared + part)

    def __call__(self, users: np.ndarray, inputs) -> torch.Tensor:
        """:meth:`prompts`, float32, no gradient."""
        with torch.no_grad():
            return self.prompts(users, inputs)

    def tensors(self) -> dict:
        """``{"shared": S, "weights": W}``, detached copies (what :class:`DeepEncoder` is rebuilt from)."""
        return {"shared": self.shared.detach().clone(), "weights": self.weights.detach().clone()}


def train_deep_encoder(trainer, users: np.ndarray, passes: int, learning_rate: float, rng: np.random.Generator,
                       logger, collaborative=None, user_part: bool = True):
    """A :class:`DeepEncoder` trained by Adam at every M-step batch, ``passes`` passes over ``users``, on the M-step's
    objective (or on ``collaborative``'s texts), the soft tokens kept at the shared token; ``S`` and ``W`` from zero.
    As the shallow encoder's (:meth:`ProfileInferenceTrainer.offsets` with ``batch_centred``), ``W`` learns from
    ``z`` minus its batch mean only, so that what every user needs goes to ``S``. ``learning_rate``: Adam's step,
    relative to ``scale``. Without ``user_part``, ``W`` stays zero and ``S`` trains alone
    (``--encoder_prefix=deep_shared``): one deep prompt for every user, trained as long on the same batches, the
    control the users' prompts must beat.

    Returns the mean NLL of each pass and the encoder (``encode(users, inputs) -> (B, N, 2, H, m, d)``)."""
    if trainer.soft.encoder is None:
        raise SystemExit("--encoder_prefix=deep and deep_shared need the user vector of an encoder (uip_encoder: "
                         "linear).")
    encoder = DeepEncoder(trainer)
    encoder.shared.requires_grad_(True)
    encoder.weights.requires_grad_(user_part)
    optimizer = torch.optim.Adam([encoder.shared, encoder.weights] if user_part else [encoder.shared],
                                 lr=learning_rate)

    def step(targets) -> float:
        optimizer.zero_grad(set_to_none=True)
        tokens = trainer.soft.center().detach()[None].expand(len(targets.users), -1, -1)
        nll, objective = behaviour_nll(trainer.llm.model, trainer.layout, trainer.prompt_batch(targets), tokens,
                                       weighted=True, prefix=encoder.prompts(targets.users, targets.inputs,
                                                                              centred=True))
        objective.mean().backward()
        optimizer.step()
        return float(nll.detach().mean())

    means = batch_passes(trainer, users, passes, rng, logger, step, "deep encoder", collaborative)
    return means, encoder
