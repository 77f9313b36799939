"""End to end on the toy dataset with the tiny LLM: files, reuse, leakage, determinism, stock RecBole."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import uip_config_dict, write_dataset
from recbole_uip.bank import FeatureBank
from recbole_uip.quick_start import build_config, infer_profiles, run_recbole_uip


def _infer(tmp_path, tiny_llm_dir, model="DeepFM", **overrides) -> Path:
    from recbole.utils import init_logger

    config = build_config(model, "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, **overrides))
    init_logger(config)
    return infer_profiles(config)


def _user_columns(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()
    header = [c.split(":")[0] for c in lines[0].split("\t")]
    rows = [line.split("\t") for line in lines[1:]]
    return {name: [row[i] for row in rows] for i, name in enumerate(header)}


def test_run_with_profiles_trains_deepfm_on_augmented_files(tmp_path, tiny_llm_dir):
    write_dataset(tmp_path / "data")
    result = run_recbole_uip("DeepFM", "toy", config_dict=uip_config_dict(tmp_path, tiny_llm_dir, uip=True))
    target = Path(result["uip_dataset"])
    assert target == tmp_path / "out" / "toy-uip"
    assert result["uip_fields"] == ["uip_hobby", "uip_background"]
    assert 0.0 <= result["test_result"]["auc"] <= 1.0
    assert sorted(p.name for p in target.iterdir()) == [
        "bank", "toy-uip.inter", "toy-uip.item", "toy-uip.user", "uip_manifest.json"]
    # every original byte of .inter/.item is kept
    for suffix in ("inter", "item"):
        assert (target / f"toy-uip.{suffix}").read_bytes() == (tmp_path / "data" / "toy" / f"toy.{suffix}").read_bytes()
    columns = _user_columns(target / "toy-uip.user")
    original = _user_columns(tmp_path / "data" / "toy" / "toy.user")
    for field, values in original.items():
        assert columns[field] == values
    bank = FeatureBank.load(target / "bank")
    for user, hobby in zip(columns["user_id"], columns["uip_hobby"]):
        assert hobby == bank.token(user, "hobby")
        assert 0 <= int(hobby) < 3


def test_uip_false_is_the_plain_baseline(tmp_path, tiny_llm_dir):
    write_dataset(tmp_path / "data")
    result = run_recbole_uip("DeepFM", "toy", config_dict=uip_config_dict(tmp_path, tiny_llm_dir, uip=False))
    assert result["uip_dataset"] is None and result["uip_fields"] == []
    assert result["dataset"] == "toy"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, overrides", [("DeepFM", {}), ("SASRec", {}),
                                             ("DeepFM", {"uip_line_search_criterion": "ctr"})])
def test_changing_only_valid_and_test_interactions_leaves_every_id_unchanged(model, overrides, tmp_path, tiny_llm_dir):
    """The leakage guard: profiles see the training split only (DeepFM: random 8:1:1 split; SASRec: RecBole's
    leave-one-out split, where each user's last two interactions are valid/test). With the CTR criterion the encoder's
    step is chosen on labels: those of training interactions only."""
    from recbole.utils import init_logger

    from recbole_uip.data.behaviour import build_training_split

    folder = write_dataset(tmp_path / "data")
    first = FeatureBank.load(_infer(tmp_path, tiny_llm_dir, model, **overrides) / "bank")
    if overrides:
        assert all("ctr_auc" in h["line_search"] for h in first.metadata["history"] if "line_search" in h)
        assert any("line_search" in h for h in first.metadata["history"])

    # Find the rows RecBole puts in valid/test, with the same config and seed.
    config = build_config(model, "toy", None, uip_config_dict(tmp_path, tiny_llm_dir))
    init_logger(config)
    dataset, train = build_training_split(config)
    uid, iid = dataset.uid_field, dataset.iid_field
    train_pairs = set(zip(dataset.id2token(uid, train.inter_feat[uid].numpy()),
                          dataset.id2token(iid, train.inter_feat[iid].numpy())))
    inter = folder / "toy.inter"
    lines = inter.read_text().splitlines()
    changed = 0
    for n, line in enumerate(lines[1:], start=1):
        user, item, rating, timestamp = line.split("\t")
        if (user, item) not in train_pairs:
            # another item, another rating, another time: everything a valid/test row can carry
            lines[n] = "\t".join([user, str(int(item) % 30 + 1), "1" if rating != "1" else "5", str(int(float(timestamp)) + 7)])
            changed += 1
    assert changed > 0
    inter.write_text("\n".join(lines) + "\n")

    second_target = _infer(tmp_path, tiny_llm_dir, model, **overrides)  # the fingerprint changed: really recomputes
    second = FeatureBank.load(second_target / "bank")
    assert second.fingerprint != first.fingerprint
    assert second.users == first.users
    np.testing.assert_array_equal(second.codes, first.codes)
    np.testing.assert_array_equal(second.codebooks[0], first.codebooks[0])


def test_same_seed_same_ids_and_other_seed_other_run(tmp_path, tiny_llm_dir):
    write_dataset(tmp_path / "data")
    a = FeatureBank.load(_infer(tmp_path, tiny_llm_dir, uip_output_dir=str(tmp_path / "a")) / "bank")
    b = FeatureBank.load(_infer(tmp_path, tiny_llm_dir, uip_output_dir=str(tmp_path / "b")) / "bank")
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    c = FeatureBank.load(_infer(tmp_path, tiny_llm_dir, uip_output_dir=str(tmp_path / "c"), seed=7) / "bank")
    assert not np.array_equal(a.offsets, c.offsets)


def test_bank_is_reused_for_same_inputs_and_recomputed_on_any_change(tmp_path, tiny_llm_dir):
    folder = write_dataset(tmp_path / "data")
    target = _infer(tmp_path, tiny_llm_dir)
    stamp = (target / "bank" / "bank.json").stat().st_mtime_ns
    fingerprint = json.loads((target / "uip_manifest.json").read_text())["fingerprint"]

    assert _infer(tmp_path, tiny_llm_dir) == target
    assert (target / "bank" / "bank.json").stat().st_mtime_ns == stamp  # reused, not rewritten

    def fingerprint_after(**overrides):
        _infer(tmp_path, tiny_llm_dir, **overrides)
        return json.loads((target / "uip_manifest.json").read_text())["fingerprint"]

    seen = {fingerprint}
    more_threads = {"uip_num_threads": torch.get_num_threads() + 1}  # the rounding of the run changes
    for overrides in ({"uip_codebook_size": 4}, {"seed": 11}, more_threads, {"uip_item_batch_size": 7}, {"eval_args": {"split": {"RS": [0.7, 0.2, 0.1]},
                      "order": "RO", "group_by": None, "mode": "labeled"}}):
        new = fingerprint_after(**overrides)
        assert new not in seen, overrides
        seen.add(new)
    with open(folder / "toy.item", "a") as f:
        f.write("31\tNew Film\tDrama\n")
    assert fingerprint_after() not in seen
    assert _infer(tmp_path, tiny_llm_dir, uip_reuse=False) == target
    numerics = FeatureBank.load(target / "bank").metadata["inputs"]["numerics"]
    assert numerics == {"torch": torch.__version__, "device": "cpu", "dtype": "float32",
                        "threads": torch.get_num_threads(), "ranks": 1, "item_batch_size": 64}


def test_switching_splits_back_reuses_the_stored_bank_without_the_llm(tmp_path, tiny_llm_dir, monkeypatch):
    """<dataset>-uip/ holds one split's profiles; the bank store keeps the others, so a DeepFM run after a SASRec
    run (another split) rewrites the files from the stored bank instead of inferring again."""
    from recbole_uip.inference.trainer import ProfileInferenceTrainer

    write_dataset(tmp_path / "data")
    target = _infer(tmp_path, tiny_llm_dir)                           # DeepFM: random split
    ctr = FeatureBank.load(target / "bank")
    assert _infer(tmp_path, tiny_llm_dir, "SASRec") == target         # leave-one-out split replaces the folder
    loo = FeatureBank.load(target / "bank")
    assert loo.fingerprint != ctr.fingerprint

    def no_inference(self):
        raise AssertionError("the LLM ran although the bank was stored")

    monkeypatch.setattr(ProfileInferenceTrainer, "fit", no_inference)
    _infer(tmp_path, tiny_llm_dir)
    back = FeatureBank.load(target / "bank")
    assert back.fingerprint == ctr.fingerprint
    np.testing.assert_array_equal(back.codes, ctr.codes)
    assert json.loads((target / "uip_manifest.json").read_text())["fingerprint"] == ctr.fingerprint
    with pytest.raises(AssertionError, match="the LLM ran"):         # a new setting still infers
        _infer(tmp_path, tiny_llm_dir, uip_codebook_size=4)


STOCK_RECBOLE = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings("ignore")
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.context_aware_recommender import DeepFM
    from recbole.utils import init_seed
    assert "recbole_uip" not in sys.modules
    sys.argv = sys.argv[:1]
    config = Config(model="DeepFM", dataset="toy-uip", config_dict={
        "data_path": sys.argv_data, "use_gpu": False, "threshold": {"rating": 4}, "show_progress": False,
        "checkpoint_dir": sys.argv_ckpt, "state": "ERROR",
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                     "user": ["user_id", "age", "gender", "uip_hobby", "uip_background"]}})
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = DeepFM(config, train._dataset)
    assert "recbole_uip" not in sys.modules
    print(sorted(model.token_field_names[0] + model.token_field_names[1] if isinstance(model.token_field_names[0], list) else model.token_field_names))
""")


