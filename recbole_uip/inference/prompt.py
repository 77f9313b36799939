"""The fixed prompt template, the positions of the soft tokens, and the per-profile block attention mask.

Layout of one user's sequence (P profiles, prefix length ``Lp``, behaviour length ``Lb``)::

    [phrase_1 tokens][S_1] [phrase_2 tokens][S_2] ... [phrase_P tokens][S_P] [bridge tokens] [behaviour tokens]
    '--- block 0 -------'  '--- block 1 -------'      '--- block P-1 -----'  '-- shared, causal over all ----'

* A position inside block ``p`` attends (causally) only to positions of block ``p``: each soft token sees its
  own phrase and itself, never another profile (the paper's per-profile causal mask).
* Bridge and behaviour positions attend causally to everything before them that is not padding.
* Where the tokenizer starts every text with a BOS token (Llama-family models expect it), the prompt starts with
  it, in a block of its own that every position sees (the model's attention sink).
* The loss is the NLL of the behaviour tokens only; the template (phrases, bridge) is never scored.

Departure from the authors' code: their mask segments were concatenated in a different order from the
embeddings and had no per-profile blocks; here one array (``block_of``) drives both, and a golden test pins it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

SHARED = -1  # block id of bridge and behaviour positions
SINK = -2    # block id of a leading BOS token: every position sees it
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """The template's token layout, identical for every user.

    Attributes:
        prefix_ids: LongTensor ``(Lp,)``; template token ids, with ``placeholder_id`` at soft-token slots.
        soft_positions: LongTensor ``(P,)``; index in the prefix of profile ``p``'s soft token.
        block_of: LongTensor ``(Lp,)``; profile index of each prefix position, ``-1`` for the bridge, ``-2`` for
            a leading BOS token.
        placeholder_id: token id written at soft slots (its embedding is replaced, never seen by the LLM).
    """

    prefix_ids: torch.Tensor
    soft_positions: torch.Tensor
    block_of: torch.Tensor
    placeholder_id: int

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_ids.numel())

    @property
    def num_profiles(self) -> int:
        return int(self.soft_positions.numel())


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def leading_bos(tokenizer) -> list[int]:
    """``[bos_token_id]`` where the tokenizer starts every text with its BOS token (the model was trained with
    one, e.g. Llama), else ``[]`` (e.g. SmolLM2, GPT-2 and Qwen2 tokenizers add none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = list(tokenizer("a")["input_ids"])
    return [bos] if ids and ids[0] == bos else []


def build_layout(tokenizer, phrases: Sequence[str], bridge: str) -> PromptLayout:
    """Tokenise the template: each phrase, then its soft slot; then the bridge text.

    Phrases after the first are tokenised with a leading space, as they follow text in the prompt.
    """
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids: list[int] = leading_bos(tokenizer)
    block_of: list[int] = [SINK] * len(ids)
    soft_positions: list[int] = []
    for p, phrase in enumerate(phrases):
        phrase_ids = _encode(tokenizer, phrase if p == 0 else " " + phrase.lstrip())
        ids += phrase_ids
        block_of += [p] * len(phrase_ids)
        soft_positions.append(len(ids))
        ids.append(placeholder)
        block_of.append(p)
    bridge_ids = _encode(tokenizer, bridge)
    ids += bridge_ids
    block_of += [SHARED] * len(bridge_ids)
    return PromptLayout(
        prefix_ids=torch.tensor(ids, dtype=torch.long),
        soft_positions=torch.tensor(soft_positions, dtype=torch.long),
        block_of=torch.tensor(block_of, dtype=torch.long),
        placeholder_id=placeholder,
    )


def allowed_attention(layout: PromptLayout, behaviour_lengths: torch.Tensor, total_length: int) -> torch.Tensor:
    """Boolean attention pattern ``(B, L, L)``: ``[b, i, j]`` is True where query ``i`` may see key ``j``.

    Args:
        behaviour_lengths: LongTensor ``(B,)``, real (unpadded) behaviour tokens per user.
        total_length: ``L = Lp + max(Lb)``.
    """
    lp = layout.prefix_length
    block = torch.full((total_length,), SHARED, dtype=torch.long)
    block[:lp] = layout.block_of
    positions = torch.arange(total_length)
    causal = positions[None, :] <= positions[:, None]                      # (L, L)
    in_profile_block = block[:, None] >= 0                                  # query inside a profile block
    same_block = block[:, None] == block[None, :]
    sink = block[None, :] == SINK                                           # a leading BOS: seen by all
    pattern = causal & (~in_profile_block | same_block | sink)              # (L, L)
    valid = positions[None, :] < (lp + behaviour_lengths)[:, None]          # (B, L): not padding
    allowed = pattern[None] & valid[:, None, :] & valid[:, :, None]         # padded keys (and queries) hidden
    # Padded queries see only themselves, so no softmax row is empty (their outputs are never used).
    allowed |= torch.eye(total_length, dtype=torch.bool)[None] & ~valid[:, :, None]
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, L, L)`` booleans to the ``(B, 1, L, L)`` additive float mask transformers accepts (0 or min)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@dataclasses.dataclass
class PromptBatch:
    """One batch of users' prompts.

    Attributes:
        input_ids: LongTensor ``(B, L)``; template + behaviour tokens, right-padded.
        labels: LongTensor ``(B, L)``; behaviour token ids at their own positions, ``-100`` elsewhere
            (the usual causal shift happens in the loss: position ``t-1`` predicts ``labels[t]``).
        allowed: BoolTensor ``(B, L, L)``; the attention pattern of :func:`allowed_attention`.
        behaviour_lengths: LongTensor ``(B,)``.
        weights: optional float ``(B, L)``; the weight of each behaviour token in the loss (0 elsewhere);
            ``None``: every behaviour token counts once.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    allowed: torch.Tensor
    behaviour_lengths: torch.Tensor
    weights: torch.Tensor | None = None


def collate(layout: PromptLayout, behaviour_ids: Sequence[Sequence[int]], pad_id: int,
            behaviour_weights: Sequence[Sequence[float]] | None = None,
            unscored: Sequence[int] | None = None) -> PromptBatch:
    """Assemble prompts for a batch of users from their behaviour token ids (and, optionally, per-token loss
    weights aligned with them). ``unscored[b]``: the first that many behaviour tokens of row ``b`` are read but
    never scored (a context before the scored text: label ``-100``, weight 0)."""
    lengths = torch.tensor([len(ids) for ids in behaviour_ids], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError("Every user in a batch needs at least one behaviour token.")
    lp = layout.prefix_length
    total = lp + int(lengths.max())
    input_ids = torch.full((len(behaviour_ids), total), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    input_ids[:, :lp] = layout.prefix_ids
    for row, ids in enumerate(behaviour_ids):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        input_ids[row, lp : lp + len(ids)] = ids
        skip = 0 if unscored is None else int(unscored[row])
        labels[row, lp + skip : lp + len(ids)] = ids[skip:]
    weights = None
    if behaviour_weights is not None:
        weights = torch.zeros(input_ids.shape, dtype=torch.float32)
        for row, (ids, w) in enumerate(zip(behaviour_ids, behaviour_weights)):
            if len(w) != len(ids):
                raise ValueError(f"User {row}: {len(w)} weights for {len(ids)} behaviour tokens.")
            weights[row, lp : lp + len(ids)] = torch.as_tensor(list(w), dtype=torch.float32)
            if unscored is not None:
                weights[row, lp : lp + int(unscored[row])] = 0.0
    return PromptBatch(input_ids, labels, allowed_attention(layout, lengths, total), lengths, weights)
