"""The benchmarks' ID sets (controls, cheap baselines) and dataset copies (``recbole_uip.feature_sets``), and the
controlled CTR runs on them (``recbole_uip.ctr_runs``), on the toy dataset."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from conftest import uip_config_dict, write_dataset
from recbole_uip.bank import FeatureBank
from recbole_uip.config import UIPSettings
from recbole_uip.ctr_runs import (
    CTR_TRAINING, MODEL_KEYS_DEFAULT, TRAINING_DEFAULTS, assert_same_split, assert_user_features, build_loaders,
    check_fields, model_dict, run_config, run_signature, split_view, train_and_test, training_keys,
)
from recbole_uip.data.atomic import MANIFEST_NAME, read_atomic
from recbole_uip.feature_sets import (
    alternative_bank, id_set_fingerprint, is_current, kmeans_columns, own_user_fields, random_ids, shuffled_ids,
    offset_kmeans_columns, weighted_kmeans_columns, write_id_free_copy, write_id_set,
)
from recbole_uip.recbole_config import build_config, check_dataset_files


def _bank(users: int = 24, sizes=(3, 4), profiles=("hobby", "background"), seed: int = 0) -> FeatureBank:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, size=users) for k in sizes], axis=1).astype(np.int64)
    return FeatureBank(fingerprint="f" * 64, profiles=list(profiles), users=[str(u) for u in range(1, users + 1)],
                       codes=codes, codebooks=[np.zeros((k, 4), dtype=np.float32) for k in sizes], no_history_token="none")


def test_random_ids_have_the_codebook_sizes_and_depend_on_the_seed_only():
    bank = _bank()
    ids = random_ids(bank, [3, 5], seed=1)
    assert ids.shape == (24, 2)
    assert set(ids[:, 0]) <= {0, 1, 2} and set(ids[:, 1]) <= set(range(5))
    assert np.array_equal(ids, random_ids(bank, [3, 5], seed=1))
    assert not np.array_equal(ids, random_ids(bank, [3, 5], seed=2))


def test_shuffled_ids_permute_whole_rows_across_users():
    bank = _bank()
    ids = shuffled_ids(bank, seed=3)
    assert ids.shape == bank.codes.shape and not np.array_equal(ids, bank.codes)
    # the same rows (pairs kept together), so every profile keeps its usage
    assert sorted(map(tuple, ids)) == sorted(map(tuple, bank.codes))
    assert np.array_equal(ids, shuffled_ids(bank, seed=3))


def test_kmeans_columns_find_separated_groups_with_each_codebook_size():
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(0, 0.05, (10, 3)), rng.normal(5, 0.05, (10, 3))])
    ids = kmeans_columns(vectors, [2, 2, 3])
    assert ids.shape == (20, 3)
    for column in (0, 1):
        assert len(set(ids[:10, column])) == 1 and len(set(ids[10:, column])) == 1
        assert ids[0, column] != ids[10, column]
    assert len(set(ids[:, 2])) <= 3


def test_weighted_kmeans_columns_split_users_along_the_column_each_profile_weighs():
    rng = np.random.default_rng(1)
    halves = np.repeat([0.0, 4.0], 20)                    # column 0: the first 20 users against the last 20
    parity = np.tile([0.0, 4.0], 20)                      # column 1: even users against odd ones
    vectors = np.stack([halves, parity], axis=1) + rng.normal(0, 0.3, (40, 2))
    ids = weighted_kmeans_columns(vectors, np.array([[1.98, 0.02], [0.02, 1.98]]), [2, 2])
    assert ids.shape == (40, 2)
    assert len(set(ids[:20, 0])) == 1 and len(set(ids[20:, 0])) == 1 and ids[0, 0] != ids[20, 0]
    assert len(set(ids[0::2, 1])) == 1 and len(set(ids[1::2, 1])) == 1 and ids[0, 1] != ids[1, 1]
    separated = np.concatenate([rng.normal(0, 0.05, (10, 3)), rng.normal(5, 0.05, (10, 3))])
    assert np.array_equal(weighted_kmeans_columns(separated, np.ones((2, 3)), [2, 3]), kmeans_columns(separated, [2, 3]))


def test_offset_kmeans_columns_cluster_each_profiles_own_offsets_without_standardising_them():
    rng = np.random.default_rng(2)
    halves = np.repeat([0.0, 4.0], 20) + rng.normal(0, 0.3, 40)       # the first 20 users against the last 20
    parity = np.tile([0.0, 4.0], 20) + rng.normal(0, 0.3, 40)         # even users against odd ones
    offsets = np.zeros((40, 2, 2))                                     # (U, P, D)
    offsets[:, 0, 0], offsets[:, 1, 0] = halves, parity
    ids = offset_kmeans_columns(offsets, [2, 2])
    assert len(set(ids[:20, 0])) == 1 and len(set(ids[20:, 0])) == 1 and ids[0, 0] != ids[20, 0]
    assert len(set(ids[0::2, 1])) == 1 and len(set(ids[1::2, 1])) == 1 and ids[0, 1] != ids[1, 1]
    # the metric as it is: a loud, blurred parity coordinate outweighs the clean halves (standardised, the halves
    # would win: their groups are the tighter ones in units of their own spread)
    offsets[:, 0, 1] = np.tile([0.0, 100.0], 20) + rng.normal(0, 30.0, 40)
    loud = offset_kmeans_columns(offsets, [2, 2])[:, 0]
    agreement = (loud == np.tile([0, 1], 20)).mean()
    assert max(agreement, 1 - agreement) >= 0.9


def test_alternative_bank_keeps_users_and_profiles_and_names_its_ids():
    bank = _bank()
    codes = random_ids(bank, [3, 4])
    other = alternative_bank(bank, codes, "random", "a note")
    assert other.users == bank.users and other.profiles == bank.profiles
    assert np.array_equal(other.codes, codes) and other.codes.dtype == np.int64
    assert other.fingerprint == id_set_fingerprint(bank, "random") != id_set_fingerprint(bank, "shuffled")
    assert other.metadata == {"note": "a note", "source": bank.fingerprint}


@pytest.fixture
def toy(tmp_path, tiny_llm_dir):
    """The toy dataset's CTR config (profiles on), its settings and files, and a bank over its users."""
    write_dataset(tmp_path / "data")
    config_dict = uip_config_dict(tmp_path, tiny_llm_dir, uip=True, **CTR_TRAINING)
    config_dict["epochs"] = 1
    config = build_config("DeepFM", "toy", None, config_dict)
    settings = UIPSettings.from_config(config)
    bank = _bank(sizes=[settings.codebook_sizes[p] for p in settings.profile_names], profiles=settings.profile_names)
    return config, config_dict, settings, check_dataset_files(config), bank


