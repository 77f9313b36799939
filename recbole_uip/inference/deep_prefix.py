"""Deep prompts: a user's trainable keys and values at every layer of the frozen LLM, read before the prompt.

The paper's soft token is one input embedding per profile: everything it tells the LLM passes through the first
layer. A deep prompt (P-Tuning v2, Liu et al., 2022; prefix tuning, Li and Liang, 2021) gives each layer ``m``
trainable key/value pairs that every position of the prompt attends to, the usual remedy where shallow prompts
are too weak, above all for small models. It is a departure from the paper, offered to the token probe
(``benchmarks/token_probe.py --fit_prefix=deep``, ``--encoder_prefix=deep``) to ask whether the soft token's
capacity is what stops a user's profile from carrying to their unseen items; the pipeline's bank does not use it
(measured: docs/experiment_log.md, "Deep prompts").

Shapes: a prefix is ``(B, N, 2, H, m, d)``: ``N`` layers, keys then values, ``H`` key/value heads, ``m`` entries,
``d`` the head size. Trainable prefixes are float32; they are cast to the LLM's dtype where they enter it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from recbole_uip.inference.prompt import PromptLayout, additive_mask, collate


def _cache_keyword(llm_model: nn.Module) -> str:
    """The name under which the model's forward takes a key/value cache (transformers renamed it in 5.x)."""
    parameters = inspect.signature(llm_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def prefix_inputs(llm_model: nn.Module, prefix: torch.Tensor, mask: torch.Tensor) -> dict:
    """Keyword arguments for the LLM's forward that put ``prefix`` ``(B, N, 2, H, m, d)`` before the prompt.

    ``mask`` is the prompt's additive mask ``(B, 1, L, L)``; every position of the prompt also sees the ``m``
    prefix entries (``(B, 1, L, m + L)``). The prompt's positions start at ``m`` (the cache's length): rotary
    embeddings depend on relative positions only, so within the prompt nothing moves."""
    dtype = mask.dtype
    cache = DynamicCache()
    prefix = prefix.to(mask.device, dtype)
    for layer in range(prefix.shape[1]):
        cache.update(prefix[:, layer, 0], prefix[:, layer, 1], layer)
    seen = torch.zeros(*mask.shape[:-1], prefix.shape[-2], dtype=dtype, device=mask.device)
    return {_cache_keyword(llm_model): cache, "attention_mask": torch.cat([seen, mask], dim=-1)}


@torch.no_grad()
def soft_token_keys_values(llm_model: nn.Module, layout: PromptLayout, soft_tokens: torch.Tensor,
                           pad_id: int) -> torch.Tensor:
    """The keys and values ``(N, 2, H, P, d)`` float32 that the soft tokens ``(P, D)`` produce at every layer at
    their own positions of the template (one forward pass of the template alone): where a deep prompt's keys
    start, and the scale of its steps."""
    embedding = llm_model.get_input_embeddings()
    dtype = embedding.weight.dtype
    batch = collate(layout, [[pad_id]], pad_id)           # one behaviour token: causal, so it changes nothing here
    embeds = embedding(batch.input_ids.to(embedding.weight.device))
    embeds[0, layout.soft_positions] = soft_tokens.to(embeds.device, dtype)
    mask = additive_mask(batch.allowed, dtype).to(embeds.device)
    cache = DynamicCache()
    llm_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **{_cache_keyword(llm_model): cache})
    positions = layout.soft_positions.to(embeds.device)
    return torch.stack([torch.stack([layer.keys[0][:, positions], layer.values[0][:, positions]])
                        for layer in cache.layers]).float().cpu()


def prefix_step_scale(prefix: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 1, 1, 1)``: the root mean square of the keys (and of the values) of each layer of ``prefix``
    ``(N, 2, H, m, d)``, the scale of a step in that layer (keys and values differ in size from layer to layer, so
    one absolute step would be too small for some and too large for others)."""
    return prefix.pow(2).mean(dim=(-3, -2, -1), keepdim=True).sqrt().clamp(min=1e-6)
