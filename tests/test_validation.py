"""Every bad input is refused before the LLM loads, with one message that names the file, the line or the key, and
how to fix it; a failed write publishes nothing and keeps the previous folder.

Each case breaks one thing in a copy of the toy dataset and runs ``python -m recbole_uip infer`` with the LLM loader
replaced by one that fails the test: an error that comes after the LLM would have loaded is a test failure.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from conftest import write_dataset

TOY = "toy"


def _edit(path: Path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def no_item_file(folder):
    (folder / f"{TOY}.item").unlink()


def item_file_without_text(folder):
    (folder / f"{TOY}.item").write_text("item_id:token\tprice:float\n1\t2.5\n")


def header_without_types(folder):
    _edit(folder / f"{TOY}.inter", lambda b: b.replace(b"rating:float", b"rating", 1))


def unknown_type(folder):
    _edit(folder / f"{TOY}.inter", lambda b: b.replace(b"rating:float", b"rating:int", 1))


def comma_separated(folder):
    _edit(folder / f"{TOY}.inter", lambda b: b.replace(b"\t", b","))


def non_utf8_bytes(folder):
    lines = _lines(folder / f"{TOY}.item")
    lines[3] = lines[3].replace(b"\n", b"\xe9\xff\n")
    (folder / f"{TOY}.item").write_bytes(b"".join(lines))


def empty_item_texts(folder):
    (folder / f"{TOY}.item").write_text("item_id:token\tmovie_title:token_seq\tclass:token_seq\n"
                                        + "".join(f"{i}\t\t\n" for i in range(1, 13)))


def duplicate_user_rows(folder):
    lines = _lines(folder / f"{TOY}.user")
    (folder / f"{TOY}.user").write_bytes(b"".join(lines + [lines[2]]))


def non_numeric_rating(folder):
    lines = _lines(folder / f"{TOY}.inter")
    fields = lines[5].split(b"\t")
    fields[2] = b"four"
    lines[5] = b"\t".join(fields)
    (folder / f"{TOY}.inter").write_bytes(b"".join(lines))


def nan_timestamp(folder):
    lines = _lines(folder / f"{TOY}.inter")
    fields = lines[7].rstrip(b"\n").split(b"\t")
    fields[3] = b"NaN"
    lines[7] = b"\t".join(fields) + b"\n"
    (folder / f"{TOY}.inter").write_bytes(b"".join(lines))


def truncated_last_line(folder):
    data = (folder / f"{TOY}.inter").read_bytes().rstrip(b"\n")
    (folder / f"{TOY}.inter").write_bytes(data[: data.rindex(b"\t")])      # cut inside the last line


def no_interactions(folder):
    _edit(folder / f"{TOY}.inter", lambda b: b.split(b"\n", 1)[0] + b"\n")


def single_user(folder):
    lines = _lines(folder / f"{TOY}.inter")
    (folder / f"{TOY}.inter").write_bytes(b"".join([lines[0]] + [l for l in lines[1:] if l.startswith(b"1\t")]))


def nothing(folder):
    pass


CASES = {
    # name: (break the dataset, extra flags, what the message must say)
    "no .item file": (no_item_file, [], r"toy\.item does not exist.*Add a \.item file"),
    "no usable text field": (item_file_without_text, [], r"toy\.item has no text field.*uip_item_text_fields"),
    "header without types": (header_without_types, [], r"toy\.inter:1: header column 'rating' is not of the form 'name:type'"),
    "unknown type": (unknown_type, [], r"toy\.inter:1: field 'rating' has type 'int'; atomic types are"),
    "wrong separator": (comma_separated, [], r"toy\.inter:1: the header looks separated by ',', but field_separator is"),
    "non-UTF-8 bytes": (non_utf8_bytes, [], r"toy\.item:4: not valid utf-8 text .*Re-encode the file"),
    "empty item texts": (empty_item_texts, [], r"toy\.item gives no text \(fields movie_title, class\) for any item"),
    "duplicate user rows": (duplicate_user_rows, [], r"toy\.user:\d+: user_id '2' appears again \(first on line 3\)"),
    "non-numeric rating": (non_numeric_rating, [], r"toy\.inter:6: field 'rating' has the value 'four', not a finite"),
    "NaN timestamp": (nan_timestamp, [], r"toy\.inter:8: field 'timestamp' has the value 'NaN', not a finite"),
    "truncated last line": (truncated_last_line, [], r"toy\.inter:\d+: expected 4 values .*no newline: was the file cut off"),
    "no interactions": (no_interactions, [], r"toy\.inter: no interactions"),
    "a single user": (single_user, [], r"uip_codebook_size: a codebook of 3 IDs needs at least 3 users .* has 1"),
    "codebook larger than the users": (nothing, ["--uip_codebook_size=64"], r"uip_codebook_size: a codebook of 64 IDs needs at least 64 users"),
    "LLM folder missing": (nothing, ["--uip_llm=/no/such/model"], r"Cannot load the causal LM '/no/such/model': the folder .* does not exist"),
    "LLM folder without config": (nothing, ["--uip_llm={tmp}"], r"has no config\.json"),
    "hub id while offline": (nothing, ["--uip_llm=someone/not-cached-model", "HF_HUB_OFFLINE=1"], r"offline \(HF_HUB_OFFLINE is set\) and it is not in the local Hugging Face cache"),
    "output folder not writable": (nothing, ["--output_dir={tmp}/a_file/out"], r"uip_output_dir: cannot write to .*a_file/out .*--uip_output_dir=DIR"),
    "unknown uip key": (nothing, ["--uip_codebok_size=4"], r"uip_codebok_size"),
    "uip value out of range": (nothing, ["--uip_epochs=-1"], r"'uip_epochs' must be an integer >= 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_the_llm_with_one_clear_message(case, tmp_path, tiny_llm_dir, monkeypatch, capsys):
    import recbole_uip.inference.llm as llm_module
    from recbole_uip.__main__ import main

    def loading_fails_the_test(*args, **kwargs):
        raise AssertionError(f"{case}: the LLM was loaded before the input was refused")

    monkeypatch.setattr(llm_module, "load_frozen_llm", loading_fails_the_test)
    write_dataset(tmp_path / "data", n_users=10, n_items=12, per_user=6)
    (tmp_path / "a_file").write_text("not a folder")
    break_dataset, extra, message = CASES[case]
    break_dataset(tmp_path / "data" / TOY)
    flags = {"dataset": TOY, "data_path": tmp_path / "data", "uip_llm": tiny_llm_dir, "uip_llm_dtype": "float32",
             "uip_codebook_size": 3, "output_dir": tmp_path / "out", "show_progress": "false", "state": "WARNING",
             "checkpoint_dir": tmp_path / "saved", "uip_epochs": 0}
    for flag in extra:
        key, value = flag.split("=", 1)
        if key.startswith("--"):
            flags[key[2:]] = value.replace("{tmp}", str(tmp_path))
        else:
            monkeypatch.setenv(key, value)
    code = main(["infer", *(f"--{key}={value}" for key, value in flags.items())])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err                              # one message
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / f"{TOY}-uip").exists()    # nothing published


def test_crlf_line_ends_give_the_same_histories_as_lf(tmp_path, tiny_llm_dir):
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.quick_start import build_config, check_dataset_files

    from conftest import uip_config_dict

    def histories(root: Path):
        config = build_config("DeepFM", TOY, None, {**uip_config_dict(tmp_path, tiny_llm_dir), "data_path": str(root)})
        settings = UIPSettings.from_config(config)
        found = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
        return found.users, found.item_texts, [list(i) for i in found.items], [list(r) for r in found.ratings]

    write_dataset(tmp_path / "lf", n_users=10, n_items=12, per_user=6)
    write_dataset(tmp_path / "crlf", n_users=10, n_items=12, per_user=6)
    for suffix in ("inter", "item", "user"):
        _edit(tmp_path / "crlf" / TOY / f"{TOY}.{suffix}", lambda b: b.replace(b"\n", b"\r\n"))
    assert histories(tmp_path / "crlf") == histories(tmp_path / "lf")


def test_huge_item_texts_are_cut_with_one_warning(tmp_path, caplog):
    from recbole_uip.data.behaviour import MAX_ITEM_TEXT_CHARS, ItemTexts

    path = tmp_path / "x.item"
    path.write_text("item_id:token\ttitle:token_seq\n1\tshort title\n2\t" + " ".join(["word"] * 400) + "\n")
    with caplog.at_level(logging.WARNING):
        texts = ItemTexts(path, "item_id", ["title"], None)
    assert texts.get("1") == "short title"
    assert len(texts.get("2")) <= MAX_ITEM_TEXT_CHARS and texts.get("2").endswith("word")
    assert texts.cut == 1 and "1 item texts are longer than" in caplog.text and "item '2'" in caplog.text


def test_a_full_disk_while_the_bank_is_written_publishes_nothing_and_keeps_the_previous_folder(
        tmp_path, tiny_llm_dir, monkeypatch, capsys):
    import numpy as np

    from recbole_uip.__main__ import main

    write_dataset(tmp_path / "data", n_users=10, n_items=12, per_user=6)
    flags = [f"--dataset={TOY}", f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
             f"--output_dir={tmp_path / 'out'}", "--show_progress=false", "--state=WARNING", "--uip_epochs=0"]
    assert main(["infer", *flags, "--uip_codebook_size=3"]) == 0
    target = tmp_path / "out" / f"{TOY}-uip"
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    assert main(["infer", *flags, "--uip_codebook_size=4"]) == 2          # another bank: written anew
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was published" in err and "previous complete folder" in err
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before                                                # the previous folder, byte for byte
    assert json.loads((target / "uip_manifest.json").read_text())["fields"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith((".partial", ".old"))]
