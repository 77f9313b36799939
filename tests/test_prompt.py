"""Golden tests of the prompt layout and the per-profile block attention mask, and proof that the tiny Llama
honours the 4D mask (a soft token never sees another profile; padding is invisible)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recbole_uip.config import default_values
from recbole_uip.inference.llm import load_frozen_llm
from recbole_uip.inference.prompt import (
    IGNORE_INDEX, SHARED, additive_mask, allowed_attention, build_layout, collate,
)
from recbole_uip.inference.soft_profiles import behaviour_nll


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm_dir)


@pytest.fixture(scope="module")
def llm(tiny_llm_dir):
    return load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32")


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------- layout
def test_layout_of_the_default_template_is_phrase_then_soft_slot_then_bridge(tokenizer):
    defaults = default_values()
    phrases = list(defaults["uip_profiles"].values())
    bridge = defaults["uip_behaviour_prefix"]
    layout = build_layout(tokenizer, phrases, bridge)

    p1 = encode(tokenizer, phrases[0])
    p2 = encode(tokenizer, " " + phrases[1])          # later phrases follow text: leading space
    br = encode(tokenizer, bridge)
    assert len(p1) > 1 and len(p2) > 1 and len(br) > 1
    pad = tokenizer.pad_token_id
    assert layout.placeholder_id == pad

    assert layout.prefix_length == len(p1) + len(p2) + 2 + len(br)
    assert layout.num_profiles == 2
    assert layout.soft_positions.tolist() == [len(p1), len(p1) + 1 + len(p2)]
    assert layout.prefix_ids.tolist() == p1 + [pad] + p2 + [pad] + br
    assert layout.block_of.tolist() == [0] * (len(p1) + 1) + [1] * (len(p2) + 1) + [SHARED] * len(br)
    assert layout.prefix_ids.dtype == layout.soft_positions.dtype == layout.block_of.dtype == torch.long


def test_layout_of_three_profiles_and_an_empty_bridge(tokenizer):
    phrases = ["Star:", "Night", "  Dark City:"]     # leading spaces of later phrases are normalised to one
    layout = build_layout(tokenizer, phrases, "")
    lengths = [len(encode(tokenizer, "Star:")), len(encode(tokenizer, " Night")), len(encode(tokenizer, " Dark City:"))]
    ends = [sum(lengths[: p + 1]) + p for p in range(3)]   # index right after phrase p's tokens
    assert layout.soft_positions.tolist() == ends
    assert layout.prefix_length == sum(lengths) + 3       # P soft slots, no bridge
    expected_blocks = []
    for p, n in enumerate(lengths):
        expected_blocks += [p] * (n + 1)
    assert layout.block_of.tolist() == expected_blocks
    assert (layout.prefix_ids[layout.soft_positions] == layout.placeholder_id).all()
    assert layout.prefix_ids[: lengths[0]].tolist() == encode(tokenizer, "Star:")
    assert layout.prefix_ids[ends[1] + 1 : ends[2]].tolist() == encode(tokenizer, " Dark City:")


# ----------------------------------------------------------------------------------------------- the mask
def small_layout(tokenizer):
    """Two 2-token phrases and a 1-token bridge: ``Q : S1 | _ Z S2 | !`` (prefix length 7)."""
    layout = build_layout(tokenizer, ["Q:", "Z"], "!")
    assert [len(encode(tokenizer, t)) for t in ("Q:", " Z", "!")] == [2, 2, 1]  # the golden matrix assumes this
    return layout


def rows(*lines: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line] for line in lines], dtype=torch.bool)


# Positions: 0 1 | 2=S1 | 3 4 | 5=S2 | 6=bridge | 7 8 9 behaviour. User 0 has 3 behaviour tokens, user 1 has 1.
GOLDEN_USER0 = rows(
    "1000000000",  # phrase 1
    "1100000000",
    "1110000000",  # S1: its phrase and itself
    "0001000000",  # phrase 2: its own block only
    "0001100000",
    "0001110000",  # S2: never sees block 0
    "1111111000",  # bridge: causal over everything
    "1111111100",  # behaviour
    "1111111110",
    "1111111111",
)
GOLDEN_USER1 = rows(
    "1000000000",
    "1100000000",
    "1110000000",
    "0001000000",
    "0001100000",
    "0001110000",
    "1111111000",
    "1111111100",  # its one behaviour token; positions 8, 9 are padding
    "0000000010",  # padded queries see only themselves
    "0000000001",
)


def test_allowed_attention_golden_matrix(tokenizer):
    layout = small_layout(tokenizer)
    assert layout.soft_positions.tolist() == [2, 5]
    assert layout.block_of.tolist() == [0, 0, 0, 1, 1, 1, SHARED]
    allowed = allowed_attention(layout, torch.tensor([3, 1]), 10)
    assert allowed.dtype == torch.bool and allowed.shape == (2, 10, 10)
    assert torch.equal(allowed[0], GOLDEN_USER0), allowed[0].int()
    assert torch.equal(allowed[1], GOLDEN_USER1), allowed[1].int()


def test_collate_builds_ids_labels_and_the_same_mask(tokenizer):
    layout = small_layout(tokenizer)
    behaviour = [[11, 12, 13], [21]]
    batch = collate(layout, behaviour, pad_id=0)
    prefix = layout.prefix_ids.tolist()
    assert batch.input_ids.tolist() == [prefix + [11, 12, 13], prefix + [21, 0, 0]]
    ignore = [IGNORE_INDEX] * 7
    assert batch.labels.tolist() == [ignore + [11, 12, 13], ignore + [21, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.behaviour_lengths.tolist() == [3, 1]
    assert torch.equal(batch.allowed, torch.stack([GOLDEN_USER0, GOLDEN_USER1]))
    with pytest.raises(ValueError, match="at least one behaviour token"):
        collate(layout, [[5], []], pad_id=0)


def test_collate_reads_an_unscored_context_without_labels_or_weight(tokenizer):
    """``unscored``: the leading tokens are in the input and seen by what follows (the same mask), but carry no
    label and no weight."""
    layout = small_layout(tokenizer)
    behaviour = [[11, 12, 13], [21]]
    batch = collate(layout, behaviour, pad_id=0, behaviour_weights=[[2.0, 3.0, 4.0], [5.0]], unscored=[2, 0])
    plain = collate(layout, behaviour, pad_id=0)
    assert torch.equal(batch.input_ids, plain.input_ids) and torch.equal(batch.allowed, plain.allowed)
    ignore = [IGNORE_INDEX] * 7
    assert batch.labels.tolist() == [ignore + [IGNORE_INDEX, IGNORE_INDEX, 13], ignore + [21, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.weights.tolist() == [[0.0] * 7 + [0.0, 0.0, 4.0], [0.0] * 7 + [5.0, 0.0, 0.0]]


def test_additive_mask_is_zero_where_allowed_and_min_elsewhere(tokenizer):
    allowed = allowed_attention(small_layout(tokenizer), torch.tensor([3, 1]), 10)
    mask = additive_mask(allowed, torch.float32)
    assert mask.shape == (2, 1, 10, 10) and mask.dtype == torch.float32
    assert (mask[:, 0][allowed] == 0).all()
    assert (mask[:, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_mask_properties_on_the_default_template(tokenizer):
    defaults = default_values()
    layout = build_layout(tokenizer, list(defaults["uip_profiles"].values()), defaults["uip_behaviour_prefix"])
    lengths = torch.tensor([5, 1, 3])
    lp = layout.prefix_length
    total = lp + 5
    allowed = allowed_attention(layout, lengths, total)
    block = layout.block_of
    for b, n in enumerate(lengths.tolist()):
        real = lp + n
        a = allowed[b]
        # no softmax row is empty
        assert a.any(dim=1).all()
        # a soft token sees only its own block (its phrase and itself), never another profile or the bridge
        for p, pos in enumerate(layout.soft_positions.tolist()):
            expected = torch.zeros(total, dtype=torch.bool)
            expected[: pos + 1] = block[: pos + 1] == p
            assert torch.equal(a[pos], expected)
            assert expected.sum() == (block == p).sum()   # the whole phrase of p, all of it before S_p
        # behaviour positions see every earlier (or same) non-pad position, nothing later
        for i in range(lp, real):
            assert a[i, : i + 1].all() and not a[i, i + 1 :].any()
        # pad keys are never visible to real queries
        assert not a[:real, real:].any()
        # prefix rows are the same for every user
        assert torch.equal(a[:lp], allowed[0, :lp])


# ------------------------------------------------------------------------------ the model honours the mask
def forward(llm, layout, batch, soft, allowed=None, hidden=False):
    model = llm.model
    embeds = model.get_input_embeddings()(batch.input_ids)
    rows_ = torch.arange(batch.input_ids.shape[0])[:, None]
    embeds = embeds.index_put((rows_, layout.soft_positions[None, :]), soft)
    mask = additive_mask(batch.allowed if allowed is None else allowed, torch.float32)
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, output_hidden_states=hidden)
    return out


def behaviour_of(tokenizer):
    return [encode(tokenizer, " Star Night Love"), encode(tokenizer, " Love")]


def test_changing_phrase_one_leaves_block_two_unchanged_but_changes_behaviour(llm, tokenizer):
    layout_a = build_layout(tokenizer, ["Q:", "Z"], "!")
    layout_b = build_layout(tokenizer, ["W!", "Z"], "!")
    # same positions, different phrase-1 tokens, same everything else
    assert torch.equal(layout_a.block_of, layout_b.block_of)
    assert torch.equal(layout_a.soft_positions, layout_b.soft_positions)
    differs = (layout_a.prefix_ids != layout_b.prefix_ids).nonzero().flatten().tolist()
    assert differs and all(int(layout_a.block_of[i]) == 0 for i in differs)

    behaviour = behaviour_of(tokenizer)
    batch_a, batch_b = collate(layout_a, behaviour, 0), collate(layout_b, behaviour, 0)
    soft = torch.randn(2, 2, llm.hidden_size, generator=torch.Generator().manual_seed(0))
    out_a = forward(llm, layout_a, batch_a, soft, hidden=True)
    out_b = forward(llm, layout_b, batch_b, soft, hidden=True)

    block2 = (layout_a.block_of == 1).nonzero().flatten()        # phrase 2 and soft token 2
    assert block2.tolist() == [3, 4, 5]
    torch.testing.assert_close(out_a.logits[:, block2], out_b.logits[:, block2], rtol=0, atol=1e-6)
    for h_a, h_b in zip(out_a.hidden_states, out_b.hidden_states):
        torch.testing.assert_close(h_a[:, block2], h_b[:, block2], rtol=0, atol=1e-6)

    lp = layout_a.prefix_length
    for b, ids in enumerate(behaviour):
        positions = torch.arange(lp, lp + len(ids))
        change = (out_a.logits[b, positions] - out_b.logits[b, positions]).abs().amax(dim=-1)
        assert (change > 1e-3).all(), change

    # Control: under a plain causal mask the same change does reach block 2 (the test above can fail).
    causal = torch.ones(batch_a.allowed.shape[1:], dtype=torch.bool).tril()[None].expand(2, -1, -1)
    leak_a = forward(llm, layout_a, batch_a, soft, allowed=causal).logits[:, block2]
    leak_b = forward(llm, layout_b, batch_b, soft, allowed=causal).logits[:, block2]
    assert (leak_a - leak_b).abs().amax() > 1e-3


def test_soft_token_one_does_not_reach_block_two_but_reaches_behaviour(llm, tokenizer):
    layout = small_layout(tokenizer)
    batch = collate(layout, behaviour_of(tokenizer), 0)
    soft = torch.randn(2, 2, llm.hidden_size, generator=torch.Generator().manual_seed(1))
    moved = soft.clone()
    moved[:, 0] += 3.0
    a, b = forward(llm, layout, batch, soft).logits, forward(llm, layout, batch, moved).logits
    torch.testing.assert_close(a[:, 3:6], b[:, 3:6], rtol=0, atol=1e-6)
    assert (a[0, 7:10] - b[0, 7:10]).abs().amax() > 1e-3


def test_padding_is_invisible_to_real_positions(llm, tokenizer):
    layout = small_layout(tokenizer)
    behaviour = behaviour_of(tokenizer)
    soft = torch.randn(2, 2, llm.hidden_size, generator=torch.Generator().manual_seed(2))
    padded = forward(llm, layout, collate(layout, behaviour, 0), soft).logits
    alone = forward(llm, layout, collate(layout, behaviour[1:], 0), soft[1:]).logits
    real = layout.prefix_length + len(behaviour[1])
    assert padded.shape[1] > real                                  # user 1 really is padded in the batch
    torch.testing.assert_close(padded[1, :real], alone[0], rtol=0, atol=1e-5)
    # and the pad id itself does not matter
    other_pad = forward(llm, layout, collate(layout, behaviour, 7), soft).logits
    torch.testing.assert_close(padded[1, :real], other_pad[1, :real], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ behaviour NLL
def test_behaviour_nll_is_per_user_shifted_cross_entropy_of_behaviour_tokens(llm, tokenizer):
    layout = small_layout(tokenizer)
    behaviour = behaviour_of(tokenizer)
    batch = collate(layout, behaviour, 0)
    soft = torch.randn(2, 2, llm.hidden_size, generator=torch.Generator().manual_seed(3))
    nll = behaviour_nll(llm.model, layout, batch, soft)
    assert nll.shape == (2,)
    logits = forward(llm, layout, batch, soft).logits
    lp = layout.prefix_length
    for b, ids in enumerate(behaviour):
        # position t-1 predicts token t; the first behaviour token is predicted from the last prefix position
        expected = F.cross_entropy(logits[b, lp - 1 : lp - 1 + len(ids)], torch.tensor(ids))
        torch.testing.assert_close(nll[b], expected, rtol=1e-5, atol=1e-5)
    # the same user alone gives the same NLL (padding neither scored nor seen)
    alone = behaviour_nll(llm.model, layout, collate(layout, behaviour[1:], 0), soft[1:])
    torch.testing.assert_close(alone[0], nll[1], rtol=1e-5, atol=1e-5)


def test_behaviour_nll_gradient_reaches_only_the_soft_tokens(llm, tokenizer):
    layout = small_layout(tokenizer)
    batch = collate(layout, behaviour_of(tokenizer), 0)
    soft = torch.randn(2, 2, llm.hidden_size, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    nll = behaviour_nll(llm.model, layout, batch, soft)
    assert nll.shape == (2,) and nll.requires_grad
    nll.sum().backward()
    assert soft.grad is not None and soft.grad.shape == soft.shape
    assert (soft.grad.abs().sum(dim=-1) > 0).all()                 # every user, every profile gets gradient
    assert all(not p.requires_grad and p.grad is None for p in llm.model.parameters())
    # user 0's loss does not depend on user 1's soft tokens
    soft.grad = None
    behaviour_nll(llm.model, layout, batch, soft)[0].backward()
    assert soft.grad[1].abs().max() == 0 and soft.grad[0].abs().max() > 0
