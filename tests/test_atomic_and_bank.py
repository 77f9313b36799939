"""Atomic files (validation, byte-exact .user rewrite, atomic publish), the feature bank, and behaviour text."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import uip_config_dict, write_dataset
from recbole_uip.bank import BANK_FORMAT_VERSION, BankError, FeatureBank
from recbole_uip.data.atomic import (
    AtomicFileError, publish_directory, read_atomic, validate_atomic, write_user_file,
)
from recbole_uip.data.behaviour import BehaviourTextError, ItemTexts
from recbole_uip.utils import atomic_write


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------ headers
@pytest.mark.parametrize("header,message", [
    ("user_id:token\tage", "header column 'age' is not of the form 'name:type'"),
    ("user_id:token\t:token", "header column ':token' is not of the form 'name:type'"),
    ("user_id:token\tage:int", "field 'age' has type 'int'; atomic types are token, token_seq, float, float_seq"),
    ("user_id:token\tage:token\tuser_id:float", "field 'user_id' appears twice in the header"),
])
def test_malformed_header_names_file_and_line(tmp_path, header, message):
    path = write(tmp_path / "bad.user", header + "\n1\t2\n")
    for reader in (read_atomic, validate_atomic):
        with pytest.raises(AtomicFileError) as info:
            reader(path)
        assert str(info.value).startswith(f"{path}:1: ")
        assert message in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(AtomicFileError, match="empty file"):
        read_atomic(write(tmp_path / "empty.inter", ""))
    with pytest.raises(AtomicFileError, match="file not found"):
        read_atomic(tmp_path / "absent.inter")


def test_wrong_column_count_names_the_line(tmp_path):
    # line 3 is blank (skipped, but counted), line 5 has an extra value
    path = write(tmp_path / "x.inter", "user_id:token\titem_id:token\n1\t2\n\n1\t3\n2\t4\t9\n")
    for reader in (read_atomic, validate_atomic):
        with pytest.raises(AtomicFileError) as info:
            reader(path)
        assert str(info.value) == f"{path}:5: expected 2 tab-separated values, found 3."
    too_few = write(tmp_path / "y.inter", "user_id:token\titem_id:token\n1\n")
    with pytest.raises(AtomicFileError, match=r"y\.inter:2: expected 2 tab-separated values, found 1"):
        read_atomic(too_few)


def test_read_atomic_and_required_fields(tmp_path):
    path = write(tmp_path / "x.item", "item_id:token\ttitle:token_seq\tprice:float\n7\tA B\t1.50\n8\tC\t2\n")
    table = read_atomic(path)
    assert table.fields == ["item_id", "title", "price"]
    assert table.types == ["token", "token_seq", "float"]
    assert table.rows == [["7", "A B", "1.50"], ["8", "C", "2"]]
    assert table.column("price") == ["1.50", "2"]
    with pytest.raises(AtomicFileError, match="no field 'genre'"):
        table.column("genre")
    validate_atomic(path, ["item_id"])
    with pytest.raises(AtomicFileError, match="missing field.*user_id"):
        validate_atomic(path, ["item_id", "user_id"])


# ------------------------------------------------------------------------------------------------ .user
USER_TEXT = (
    "user_id:token\tage:float\tname:token_seq\tzip:token\n"
    "u1\t07.50\tJosé  Ünal\t\n"          # unusual float text, two spaces, unicode, empty last field
    "u2\t30\tA\t02139\n"
    "u3\t1e3\t \tX\n"
)


def test_write_user_file_keeps_original_bytes_and_adds_columns(tmp_path):
    source = read_atomic(write(tmp_path / "src.user", USER_TEXT))
    out = tmp_path / "out.user"
    columns = {"uip_hobby": lambda u: f"h{u}", "uip_job": lambda u: "none" if u == "u2" else "7"}
    write_user_file(out, source, "user_id", [], columns)
    original = USER_TEXT.encode("utf-8").split(b"\n")[:-1]
    written = out.read_bytes().split(b"\n")
    assert written[-1] == b""                                   # ends with one newline
    written = written[:-1]
    assert len(written) == len(original)
    assert written[0] == original[0] + b"\tuip_hobby:token\tuip_job:token"
    extras = [b"\thu1\t7", b"\thu2\tnone", b"\thu3\t7"]
    for line, before, extra in zip(written[1:], original[1:], extras):
        assert line == before + extra


def test_write_user_file_refuses_clashing_fields_and_a_missing_user_field(tmp_path):
    source = read_atomic(write(tmp_path / "src.user", USER_TEXT))
    with pytest.raises(AtomicFileError, match="already has field.*zip"):
        write_user_file(tmp_path / "o.user", source, "user_id", [], {"zip": str})
    with pytest.raises(AtomicFileError, match="no user id field 'uid'"):
        write_user_file(tmp_path / "o.user", source, "uid", [], {"uip_x": str})


def test_write_user_file_without_source_writes_one_row_per_user(tmp_path):
    out = tmp_path / "new.user"
    write_user_file(out, None, "user_id", ["3", "1", "2"], {"uip_a": lambda u: u * 2, "uip_b": lambda u: "x"})
    assert out.read_text() == "user_id:token\tuip_a:token\tuip_b:token\n3\t33\tx\n1\t11\tx\n2\t22\tx\n"
    assert read_atomic(out).fields == ["user_id", "uip_a", "uip_b"]


# ---------------------------------------------------------------------------------------------- publish
def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old")))


def test_publish_directory_replaces_the_target_in_one_step(tmp_path):
    target = tmp_path / "pub" / "toy-uip"
    publish_directory(lambda d: (d / "a.txt").write_text("one"), target)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    publish_directory(lambda d: (d / "b.txt").write_text("two"), target)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]        # nothing of the old folder survives
    assert (target / "b.txt").read_text() == "two"
    assert leftovers(target.parent) == []


def test_publish_directory_keeps_the_old_target_when_build_fails(tmp_path):
    target = tmp_path / "pub" / "toy-uip"
    publish_directory(lambda d: (d / "a.txt").write_text("old"), target)

    def failing(folder: Path) -> None:
        (folder / "a.txt").write_text("new")
        (folder / "half").mkdir()
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError, match="killed mid-way"):
        publish_directory(failing, target)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "old"
    assert leftovers(target.parent) == []

    fresh = tmp_path / "pub" / "never"
    with pytest.raises(RuntimeError):
        publish_directory(failing, fresh)
    assert not fresh.exists()
    assert leftovers(target.parent) == []
    with pytest.raises(KeyboardInterrupt):
        publish_directory(lambda d: (_ for _ in ()).throw(KeyboardInterrupt()), fresh)
    assert not fresh.exists() and leftovers(target.parent) == []


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = write(tmp_path / "f.json", "old")
    with pytest.raises(ValueError):
        with atomic_write(path) as handle:
            handle.write("new, half")
            raise ValueError("boom")
    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []
    with atomic_write(path) as handle:
        handle.write("new")
    assert path.read_text() == "new" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------- bank
def make_bank(with_extras: bool = True) -> FeatureBank:
    rng = np.random.default_rng(0)
    return FeatureBank(
        fingerprint="f" * 64,
        profiles=["hobby", "job"],
        users=["u1", "u2", "u3"],
        codes=np.array([[0, 2], [1, 1], [2, 0]], dtype=np.int64),
        codebooks=[rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4, 4)).astype(np.float32)],
        no_history_token="none",
        summaries=rng.normal(size=(3, 5)).astype(np.float32) if with_extras else None,
        offsets=rng.normal(size=(3, 2, 4)).astype(np.float32) if with_extras else None,
        projections=[rng.normal(size=(4, 2)).astype(np.float32) for _ in range(2)] if with_extras else None,
        metadata={"history": [{"round": 0}], "seconds": 1.5},
    )


@pytest.mark.parametrize("with_extras", [True, False])
def test_bank_roundtrip(tmp_path, with_extras):
    bank = make_bank(with_extras)
    assert bank.save(tmp_path / "bank") == tmp_path / "bank"
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["bank.json", "bank.npz"]
    loaded = FeatureBank.load(tmp_path / "bank")
    assert loaded.fingerprint == bank.fingerprint
    assert loaded.profiles == bank.profiles and loaded.users == bank.users
    assert loaded.no_history_token == "none"
    assert loaded.metadata == bank.metadata
    assert loaded.codes.dtype == np.int64
    np.testing.assert_array_equal(loaded.codes, bank.codes)
    assert len(loaded.codebooks) == 2
    for a, b in zip(loaded.codebooks, bank.codebooks):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    if with_extras:
        np.testing.assert_array_equal(loaded.summaries, bank.summaries)
        np.testing.assert_array_equal(loaded.offsets, bank.offsets)
        for a, b in zip(loaded.projections, bank.projections, strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        assert loaded.summaries is None and loaded.offsets is None and loaded.projections is None
    assert json.loads((tmp_path / "bank" / "bank.json").read_text())["format_version"] == BANK_FORMAT_VERSION


def test_bank_tokens():
    bank = make_bank()
    assert bank.token("u1", "job") == "2"
    assert bank.token("u3", "hobby") == "2"
    assert bank.lookup("u2") == {"hobby": "1", "job": "1"}
    assert bank.token("stranger", "hobby") == "none"
    assert bank.lookup("stranger") == {"hobby": "none", "job": "none"}
    with pytest.raises(BankError, match="shape"):
        FeatureBank("f", ["a"], ["u1", "u2"], np.zeros((2, 2), dtype=np.int64), [np.zeros((2, 2))], "none")


def test_corrupted_npz_is_refused(tmp_path):
    folder = make_bank().save(tmp_path / "bank")
    npz = folder / "bank.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x01
    npz.write_bytes(bytes(data))
    with pytest.raises(BankError, match="does not match the checksum"):
        FeatureBank.load(folder)


def test_wrong_format_version_and_incomplete_banks_are_refused(tmp_path):
    folder = make_bank().save(tmp_path / "bank")
    meta_path = folder / "bank.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = BANK_FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BankError, match=f"format version {BANK_FORMAT_VERSION + 1}, expected {BANK_FORMAT_VERSION}"):
        FeatureBank.load(folder)
    meta_path.write_text("{not json")
    with pytest.raises(BankError, match="not valid JSON"):
        FeatureBank.load(folder)
    meta_path.unlink()
    with pytest.raises(BankError, match="no complete feature bank"):
        FeatureBank.load(folder)


# -------------------------------------------------------------------------------------------- behaviour
def test_item_file_without_text_field_names_the_available_fields(tmp_path):
    path = write(tmp_path / "toy.item", "item_id:token\tprice:float\n1\t2.5\n2\t3.0\n")
    with pytest.raises(BehaviourTextError) as info:
        ItemTexts(path, "item_id", None, None)
    message = str(info.value)
    assert str(path) in message and "fields: item_id, price" in message and "types: token, float" in message
    assert "uip_item_text_fields" in message


def test_item_texts_rendering_and_errors(tmp_path):
    path = write(tmp_path / "toy.item",
                 "item_id:token\ttitle:token_seq\tgenre:token_seq\tprice:float\n1\tStar Night\tAction Drama\t2\n")
    texts = ItemTexts(path, "item_id", None, None)
    assert texts.fields == ["title", "genre"] and texts.template == "{title} ({genre})"
    assert texts.get("1") == "Star Night (Action Drama)"
    assert texts.get("2") is None
    custom = ItemTexts(path, "item_id", ["genre", "price"], "{genre} for {price}")
    assert custom.get("1") == "Action Drama for 2"
    with pytest.raises(BehaviourTextError, match="names year, not in"):
        ItemTexts(path, "item_id", ["title", "year"], None)
    with pytest.raises(BehaviourTextError, match="cannot be filled"):
        ItemTexts(path, "item_id", ["title"], "{title} {genre}")
    with pytest.raises(BehaviourTextError, match="does not exist"):
        ItemTexts(tmp_path / "none.item", "item_id", None, None)


def test_pipeline_refuses_an_item_file_without_text(tmp_path, tiny_llm_dir):
    from recbole_uip.quick_start import build_config, infer_profiles

    folder = write_dataset(tmp_path / "data", n_users=6, n_items=10, per_user=4)
    lines = ["item_id:token\tprice:float"] + [f"{i}\t{i / 2}" for i in range(1, 11)]
    (folder / "toy.item").write_text("\n".join(lines) + "\n")
    load_col = {"inter": ["user_id", "item_id", "rating", "timestamp"], "user": ["user_id", "age", "gender"],
                "item": ["item_id", "price"]}
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, load_col=load_col))
    with pytest.raises(BehaviourTextError, match="fields: item_id, price"):
        infer_profiles(config)
    assert not (tmp_path / "out" / "toy-uip").exists()


def test_users_without_training_history_get_the_no_history_token(tmp_path, tiny_llm_dir):
    """User 50 has interactions only in valid/test (they are the latest, split in time order); user 99 has none."""
    from recbole.utils import init_logger

    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import build_behaviour_corpus, build_training_split
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.quick_start import build_config, infer_profiles

    folder = write_dataset(tmp_path / "data")
    with open(folder / "toy.inter", "a") as f:
        f.write("50\t3\t5\t990000000\n50\t4\t4\t990000001\n")
    with open(folder / "toy.user", "a") as f:
        f.write("50\t30\tM\n99\t40\tF\n")
    eval_args = {"split": {"RS": [0.98, 0.01, 0.01]}, "order": "TO", "group_by": None, "mode": "labeled"}
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, eval_args=eval_args))
    init_logger(config)

    dataset, train = build_training_split(config)
    train_users = set(dataset.id2token(dataset.uid_field, train.inter_feat[dataset.uid_field].numpy()))
    assert "50" not in train_users and "99" not in train_users and len(train_users) == 24

    settings = UIPSettings.from_config(config)
    import torch

    llm = load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32")
    corpus = build_behaviour_corpus(config, settings, llm.tokenizer, logging.getLogger("test"))
    assert sorted(corpus.users_without_history) == ["50", "99"]
    assert "50" not in corpus.users and len(corpus.users) == 24

    target = infer_profiles(config, settings)
    table = read_atomic(target / "toy-uip.user")
    assert table.fields == ["user_id", "age", "gender", "uip_hobby", "uip_background"]
    rows = {row[0]: row for row in table.rows}
    assert len(rows) == 26
    for user in ("50", "99"):
        assert rows[user][3:] == ["none", "none"]
    for user in map(str, range(1, 25)):
        assert all(value.isdigit() and int(value) < 3 for value in rows[user][3:])
    bank = FeatureBank.load(target / "bank")
    assert bank.metadata["users_without_history"] == 2
    assert "50" not in bank.users and "99" not in bank.users
