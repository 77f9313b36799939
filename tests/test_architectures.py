"""Any causal LM: the prompt, its block mask and the item embeddings on tiny random Llama, Qwen2 and GPT-2 models
(built from configs, no download), a tokenizer that adds BOS, one with neither pad nor eos, and a model that
ignores the mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import GENRES, WORDS

CPU = torch.device("cpu")


def _tokenizer(folder: Path, bos: bool = False, specials: bool = True):
    """A small byte-level BPE; ``bos``: it starts every text with ``<s>``; ``specials=False``: no pad, no eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(WORDS + GENRES), "This user's hobbies and tastes: background (age, job, family): Movies this "
              "user rated, oldest first: rated 1 2 3 4 5 ; ( )"] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kwargs = {"pad_token": "<pad>", "eos_token": "<pad>"} if specials else {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        kwargs["bos_token"] = "<s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.save_pretrained(folder)
    return fast


def _model(folder: Path, architecture: str, bos: bool = False, specials: bool = True) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tokenizer(folder, bos, specials)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), tie_word_embeddings=True)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=512, **common))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=512, **common))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture,bos", [("llama", False), ("llama", True), ("qwen2", False), ("gpt2", False)])
def test_the_prompt_and_its_mask_on_every_architecture(architecture, bos, tmp_path):
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.prompt import SINK, additive_mask, build_layout, collate
    from recbole_uip.inference.soft_profiles import behaviour_nll
    from recbole_uip.inference.user_features import embed_items

    llm = load_frozen_llm(str(_model(tmp_path, architecture, bos)), CPU, "float32")     # the mask check passes
    tokenizer = llm.tokenizer
    layout = build_layout(tokenizer, ["This user's hobbies and tastes:", "This user's background (age, job, family):"],
                          " Movies this user rated, oldest first:")
    assert (layout.prefix_ids[0] == tokenizer.bos_token_id) == bos and (layout.block_of[0] == SINK) == bos
    behaviour = [tokenizer(" Star Night rated 4", add_special_tokens=False)["input_ids"]] * 2
    batch = collate(layout, behaviour, tokenizer.pad_token_id)
    if bos:
        assert batch.allowed[:, :, 0].all()                     # every position sees the BOS (attention sink)

    dim = llm.hidden_size
    soft = torch.randn(2, 2, dim, generator=torch.Generator().manual_seed(0)) * 0.5
    nll, _ = behaviour_nll(llm.model, layout, batch, soft)
    assert torch.isfinite(nll).all()
    moved = soft.clone()       # a random direction: LayerNorm (GPT-2) removes a shift along the all-ones vector
    moved[:, 0] += torch.randn(dim, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(behaviour_nll(llm.model, layout, batch, moved)[0], nll)   # the soft token reaches the text

    # profile isolation: moving profile 0's soft token changes nothing inside profile 1's block
    def hidden(tokens):
        embeds = llm.model.get_input_embeddings()(batch.input_ids).clone()
        embeds[:, layout.soft_positions] = tokens
        mask = additive_mask(batch.allowed, embeds.dtype)
        return llm.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    block_1 = layout.block_of == 1
    lp = layout.prefix_length
    assert torch.allclose(hidden(soft)[:, :lp][:, block_1], hidden(moved)[:, :lp][:, block_1], atol=1e-6)
    assert not torch.allclose(hidden(soft)[:, lp:], hidden(moved)[:, lp:])

    items = embed_items(llm, ["Star Night (Drama)", "Love City (Comedy)"])
    assert items.shape == (2, dim) and torch.isfinite(items).all()


def test_a_tokenizer_without_pad_or_eos_token_loads_and_pads(tmp_path):
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.prompt import build_layout, collate

    llm = load_frozen_llm(str(_model(tmp_path, "gpt2", specials=False)), CPU, "float32")
    assert llm.tokenizer.pad_token_id is not None
    layout = build_layout(llm.tokenizer, ["Hobbies:"], " Movies:")
    batch = collate(layout, [[5, 6, 7], [8]], llm.tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, layout.prefix_length + 3)


def test_a_model_that_ignores_the_mask_is_refused(tmp_path):
    from recbole_uip.inference.llm import LLMLoadError, check_mask_honoured, load_frozen_llm

    llm = load_frozen_llm(str(_model(tmp_path, "llama")), CPU, "float32")

    class IgnoresMask(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.config = model, model.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, attention_mask=None, **kwargs):
            return self.inner(**kwargs)

    with pytest.raises(LLMLoadError, match="ignores a 4D attention mask"):
        check_mask_honoured(IgnoresMask(llm.model), "tiny")