def test_written_files_load_in_stock_recbole_and_deepfm_embeds_the_profiles(tmp_path, tiny_llm_dir):
    write_dataset(tmp_path / "data")
    target = _infer(tmp_path, tiny_llm_dir)
    script = STOCK_RECBOLE.replace("sys.argv_data", repr(str(target.parent))).replace("sys.argv_ckpt", repr(str(tmp_path / "ck")))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fields = out.stdout.strip().splitlines()[-1]
    assert "'uip_hobby'" in fields and "'uip_background'" in fields


def test_recbole_dataset_cache_never_serves_a_stale_user_file(tmp_path, tiny_llm_dir):
    """RecBole reuses <checkpoint_dir>/<dataset>-Dataset.pth whenever the config matches, without looking at the
    files. A cache saved from an earlier bank must not leak into a run on a newer bank."""
    from recbole.data import create_dataset
    from recbole.utils import init_logger

    from recbole_uip.config import UIPSettings
    from recbole_uip.quick_start import augmented_config

    write_dataset(tmp_path / "data")

    def dataset_for(**overrides):
        config_dict = uip_config_dict(tmp_path, tiny_llm_dir, uip=True, **overrides)
        config = build_config("DeepFM", "toy", None, config_dict)
        init_logger(config)
        target = infer_profiles(config)
        run_config = augmented_config(config, UIPSettings.from_config(config), target, None, config_dict)
        assert not run_config["save_dataset"]
        return create_dataset(run_config), FeatureBank.load(target / "bank")

    old_dataset, _ = dataset_for(uip_codebook_size=2)
    old_dataset.save()  # what a user's save_dataset=True run would have left behind
    assert (tmp_path / "saved" / "toy-uip-Dataset.pth").is_file()

    new_dataset, new_bank = dataset_for(uip_codebook_size=3)
    uid = new_dataset.uid_field
    users = new_dataset.id2token(uid, np.asarray(new_dataset.user_feat[uid]).astype(int)[1:])
    hobby = new_dataset.id2token("uip_hobby", np.asarray(new_dataset.user_feat["uip_hobby"]).astype(int)[1:])
    assert list(hobby) == [new_bank.token(u, "hobby") for u in users]


