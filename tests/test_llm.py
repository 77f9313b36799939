"""The frozen LLM: loading, freezing, load errors, dtype choice; the trainer trains the soft tokens only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import uip_config_dict, write_dataset
from recbole_uip.inference import llm as llm_module
from recbole_uip.inference.llm import LLMLoadError, assert_frozen, load_frozen_llm, model_identity, resolve_dtype

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


# ------------------------------------------------------------------------------------------------ trainer
@pytest.fixture
def trainer_parts(tmp_path, tiny_llm_dir):
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import build_behaviour_corpus
    from recbole_uip.quick_start import build_config

    write_dataset(tmp_path / "data", n_users=10, n_items=12, per_user=6)
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_epochs=1, uip_batch_size=4))
    settings = UIPSettings.from_config(config)
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "float32")
    logger = logging.getLogger("test_llm")
    corpus = build_behaviour_corpus(config, settings, llm.tokenizer, logger)
    return config, settings, llm, corpus, logger


def test_fit_trains_only_the_soft_tokens_and_leaves_the_llm_bit_identical(trainer_parts):
    from recbole_uip.inference.trainer import ProfileInferenceTrainer

    config, settings, llm, corpus, logger = trainer_parts
    assert len(corpus) == 10
    before = {k: v.clone() for k, v in llm.model.state_dict().items()}
    trainer = ProfileInferenceTrainer(config, settings, llm, corpus, logger)
    rounds = []
    trainer.epoch_end_hooks.append(lambda t, epoch, record: rounds.append((t is trainer, epoch, record["round"])))
    result = trainer.fit()

    params = trainer.trainable_parameters()
    assert len(params) == 3
    assert params[0] is trainer.soft.shared and params[1] is trainer.soft.encoder and params[2] is trainer.soft.residual
    assert {id(p) for p in trainer.soft.parameters()} == {id(p) for p in params}

    after = llm.model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(not p.requires_grad and p.grad is None for p in llm.model.parameters())

    # the soft tokens did train
    assert trainer.soft.residual.detach().abs().sum() > 0
    assert trainer.soft.shared.detach().abs().sum() > 0
    assert rounds == [(True, 1, 1)]

    num_profiles, dim = len(settings.profiles), llm.hidden_size
    assert result.users == corpus.users
    assert result.codes.shape == (10, num_profiles) and result.codes.dtype == np.int64
    assert ((result.codes >= 0) & (result.codes < 3)).all()
    assert result.offsets.shape == (10, num_profiles, dim)
    assert result.summaries.shape == (10, dim)
    assert [c.shape for c in result.codebooks] == [(3, dim)] * num_profiles
    assert [r["round"] for r in result.history] == [0, 1]
    np.testing.assert_allclose(result.offsets, trainer.soft.offsets().detach().numpy())


def test_trainable_parameters_refuses_an_unfrozen_llm(trainer_parts):
    from recbole_uip.inference.trainer import ProfileInferenceTrainer

    config, settings, llm, corpus, logger = trainer_parts
    next(iter(llm.model.parameters())).requires_grad_(True)
    with pytest.raises(AssertionError, match="must stay frozen"):
        ProfileInferenceTrainer(config, settings, llm, corpus, logger).fit()


# --------------------------------------------------------------------------------------- longer summaries
def test_summary_reads_a_longer_stretch_of_the_same_training_history(tmp_path, tiny_llm_dir):
    """``uip_summary_max_tokens`` lengthens only what the forward-only summary reads: the M-step text is the
    same, the summary text ends with it and starts with older training items, within its budget."""
    import torch

    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import build_behaviour_corpus
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.quick_start import build_config

    write_dataset(tmp_path / "data", n_users=10, n_items=30, per_user=20)
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "float32")
    logger = logging.getLogger("test_llm")
    corpora, settings_of = {}, {}
    for budget in (0, 300):
        config = build_config("DeepFM", "toy", None, uip_config_dict(
            tmp_path, tiny_llm_dir, uip_max_behaviour_tokens=40, uip_summary_max_tokens=budget))
        settings_of[budget] = UIPSettings.from_config(config)
        corpora[budget] = build_behaviour_corpus(config, settings_of[budget], llm.tokenizer, logger)
    short, long = corpora[0], corpora[300]
    assert short.summary_token_ids == short.token_ids                       # legacy: the behaviour text itself
    assert long.users == short.users and long.token_ids == short.token_ids  # the M-step text is unchanged
    longer = 0
    for behaviour, summary in zip(long.token_ids, long.summary_token_ids):
        assert len(summary) <= 300 and summary[len(summary) - len(behaviour):] == behaviour
        longer += len(summary) > len(behaviour) + 40
    assert longer == len(long)                                               # every toy user has older items

    # The fingerprint changes with the longer summary, and stays as before the key existed when it is off.
    assert "summary_max_tokens" not in settings_of[0].fingerprint_dict()
    assert settings_of[300].fingerprint_dict()["summary_max_tokens"] == 300

    # The summary pass reads those tokens: batched by a token budget, it equals one user at a time.
    config = build_config("DeepFM", "toy", None, uip_config_dict(
        tmp_path, tiny_llm_dir, uip_max_behaviour_tokens=40, uip_summary_max_tokens=300))
    trainer = ProfileInferenceTrainer(config, settings_of[300], llm, long, logger)
    batched = trainer.summarise(batch_size=32, max_batch_tokens=700)
    single = trainer.summarise(batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    legacy = ProfileInferenceTrainer(config, settings_of[0], llm, short, logger).summarise()
    assert not torch.allclose(legacy, single, atol=1e-3)


def test_negative_summary_budget_is_refused(tmp_path, tiny_llm_dir):
    from recbole_uip.config import UIPConfigError, UIPSettings
    from recbole_uip.quick_start import build_config

    write_dataset(tmp_path / "data")
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_summary_max_tokens=-1))
    with pytest.raises(UIPConfigError, match="uip_summary_max_tokens"):
        UIPSettings.from_config(config)


# ---------------------------------------------------------------------------------- rating-weighted NLL
def test_rating_weight_marks_exactly_the_rating_tokens_and_weighs_them_in_the_m_step(tmp_path, tiny_llm_dir):
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import build_behaviour_corpus
    from recbole_uip.inference.prompt import collate
    from recbole_uip.inference.soft_profiles import behaviour_nll
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.quick_start import build_config

    write_dataset(tmp_path / "data", n_users=8, n_items=12, per_user=6)
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "float32")
    logger = logging.getLogger("test_llm")
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_rating_weight=5.0,
                                                                   uip_epochs=1, uip_batch_size=4))
    settings = UIPSettings.from_config(config)
    assert settings.fingerprint_dict()["rating_weight"] == 5.0
    corpus = build_behaviour_corpus(config, settings, llm.tokenizer, logger)
    plain_settings = UIPSettings.from_config(build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir)))
    assert "rating_weight" not in plain_settings.fingerprint_dict()
    plain = build_behaviour_corpus(config, plain_settings, llm.tokenizer, logger)
    assert plain.rating_mask is None and plain.token_ids == corpus.token_ids   # same text either way

    for ids, mask, text in zip(corpus.token_ids, corpus.rating_mask, corpus.texts):
        assert len(mask) == len(ids)
        # the marked tokens decode to the rating part of every item: " rated <r>", once per item
        marked = llm.tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert marked.replace(" ", "") == "".join(f"rated{r}" for r in __import__("re").findall(r" rated (\d)", text))
        assert not all(mask) and any(mask)

    # weights all 1 give the plain NLL; rating weight 5 moves the objective, not the plain NLL
    layout_trainer = ProfileInferenceTrainer(config, settings, llm, corpus, logger)
    users = list(range(4))
    ids = [corpus.token_ids[u] for u in users]
    soft = torch.randn(4, 2, llm.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    ones = collate(layout_trainer.layout, ids, 0, [[1.0] * len(i) for i in ids])
    p1, w1 = behaviour_nll(llm.model, layout_trainer.layout, ones, soft, weighted=True)
    torch.testing.assert_close(p1, w1)
    torch.testing.assert_close(p1, behaviour_nll(llm.model, layout_trainer.layout, collate(layout_trainer.layout, ids, 0), soft))
    heavy = collate(layout_trainer.layout, ids, 0, [layout_trainer.token_weights(u) for u in users])
    p5, w5 = behaviour_nll(llm.model, layout_trainer.layout, heavy, soft, weighted=True)
    torch.testing.assert_close(p5, p1)
    assert not torch.allclose(w5, p1)
    result = layout_trainer.fit()
    assert result.codes.shape == (8, 2)


def test_rating_weight_without_ratings_is_refused_clearly(tmp_path, tiny_llm_dir):
    from recbole_uip.config import UIPConfigError, UIPSettings
    from recbole_uip.quick_start import build_config

    write_dataset(tmp_path / "data")
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_rating_weight=3.0,
                                                                   uip_rating_template=""))
    with pytest.raises(UIPConfigError, match="uip_rating_template"):
        UIPSettings.from_config(config)
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_rating_weight=0))
    with pytest.raises(UIPConfigError, match="uip_rating_weight"):
        UIPSettings.from_config(config)
