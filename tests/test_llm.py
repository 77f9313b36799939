"""The frozen LLM: loading, freezing, load errors, dtype choice; the trainer trains the soft tokens only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import uip_config_dict, write_dataset
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


# ---------------------------------------------------------------------------------- quantiser metrics
@pytest.mark.parametrize("metric", ["whitened", "fisher"])
def test_quantiser_metric_assigns_in_the_projected_metric_and_reaches_the_bank(metric, tmp_path, tiny_llm_dir):
    """``uip_quantiser_metric``: the E-step's IDs are the nearest codes after the stored projection, the bank
    keeps the projection (so a new offset can be assigned), and the keys enter the fingerprint only when on."""
    import dataclasses

    from recbole_uip.bank import FeatureBank
    from recbole_uip.config import UIPConfigError, UIPSettings
    from recbole_uip.data.behaviour import build_behaviour_corpus
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.quick_start import build_config, infer_profiles

    write_dataset(tmp_path / "data", n_users=12, n_items=12, per_user=6)
    config = build_config("DeepFM", "toy", None, uip_config_dict(
        tmp_path, tiny_llm_dir, uip_epochs=1, uip_batch_size=4, uip_quantiser_metric=metric, uip_quantiser_components=4))
    settings = UIPSettings.from_config(config)
    assert settings.fingerprint_dict()["quantiser_metric"] == metric
    assert settings.fingerprint_dict()["quantiser_components"] == 4
    plain = dataclasses.replace(settings, quantiser_metric="euclidean").fingerprint_dict()
    assert "quantiser_metric" not in plain and "quantiser_components" not in plain
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "float32")
    logger = logging.getLogger("test_llm")
    corpus = build_behaviour_corpus(config, settings, llm.tokenizer, logger)
    result = ProfileInferenceTrainer(config, settings, llm, corpus, logger).fit()
    assert [p.shape for p in result.projections] == [(llm.hidden_size, 4)] * len(settings.profiles)
    for p, (codebook, projection) in enumerate(zip(result.codebooks, result.projections)):
        distances = np.linalg.norm((result.offsets[:, p, None, :] - codebook[None]) @ projection, axis=-1)  # (U, K)
        np.testing.assert_array_equal(result.codes[:, p], distances.argmin(1))
    shares = [record[name].get("projection_share") for record in result.history for name in settings.profiles]
    if metric == "whitened":
        assert all(0 < share <= 1 for share in shares)
    else:   # no gradient before the first M-step: the first E-step measures plain distances
        assert shares[:2] == [None, None] and all(0 < share <= 1 for share in shares[2:])

    bank = FeatureBank.load(infer_profiles(config, settings) / "bank")
    assert bank.projections is not None and len(bank.projections) == len(settings.profiles)
    for key, value in (("uip_quantiser_components", -1), ("uip_quantiser_components", 2.5),
                       ("uip_quantiser_metric", "cosine")):
        with pytest.raises(UIPConfigError, match=key):
            UIPSettings.from_config(build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, **{key: value})))


def test_diagnostics_report_the_plain_and_the_rating_weighted_nll_of_each_variant(trainer_parts):
    """diagnose(): per user, the plain NLL and the M-step's rating-weighted objective for own / shuffled / mean /
    code tokens, from one pass each; the own-token values equal a direct computation."""
    from recbole_uip.inference.prompt import collate
    from recbole_uip.inference.soft_profiles import behaviour_nll
    from recbole_uip.inference.trainer import ProfileInferenceTrainer

    config, settings, llm, corpus, logger = trainer_parts
    assert corpus.rating_mask is not None                     # the default rating weight marks rating tokens
    trainer = ProfileInferenceTrainer(config, settings, llm, corpus, logger)
    trainer.fit()
    nll = trainer.diagnose()
    modes = ("current", "shuffled", "mean", "code")
    assert set(nll) == {f"nll_{m}" for m in modes} | {f"nll_weighted_{m}" for m in modes}
    assert all(v.shape == (len(corpus),) and np.isfinite(v).all() for v in nll.values())
    assert not np.allclose(nll["nll_current"], nll["nll_weighted_current"])
    assert not np.allclose(nll["nll_current"], nll["nll_shuffled"])
    u = 3
    batch = collate(trainer.layout, [corpus.token_ids[u]], llm.tokenizer.pad_token_id, [trainer.token_weights(u)])
    with torch.no_grad():
        plain, weighted = behaviour_nll(llm.model, trainer.layout, batch, trainer.soft(torch.tensor([u])), weighted=True)
    assert nll["nll_current"][u] == pytest.approx(float(plain[0]), rel=1e-4)
    assert nll["nll_weighted_current"][u] == pytest.approx(float(weighted[0]), rel=1e-4)


def test_fisher_metric_accumulates_each_users_own_likelihood_gradient(trainer_parts):
    """The Fisher sums of an M-step batch equal sum_u g_u g_u^T with g_u the gradient of user u's own objective
    with respect to its soft tokens, computed one user at a time (commitment term excluded)."""
    import dataclasses

    from recbole_uip.inference.prompt import collate
    from recbole_uip.inference.soft_profiles import behaviour_nll
    from recbole_uip.inference.trainer import ProfileInferenceTrainer

    config, settings, llm, corpus, logger = trainer_parts
    settings = dataclasses.replace(settings, quantiser_metric="fisher", quantiser_components=0)
    trainer = ProfileInferenceTrainer(config, settings, llm, corpus, logger)
    trainer.fit()                                          # builds the soft tokens and a first codebook
    users = torch.tensor([0, 3, 5])
    expected = torch.zeros(len(settings.profiles), llm.hidden_size, llm.hidden_size, dtype=torch.float64)
    for u in users.tolist():
        tokens = trainer.soft(torch.tensor([u])).detach().requires_grad_(True)
        weights = None if corpus.rating_mask is None else [trainer.token_weights(u)]  # the M-step's own objective
        batch = collate(trainer.layout, [corpus.token_ids[u]], llm.tokenizer.pad_token_id, weights)
        _, objective = behaviour_nll(llm.model, trainer.layout, batch, tokens, weighted=True)
        (grad,) = torch.autograd.grad(objective.sum(), tokens)
        g = grad[0].double()                               # (P, D)
        expected += torch.einsum("pd,pe->pde", g, g)
    trainer.fisher_sums = torch.zeros_like(expected)
    encoder_opt, residual_opt = trainer.build_optimisers()
    trainer.train_batch(users, [1.0] * len(settings.profiles), encoder_opt, residual_opt)
    torch.testing.assert_close(trainer.fisher_sums, expected, rtol=1e-3, atol=1e-9)
    # the projection of the full Fisher matrix reproduces its quadratic form
    codebook = trainer.codebooks[0]
    codebook.set_fisher(expected[0])
    v = torch.randn(llm.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(((v.float() @ codebook.projection) ** 2).sum()) == pytest.approx(float(v @ expected[0] @ v), rel=1e-3)


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
    plain_settings = UIPSettings.from_config(build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir,
                                                                                         uip_rating_weight=1.0)))
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


def test_rating_weight_without_rating_tokens_has_no_effect_and_says_so(tmp_path, tiny_llm_dir, caplog):
    """The default weight (10) must not break datasets whose text writes no ratings: it is logged and ignored."""
    from recbole_uip.config import UIPConfigError, UIPSettings
    from recbole_uip.data.behaviour import build_behaviour_corpus
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.quick_start import build_config

    write_dataset(tmp_path / "data", n_users=8, n_items=12, per_user=6)
    llm = load_frozen_llm(str(tiny_llm_dir), CPU, "float32")
    logger = logging.getLogger("test_llm")
    no_template = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_rating_weight=3.0,
                                                                        uip_rating_template=""))
    no_rating_field = build_config("DeepFM", "toy", None, uip_config_dict(
        tmp_path, tiny_llm_dir, uip_rating_weight=3.0,
        load_col={"inter": ["user_id", "item_id", "timestamp"], "user": ["user_id", "age", "gender"],
                  "item": ["item_id", "class"]}, threshold=None))
    for config, reason in ((no_template, "uip_rating_template' is empty"), (no_rating_field, "no rating field")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test_llm"):
            corpus = build_behaviour_corpus(config, UIPSettings.from_config(config), llm.tokenizer, logger)
        assert corpus.rating_mask is None and " rated " not in corpus.texts[0]
        assert "has no effect" in caplog.text and reason in caplog.text
        trainer = ProfileInferenceTrainer(config, UIPSettings.from_config(config), llm, corpus, logger)
        assert trainer.fit().codes.shape == (8, 2)           # every token weighs 1: the plain NLL
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_rating_weight=0))
    with pytest.raises(UIPConfigError, match="uip_rating_weight"):
        UIPSettings.from_config(config)