SEQUENTIAL_SPLIT = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
                    "MAX_ITEM_LIST_LENGTH": 8, "embedding_size": 16, "hidden_size": 16, "epochs": 2,
                    "metrics": ["NDCG", "Hit"], "topk": [5], "valid_metric": "NDCG@5"}


@pytest.mark.parametrize("model", ["SASRec", "BPR"])
def test_fused_model_end_to_end_then_reloaded_from_its_checkpoint(model, tmp_path, tiny_llm_dir):
    """--uip=true trains SASRec (sequence-output fusion) and BPR (user-embedding fusion) on the profiles learned from
    this split; the saved checkpoint reloads as the fused model and evaluates to the same test result."""
    from recbole.utils import get_trainer

    from recbole_uip.quick_start import load_data_and_model

    write_dataset(tmp_path / "data")
    overrides = SEQUENTIAL_SPLIT if model == "SASRec" else {"metrics": ["NDCG", "Hit"], "topk": [5],
                                                            "valid_metric": "NDCG@5", "epochs": 2}
    config_dict = uip_config_dict(tmp_path, tiny_llm_dir, uip=True, **overrides)
    del config_dict["threshold"]                                   # ranking, not labeled CTR
    result = run_recbole_uip(model, "toy", config_dict=config_dict)
    assert result["uip_fields"] == ["uip_hobby", "uip_background"]
    manifest = json.loads((Path(result["uip_dataset"]) / "uip_manifest.json").read_text())
    bank = FeatureBank.load(Path(result["uip_dataset"]) / "bank")
    assert bank.fingerprint == manifest["fingerprint"]
    assert bank.metadata["inputs"]["split"]["eval_args"]["order"] == ("TO" if model == "SASRec" else "RO")

    config, loaded, dataset, _, _, test_data = load_data_and_model(result["saved_model_file"])
    assert list(loaded.profile_embeddings()), "the reloaded model lost its profile fusion"
    ids = next(loaded.profile_embeddings()).profile_ids                # (U, P) as loaded from the checkpoint
    for user in ("1", "2", "3"):
        row = ids[dataset.token2id(dataset.uid_field, user)]
        assert [dataset.id2token(f, int(v)) for f, v in zip(result["uip_fields"], row)] == \
            [bank.token(user, p) for p in bank.profiles]
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, loaded)
    reloaded = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    assert dict(reloaded) == pytest.approx(dict(result["test_result"]))


def test_sequential_ce_loss_needs_no_negative_sampling_flag(tmp_path, tiny_llm_dir):
    """RecBole's defaults refuse SASRec's CE loss unless train_neg_sample_args=None; we set it when the user did not,
    and keep RecBole's error when the user asked for negative sampling."""
    write_dataset(tmp_path / "data")
    config = build_config("SASRec", "toy", None, {"data_path": str(tmp_path / "data")})
    assert config["train_neg_sample_args"]["distribution"] == "none"      # RecBole's form of None
    with pytest.raises(ValueError, match="should be None"):
        build_config("SASRec", "toy", None, {"data_path": str(tmp_path / "data"),
                                             "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}})