def test_write_id_set_writes_a_copy_once_per_bank_and_id_set(tmp_path, toy):
    config, _, settings, files, bank = toy
    folder = tmp_path / "out" / "toy-uipzoo-shuffled"
    calls = []

    def build():
        calls.append(1)
        return shuffled_ids(bank), "shuffled"

    assert write_id_set(config, settings, files, bank, "shuffled", folder, build) is True
    assert is_current(folder, id_set_fingerprint(bank, "shuffled"))
    assert write_id_set(config, settings, files, bank, "shuffled", folder, build) is False   # current: not rebuilt
    assert calls == [1]
    users = read_atomic(folder / "toy-uipzoo-shuffled.user")
    column = users.fields.index(settings.field_names[0])
    written = {row[0]: row[column] for row in users.rows}
    expected = shuffled_ids(bank)[:, 0]
    assert [written[u] for u in bank.users] == [str(v) for v in expected]
    # another bank (another fingerprint) makes the copy stale
    assert write_id_set(config, settings, files, dataclasses.replace(bank, fingerprint="g" * 64), "shuffled", folder,
                        build) is True and calls == [1, 1]


def test_id_free_copy_joins_each_users_columns_into_inter_and_drops_user(tmp_path, toy):
    config, _, settings, files, bank = toy
    source = tmp_path / "out" / "toy-uipzoo-random"
    write_id_set(config, settings, files, bank, "random", source, lambda: (random_ids(bank, [3, 3]), "random"))
    folder = write_id_free_copy(config, source, tmp_path / "out" / "toy-idfree")
    assert not (folder / "toy-idfree.user").exists() and (folder / "toy-idfree.item").is_file()
    inter = read_atomic(folder / "toy-idfree.inter")
    users = read_atomic(source / "toy-uipzoo-random.user")
    joined = [f for f in users.fields if f != "user_id"]
    assert joined == ["age", "gender", *settings.field_names] and inter.fields[-len(joined):] == joined
    assert inter.header.split("\t")[-1] == f"{settings.field_names[-1]}:token"
    row_of = {row[0]: row for row in users.rows}
    for row in inter.rows:
        for field in joined:
            assert row[inter.fields.index(field)] == row_of[row[0]][users.fields.index(field)]
    assert len(inter.rows) == len(read_atomic(files["inter"]).rows)
    stamp = (folder / MANIFEST_NAME).stat().st_mtime_ns
    assert write_id_free_copy(config, source, folder) == folder and (folder / MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_training_keys_model_dict_and_signature():
    args = argparse.Namespace(**TRAINING_DEFAULTS, dataset="toy", threads=1, model_keys=MODEL_KEYS_DEFAULT)
    # the cold-start and rebuild benchmarks' keys: the zoo's training keys at their defaults
    assert CTR_TRAINING == training_keys(args) == {
        "train_batch_size": 4096, "learning_rate": 0.01, "stopping_step": 2, "epochs": 100, "eval_batch_size": 16384,
        "valid_metric": "AUC", "metric_decimal_place": 6, "show_progress": False}
    assert model_dict(args, "xDeepFM", {"seed": 1})["cin_layer_size"] == [50, 50]
    assert "cin_layer_size" not in model_dict(args, "DeepFM", {})
    bank = _bank()
    signature = run_signature(args, {"checkpoint_dir": "a"}, bank)
    assert len(signature) == 16
    assert run_signature(args, {"checkpoint_dir": "b", "uip_output_dir": "c"}, bank) == signature   # folders only
    assert run_signature(args, {"embedding_size": 8}, bank) != signature
    assert run_signature(argparse.Namespace(**{**vars(args), "threads": 2}), {}, bank) != run_signature(args, {}, bank)
    assert run_signature(args, {}, bank, format_version=2) != run_signature(args, {}, bank)


def test_both_settings_reproduce_the_plain_split_and_train(tmp_path, toy):
    config, config_dict, settings, files, bank = toy
    plain = build_config("DeepFM", "toy", None, {**config_dict, "uip": False})
    reference = split_view(*build_loaders(plain))
    source = tmp_path / "out" / "toy-uipzoo-random"
    write_id_set(config, settings, files, bank, "random", source, lambda: (random_ids(bank, [3, 3]), "random"))
    columns = own_user_fields(config) + list(settings.field_names)
    assert own_user_fields(config) == ["age", "gender"]
    id_free = write_id_free_copy(config, source, tmp_path / "out" / "toy-idfree")
    for setting, folder in [("standard", source), ("id_free", id_free)]:
        run = run_config(config, settings, folder, columns, setting, config_dict)
        dataset, loaders = build_loaders(run)
        view = split_view(dataset, loaders)
        assert_same_split(reference, view, setting)
        assert_user_features(reference, dataset, loaders, folder, columns, setting, config, setting)
        check_fields(run, dataset, columns, setting)
        with pytest.raises(AssertionError, match="user-side fields"):
            check_fields(run, dataset, columns[:-1], setting)
        result = train_and_test(run, loaders, model_seed=2020)
        assert 0.0 <= result["auc"] <= 1.0 and np.isfinite(result["logloss"])
        assert result["epochs_run"] == 1 and result["best_epoch"] == 1 and result["cap_hit"] is True
    # a split that differs by one interaction is refused
    changed = dataclasses.replace(reference, items=[reference.items[0][::-1]] + reference.items[1:])
    with pytest.raises(AssertionError, match="train split differs"):
        assert_same_split(reference, changed, "changed")


def test_training_sequences_list_each_users_training_items_oldest_first(toy):
    from recbole_uip.data.behaviour import build_training_split
    from recbole_uip.report import training_sequences

    config, _, _, _, bank = toy
    dataset, train = build_training_split(config)
    users = bank.users + ["not-a-user"]
    sequences, mean_rating = training_sequences(dataset, train, users)
    inter = train.inter_feat
    tokens = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
    for row, user in enumerate(bank.users):
        mine = np.flatnonzero(tokens == user)
        order = mine[np.argsort(inter[dataset.time_field].numpy()[mine], kind="stable")]
        assert sequences[row] == inter[dataset.iid_field].numpy()[order].tolist()
        assert mean_rating[row] == pytest.approx(inter["rating"].numpy()[mine].mean())
    assert sequences[-1] == [] and mean_rating[-1] == 0
