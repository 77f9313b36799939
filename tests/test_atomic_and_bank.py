"""Atomic files (validation, byte-exact .user rewrite, atomic publish) and the feature bank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recbole_uip.bank import BANK_FORMAT_VERSION, BankError, EncoderState, FeatureBank
from recbole_uip.data.atomic import (
    AtomicFileError, publish_directory, read_atomic, validate_atomic, write_user_file,
)
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
        assert str(info.value) == f"{path}:5: expected 2 values separated by '\\t', found 3."
    too_few = write(tmp_path / "y.inter", "user_id:token\titem_id:token\n1\n")
    with pytest.raises(AtomicFileError, match=r"y\.inter:2: expected 2 values separated by '\\t', found 1\.$"):
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
    assert validate_atomic(path, ["item_id"]) == 2 == validate_atomic(path, ["item_id"], unique_field="item_id")
    with pytest.raises(AtomicFileError, match="missing field.*user_id"):
        validate_atomic(path, ["item_id", "user_id"])
    with open(path, "a") as handle:
        handle.write("7\tD\t3\n")
    with pytest.raises(AtomicFileError, match=r":4: item_id '7' appears again \(first on line 2\)"):
        validate_atomic(path, ["item_id"], unique_field="item_id")


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
def make_encoder(rng) -> EncoderState:
    from recbole_uip.inference.user_features import UserFeatureMap

    features = UserFeatureMap(*(rng.normal(size=6).astype(np.float32) for _ in range(2)), 3.5, 5.0,
                              *(rng.normal(size=15).astype(np.float32) for _ in range(2)),
                              rng.normal(size=(15, 5)).astype(np.float32))
    return EncoderState(rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32),
                        rng.normal(size=(2, 4, 5)).astype(np.float32), features, ["i1", "i2", "i3"],
                        rng.normal(size=(3, 6)).astype(np.float32))


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
        initial_codes=np.array([[1, 0], [1, 2], [0, 0]], dtype=np.int64) if with_extras else None,
        random_step_codes=np.array([[2, 0], [0, 2], [1, 1]], dtype=np.int64) if with_extras else None,
        encoder=make_encoder(rng) if with_extras else None,
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
        np.testing.assert_array_equal(loaded.initial_codes, bank.initial_codes)
        np.testing.assert_array_equal(loaded.random_step_codes, bank.random_step_codes)
        assert loaded.encoder.item_ids == bank.encoder.item_ids
        for name in ("anchors", "shared", "weights", "item_embeddings"):
            np.testing.assert_array_equal(getattr(loaded.encoder, name), getattr(bank.encoder, name))
        for name in ("item_mean", "item_std", "feature_mean", "feature_std", "projection", "rating_mean", "prior"):
            np.testing.assert_array_equal(getattr(loaded.encoder.feature_map, name), getattr(bank.encoder.feature_map, name))
        # the stored encoder gives the same offsets as the one that was saved
        np.testing.assert_allclose(loaded.encoder.offsets([["i3", "i1"]], [[4.0, 2.0]]),
                                   bank.encoder.offsets([["i3", "i1"]], [[4.0, 2.0]]))
        with pytest.raises(KeyError, match="i9"):
            loaded.encoder.offsets([["i9"]], [[1.0]])
    else:
        assert loaded.summaries is None and loaded.offsets is None and loaded.projections is None
        assert loaded.initial_codes is None and loaded.random_step_codes is None and loaded.encoder is None
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


def test_manifest_fingerprint_reads_a_published_copy_and_nothing_else(tmp_path):
    from recbole_uip.data.atomic import MANIFEST_NAME, manifest_fingerprint

    assert manifest_fingerprint(tmp_path / "missing") is None
    (tmp_path / MANIFEST_NAME).write_text('{"fingerprint": "abc", "fields": []}')
    assert manifest_fingerprint(tmp_path) == "abc"
    (tmp_path / MANIFEST_NAME).write_text('{"fingerprint": "ab')                  # torn
    assert manifest_fingerprint(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text('["abc"]')
    assert manifest_fingerprint(tmp_path) is None
