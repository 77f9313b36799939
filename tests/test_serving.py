"""Serving a bank: IDs for users it does not hold, from their interactions alone (no LLM), the assign command,
and the vectorised lookup."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from conftest import uip_config_dict, write_dataset


def _bank_and_grown_dataset(tmp_path, tiny_llm_dir):
    """A bank inferred on ``toy``, and ``grown``: toy's files plus two new users (one with items the bank knows
    in a shuffled file order, one whose only item the bank never embedded) and one more interaction for user 1."""
    from recbole_uip.bank import FeatureBank
    from recbole_uip.quick_start import build_config, infer_profiles

    write_dataset(tmp_path / "data", n_users=10, n_items=12, per_user=6)
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_epochs=0))
    bank = FeatureBank.load(infer_profiles(config) / "bank")
    grown = tmp_path / "data" / "grown"
    grown.mkdir()
    for suffix in ("item", "user"):
        shutil.copyfile(tmp_path / "data" / "toy" / f"toy.{suffix}", grown / f"grown.{suffix}")
    known = bank.encoder.item_ids
    with open(grown / "grown.item", "a") as f:
        f.write("fresh\tbrand new film\tDrama\n")          # an item no training history has: the LLM embeds it
    with open(tmp_path / "data" / "toy" / "toy.inter") as f:
        lines = f.readlines()
    lines += [f"new1\t{known[2]}\t5\t990000002\n", f"new1\t{known[0]}\t1\t990000001\n",
              "new2\tno-such-item\t4\t990000003\n", f"1\t{known[3]}\t2\t990000004\n",
              "new3\tfresh\t5\t990000005\n", f"new3\t{known[1]}\t2\t990000006\n"]
    (grown / "grown.inter").write_text("".join(lines))
    return bank, known


def test_assign_gives_new_users_the_ids_of_their_histories_and_keeps_the_banks(tmp_path, tiny_llm_dir):
    from recbole_uip.__main__ import main
    from recbole_uip.bank import FeatureBank
    from recbole_uip.data.atomic import read_atomic

    bank, known = _bank_and_grown_dataset(tmp_path, tiny_llm_dir)
    bank_dir = tmp_path / "out" / "toy-uip" / "bank"
    flags = [f"--bank={bank_dir}", "--dataset=grown", f"--data_path={tmp_path / 'data'}", "--uip_llm=unused",
             f"--output_dir={tmp_path / 'served'}", "--state=WARNING", "--show_progress=false"]
    assert main(["assign", *flags]) == 0
    folder = tmp_path / "served" / "grown-uip"
    table = read_atomic(folder / "grown-uip.user")
    tokens = {row[0]: row[-2:] for row in table.rows}
    served = FeatureBank.load(folder / "bank")
    # new1: oldest first by timestamp, whatever the file order
    expected = bank.assign([[known[0], known[2]]], [[1.0, 5.0]])[0]
    np.testing.assert_array_equal(bank.assign([[known[0], known[2]]], [[1.0, 5.0]])[0], expected)   # deterministic
    assert served.lookup("new1") == {p: str(int(c)) for p, c in zip(bank.profiles, expected)}
    assert "new2" not in served.users                           # no item with text: keeps 'none'
    # new3's unseen item was embedded by the bank's own LLM, exactly as inference embeds items
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.user_features import embed_items

    llm = load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32")
    fresh = embed_items(llm, ["brand new film (Drama)"]).numpy()
    assert "fresh" in served.encoder.item_ids and "fresh" not in bank.encoder.item_ids
    np.testing.assert_allclose(served.encoder.item_embeddings[served.encoder.item_ids.index("fresh")], fresh[0], atol=1e-5)
    expected3 = bank.encoder.with_items(["fresh"], fresh).offsets([["fresh", known[1]]], [[5.0, 2.0]])
    assert served.lookup("new3") == {p: str(int(c)) for p, c in zip(bank.profiles, bank.quantise(expected3)[0])}
    assert served.metadata["assigned"]["new_users"] == 2
    for user in bank.users:                                     # without --refresh, the bank's users keep their IDs
        assert served.lookup(user) == bank.lookup(user)
        assert tokens[user] == [bank.token(user, p) for p in bank.profiles]
    assert served.fingerprint != bank.fingerprint

    # --refresh: user 1's IDs come from all their interactions in the grown files (one more than the bank saw)
    assert main(["assign", *flags, "--refresh=true"]) == 0
    refreshed = FeatureBank.load(folder / "bank")
    assert refreshed.metadata["assigned"]["refreshed_users"] == len(bank.users)
    row = refreshed.users.index("1")
    assert not np.allclose(refreshed.offsets[row], bank.offsets[bank.users.index("1")])


def test_assign_refuses_what_it_cannot_serve_with_one_message(tmp_path, tiny_llm_dir, capsys):
    from recbole_uip.__main__ import main

    _bank_and_grown_dataset(tmp_path, tiny_llm_dir)
    assert main(["assign", "--dataset=grown", f"--data_path={tmp_path / 'data'}"]) == 2
    assert "--bank is required" in capsys.readouterr().err
    assert main(["assign", f"--bank={tmp_path / 'nowhere'}", "--dataset=grown", f"--data_path={tmp_path / 'data'}"]) == 2
    assert "no complete feature bank" in capsys.readouterr().err
    assert main(["infer", "--dataset=grown", "--bank=x"]) == 2
    assert "belong to the assign command" in capsys.readouterr().err
    # a rating that is not a number: the file and line, before anything is written
    inter = tmp_path / "data" / "grown" / "grown.inter"
    lines = inter.read_text().splitlines(keepends=True)
    lines[2] = "\t".join(lines[2].split("\t")[:2] + ["four"] + lines[2].split("\t")[3:])
    inter.write_text("".join(lines))
    assert main(["assign", f"--bank={tmp_path / 'out' / 'toy-uip' / 'bank'}", "--dataset=grown",
                 f"--data_path={tmp_path / 'data'}", f"--output_dir={tmp_path / 'served'}"]) == 2
    assert "grown.inter:3: field 'rating' has the value 'four', not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "served").exists()


def test_vectorised_lookup_reads_codes_only_and_marks_unknown_users():
    from recbole_uip.bank import FeatureBank

    codes = np.array([[0, 2], [1, 1], [2, 0]], dtype=np.int64)
    bank = FeatureBank(fingerprint="f", profiles=["hobby", "background"], users=["a", "b", "c"], codes=codes,
                       codebooks=[np.zeros((3, 4), np.float32)] * 2, no_history_token="none")
    np.testing.assert_array_equal(bank.codes_for(["c", "zz", "a"]), [[2, 0], [-1, -1], [0, 2]])
    assert bank.codes_for([]).shape == (0, 2)
    with pytest.raises(Exception, match="no encoder"):
        bank.assign([["x"]], [[1.0]])


def test_align_codes_gives_a_renumbered_rebuild_its_previous_numbers_and_keeps_the_meaning():
    from recbole_uip.bank import FeatureBank
    from recbole_uip.serving import align_codes

    rng = np.random.default_rng(0)
    users = [str(u) for u in range(60)]
    codes = rng.integers(0, 4, size=(60, 2))
    codebooks = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2)]
    old = FeatureBank(fingerprint="old", profiles=["a", "b"], users=users, codes=codes, codebooks=codebooks,
                      no_history_token="none")
    perm = [np.array([2, 0, 3, 1]), np.array([1, 2, 3, 0])]
    renumbered_codes = np.stack([perm[p][codes[:, p]] for p in range(2)], axis=1)
    renumbered_books = []
    for p in range(2):
        book = np.empty_like(codebooks[p])
        book[perm[p]] = codebooks[p]
        renumbered_books.append(book)
    new = FeatureBank(fingerprint="new", profiles=["a", "b"], users=users[::-1], codes=renumbered_codes[::-1],
                      codebooks=renumbered_books, no_history_token="none", initial_codes=renumbered_codes[::-1])
    aligned, kept = align_codes(new, old)
    assert kept == {"a": 1.0, "b": 1.0}
    np.testing.assert_array_equal(aligned.codes[::-1], codes)
    np.testing.assert_array_equal(aligned.initial_codes[::-1], codes)
    for p in range(2):                       # each user's code vector is the same point as before
        np.testing.assert_array_equal(aligned.codebooks[p][aligned.codes[:, p]], new.codebooks[p][new.codes[:, p]])
    # a rebuild that moved 10 users: the share kept says so, and the numbering is still the best match
    moved = renumbered_codes.copy()
    moved[:10, 0] = perm[0][(codes[:10, 0] + 1) % 4]
    partly, kept = align_codes(dataclasses.replace(new, codes=moved[::-1], initial_codes=None), old)
    assert kept["b"] == 1.0 and abs(kept["a"] - 50 / 60) < 1e-9
    np.testing.assert_array_equal(partly.codes[::-1][10:, 0], codes[10:, 0])



def write_three_groups(root, n_users: int = 24, n_items: int = 30, per_user: int = 10, seed: int = 0) -> None:
    """A planted dataset: three user groups, each liking one genre pair only and rating with its own generosity
    (1, 3 or 5), so that a rebuild on another split finds the same three groups (no ``.user`` file)."""
    import random

    from conftest import GENRES, WORDS

    rng = random.Random(seed)
    folder = root / "toy"
    folder.mkdir(parents=True)
    items = [(str(i), f"{rng.choice(WORDS)} {rng.choice(WORDS)}", GENRES[i % len(GENRES)]) for i in range(1, n_items + 1)]
    with open(folder / "toy.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\tclass:token_seq\n")
        f.writelines(f"{item}\t{title}\t{genre}\n" for item, title, genre in items)
    t = 880000000
    with open(folder / "toy.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(1, n_users + 1):
            group = u % 3
            pool = [it for it in items if it[2] in (GENRES[2 * group], GENRES[2 * group + 1])]
            for item, _, _ in rng.sample(pool, min(per_user, len(pool))):
                t += rng.randint(1, 1000)
                f.write(f"{u}\t{item}\t{(1, 3, 5)[group]}\t{t}\n")


def test_a_rebuild_with_another_seed_keeps_the_previous_banks_numbers_where_it_can(tmp_path, tiny_llm_dir):
    from recbole_uip.bank import BankError, FeatureBank
    from recbole_uip.quick_start import build_config, infer_profiles

    write_three_groups(tmp_path / "data")
    # 4 encoder dims: one taste direction and the rating statistics, where the planted groups differ
    keys = dict(uip_epochs=0, uip_encoder_dims=4, load_col=None, threshold=None)
    first = FeatureBank.load(infer_profiles(build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, **keys))) / "bank")
    previous = tmp_path / "previous_bank"
    shutil.copytree(tmp_path / "out" / "toy-uip" / "bank", previous)
    # the same data, another seed (another split and k-means start): the same groups under other numbers
    rebuild = dict(keys, seed=2021)
    plain = FeatureBank.load(infer_profiles(build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, **rebuild))) / "bank")
    aligned = FeatureBank.load(infer_profiles(build_config("DeepFM", "toy", None, uip_config_dict(
        tmp_path, tiny_llm_dir, uip_align_to=str(previous), **rebuild))) / "bank")
    assert aligned.fingerprint != plain.fingerprint and aligned.metadata["aligned_to"] == first.fingerprint
    assert aligned.users == first.users == plain.users
    kept = aligned.metadata["ids_kept"]
    # measured with seeds 2021, 2022, 2023: background 100% and hobby 67% kept after matching, 8-33% without
    for p, name in enumerate(first.profiles):
        same_plain = (plain.codes[:, p] == first.codes[:, p]).mean()
        assert kept[name] == pytest.approx((aligned.codes[:, p] == first.codes[:, p]).mean())
        assert kept[name] > 0.5                                  # most users keep their ID after matching
        assert kept[name] > same_plain                           # more than the numbers k-means gave by chance
        # the grouping itself is unchanged by the renumbering
        pairs = {(a, b) for a, b in zip(plain.codes[:, p], aligned.codes[:, p])}
        assert len(pairs) == len(set(plain.codes[:, p]))
    with pytest.raises(BankError, match="uip_align_to"):
        infer_profiles(build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_align_to=str(tmp_path))))
