"""The frozen LLM: loading, freezing, load errors, dtype choice, the numerics in the fingerprint."""

from __future__ import annotations

import pytest
import torch

from recbole_uip.inference import llm as llm_module
from recbole_uip.inference.llm import (LLMLoadError, assert_frozen, load_frozen_llm, model_identity, resolve_dtype,
                                     runtime_numerics)

CPU = torch.device("cpu")


def test_load_frozen_llm_freezes_every_parameter(tiny_llm_dir):
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "float32")
    params = list(llm.model.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert not llm.model.training                               # eval mode: no dropout
    assert llm.dtype == torch.float32 and llm.device == CPU
    assert llm.hidden_size == 32
    assert llm.tokenizer.pad_token_id is not None
    assert llm.name == str(tiny_llm_dir)
    assert llm.identity == model_identity(tiny_llm_dir)
    assert_frozen(llm.model)                                    # does not raise


def test_load_frozen_llm_honours_the_dtype(tiny_llm_dir):
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "bfloat16")
    assert llm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in llm.model.parameters())


def test_assert_frozen_names_an_unfrozen_parameter(tiny_llm_dir):
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "float32")
    name, param = next(iter(llm.model.named_parameters()))
    param.requires_grad_(True)
    with pytest.raises(AssertionError, match="must stay frozen") as info:
        assert_frozen(llm.model)
    assert name in str(info.value)


def test_missing_folder_raises_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(LLMLoadError) as info:
        load_frozen_llm(str(missing), CPU, "float32")
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message and "uip_llm" in message


def test_folder_without_config_raises_a_clear_error(tmp_path):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(LLMLoadError, match="has no config.json"):
        load_frozen_llm(str(tmp_path / "empty_model"), CPU, "float32")


@pytest.mark.parametrize("name", ["not a model name", "no-such-org-xyz/no-such-model-xyz"])
def test_bogus_model_name_raises_llm_load_error(name, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # fail fast, no network retries
    with pytest.raises(LLMLoadError) as info:
        load_frozen_llm(name, CPU, "float32")
    message = str(info.value)
    assert f"Cannot load the causal LM '{name}'" in message
    assert "uip_llm takes a Hugging Face model id" in message


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", CPU) in (torch.bfloat16, torch.float32)
    monkeypatch.setattr(llm_module, "_cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(llm_module, "_cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("float16", CPU) == torch.float16
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("float32", CPU) == torch.float32


def test_runtime_numerics_name_what_decides_the_rounding(monkeypatch):
    """The fingerprint's numerics: the resolved dtype (auto follows the CPU), and the thread count on CPU only."""
    monkeypatch.setattr(llm_module, "_cpu_has_native_bf16", lambda: True)
    assert runtime_numerics("auto", CPU, 3) == {"torch": torch.__version__, "device": "cpu", "dtype": "bfloat16",
                                                "threads": 3}
    monkeypatch.setattr(llm_module, "_cpu_has_native_bf16", lambda: False)
    assert runtime_numerics("auto", CPU, 0)["dtype"] == "float32"
    assert runtime_numerics("auto", CPU, 0)["threads"] == torch.get_num_threads()  # 0: the count that will run
    on_gpu = runtime_numerics("float16", torch.device("cuda"), 4)
    assert on_gpu["device"] == "cuda" and on_gpu["dtype"] == "float16" and on_gpu["threads"] is None
