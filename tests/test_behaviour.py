"""Training histories and their text: the fields found by role whatever load_col says, bad values refused with
file and line before the LLM loads, item texts, users without history, and the tokenised pieces."""

from __future__ import annotations

import logging
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import uip_config_dict, write_dataset
from recbole_uip.data.atomic import AtomicFileError, dataset_files, read_atomic
from recbole_uip.data.behaviour import (
    BehaviourTextError, ItemTexts, TextFields, collect_training_histories, resolve_text_fields,
)

CONFIG = {"field_separator": "\t", "encoding": "utf-8", "ITEM_ID_FIELD": "item_id", "RATING_FIELD": "rating",
          "TIME_FIELD": "timestamp", "data_path": "unused", "dataset": "toy"}
SETTINGS = types.SimpleNamespace(item_text_fields=None, rating_template=" rated {rating:g}")


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def _config_dict(tmp_path, tiny_llm_dir, **overrides) -> dict:
    """The test config; ``load_col=DEFAULT`` leaves load_col to RecBole's default (user and item ids only)."""
    config = uip_config_dict(tmp_path, tiny_llm_dir, **overrides)
    if config["load_col"] is DEFAULT:
        del config["load_col"]
    return config


DEFAULT = object()


def _histories(tmp_path, tiny_llm_dir, name="toy", **overrides):
    from recbole.utils import init_logger

    from recbole_uip.config import UIPSettings
    from recbole_uip.quick_start import build_config, check_dataset_files

    config = build_config("DeepFM", name, None, _config_dict(tmp_path, tiny_llm_dir, **overrides))
    init_logger(config)
    settings = UIPSettings.from_config(config)
    fields = resolve_text_fields(config, settings, check_dataset_files(config))
    return collect_training_histories(config, settings, fields, logging.getLogger("test")), settings


# ------------------------------------------------------------------------------------ fields by their role
def test_a_dataset_without_a_preset_gives_the_same_text_as_one_that_loads_every_column(tmp_path, tiny_llm_dir):
    """RecBole's default load_col loads only the ids: the text still gets ratings and time order."""
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import load_frozen_llm

    import torch

    folder = write_dataset(tmp_path / "data")
    plain = tmp_path / "data" / "plain"
    plain.mkdir()
    for suffix in ("inter", "item", "user"):
        shutil.copyfile(folder / f"toy.{suffix}", plain / f"plain.{suffix}")
    full, settings = _histories(tmp_path, tiny_llm_dir)
    bare, _ = _histories(tmp_path, tiny_llm_dir, "plain", load_col=DEFAULT, threshold=None)
    assert bare.fields == full.fields == TextFields(("movie_title", "class"), "rating", "timestamp")
    assert bare.users == full.users and bare.item_ids == full.item_ids
    for a, b in zip(bare.items, full.items, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(bare.ratings, full.ratings, strict=True):
        np.testing.assert_array_equal(a, b)
    # oldest first: the file's timestamps increase within each user, so the order is the file's
    inter = read_atomic(folder / "toy.inter")
    first_user = [row[1] for row in inter.rows if row[0] == full.users[0]]
    written = [full.item_ids[i] for i in full.items[0]]
    assert written == [item for item in first_user if item in written]
    # the timestamps as RecBole loads them (float32), aligned with the items, oldest first (the default load_col
    # loads them too), and cut with them
    times: dict[tuple[str, str], set] = {}                  # a toy user may rate an item twice
    for row in inter.rows:
        times.setdefault((row[0], row[1]), set()).add(float(np.float32(row[3])))
    for user, items, stamps in zip(full.users, full.items, full.times, strict=True):
        assert all(t in times[user, full.item_ids[i]] for t, i in zip(stamps.tolist(), items))
        assert len(stamps) == len(items) and (np.diff(stamps) >= 0).all()
    np.testing.assert_array_equal(bare.times[0], full.times[0])
    assert [len(t) for t in full.truncated([2] * len(full.users)).times] == [2] * len(full.users)
    llm = load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32")
    texts = [BehaviourText(h, settings, llm.tokenizer) for h in (bare, full)]
    assert [t.tokens(0, np.arange(len(bare.items[0])))[0] for t in texts][0] == texts[1].tokens(0, np.arange(len(full.items[0])))[0]
    assert "rated" in llm.tokenizer.decode(texts[0].tokens(0, [0])[0])


def test_the_fields_are_resolved_by_role_and_the_log_says_which(tmp_path, tiny_llm_dir, caplog):
    folder = write_dataset(tmp_path / "data")
    renamed = (folder / "toy.inter").read_text().replace("rating:float", "stars:float").replace("timestamp:float", "date:float")
    (folder / "toy.inter").write_text(renamed)
    with caplog.at_level(logging.INFO):
        histories, _ = _histories(tmp_path, tiny_llm_dir, RATING_FIELD="stars", TIME_FIELD="date", load_col=DEFAULT,
                                  threshold=None)
    assert histories.fields == TextFields(("movie_title", "class"), "stars", "date")
    assert "rating from .inter stars; order by .inter date" in caplog.text
    # the same file under the default role names: no rating, no time; the log and the warning say why
    caplog.clear()
    with caplog.at_level(logging.INFO):
        histories, settings = _histories(tmp_path, tiny_llm_dir, load_col=DEFAULT, threshold=None)
        from recbole_uip.data.behaviour_text import BehaviourText
        from recbole_uip.inference.llm import load_frozen_llm

        import torch

        BehaviourText(histories, settings, load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32").tokenizer,
                      logging.getLogger("test"))
    assert histories.fields.rating is None and histories.fields.time is None and histories.ratings is None
    assert histories.times is None
    assert "RATING_FIELD 'rating' is not a field of toy.inter" in caplog.text
    assert "uip_rating_weight=10 has no effect: the behaviour text writes no rating (RATING_FIELD 'rating' is not" in caplog.text


def test_resolve_text_fields_errors(tmp_path):
    inter = write(tmp_path / "toy.inter", "user_id:token\titem_id:token\trating:token\n1\t1\t5\n")
    files = {"inter": inter}
    with pytest.raises(BehaviourTextError, match="toy.item does not exist"):
        resolve_text_fields(CONFIG, SETTINGS, files)
    files["item"] = write(tmp_path / "toy.item", "item_id:token\tprice:float\n1\t2.5\n")
    with pytest.raises(BehaviourTextError) as info:
        resolve_text_fields(CONFIG, SETTINGS, files)
    message = str(info.value)
    assert str(files["item"]) in message and "fields: item_id, price" in message and "types: token, float" in message
    assert "uip_item_text_fields" in message
    files["item"] = write(tmp_path / "toy.item", "item_id:token\ttitle:token_seq\n1\tStar\n")
    with pytest.raises(BehaviourTextError, match="names year, not in"):
        resolve_text_fields(CONFIG, types.SimpleNamespace(item_text_fields=("title", "year"), rating_template=""), files)
    fields = resolve_text_fields(CONFIG, SETTINGS, files)
    assert fields.rating is None and "RATING_FIELD 'rating' is of type token, not float" in fields.describe()
    assert fields.time is None and "TIME_FIELD 'timestamp' is not a field of toy.inter" in fields.describe()


@pytest.mark.parametrize("value,field", [("abc", "rating"), ("nan", "timestamp"), ("", "rating"), ("inf", "timestamp")])
def test_a_bad_value_in_a_field_the_text_uses_is_refused_with_file_and_line_before_the_llm_loads(
        value, field, tmp_path, tiny_llm_dir):
    from recbole_uip.quick_start import build_config, infer_profiles

    folder = write_dataset(tmp_path / "data")
    lines = (folder / "toy.inter").read_text().splitlines()
    user, item, rating, timestamp = lines[7].split("\t")
    lines[7] = "\t".join([user, item, value if field == "rating" else rating, value if field == "timestamp" else timestamp])
    (folder / "toy.inter").write_text("\n".join(lines) + "\n")
    # an LLM that cannot load: the value must be reported first
    config = build_config("DeepFM", "toy", None, _config_dict(tmp_path, tiny_llm_dir, load_col=DEFAULT, threshold=None,
                                                                uip_llm=str(tmp_path / "no_such_llm")))
    with pytest.raises(AtomicFileError) as info:
        infer_profiles(config)
    assert f"toy.inter:8: field '{field}' has the value {value!r}, not a finite number" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_split_that_loading_the_text_fields_would_change_is_refused(tmp_path, tiny_llm_dir):
    """rm_dup_inter keeps the first duplicate by time when time is loaded, by file order otherwise: the profiles
    would see another training split than the model."""
    folder = write_dataset(tmp_path / "data")
    lines = (folder / "toy.inter").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    duplicated = []
    for row in rows[100:140]:
        user, item, rating, timestamp = row.split("\t")
        duplicated.append("\t".join([user, item, "1", str(int(float(timestamp)) - 10**6)]))  # an older duplicate, later in the file
    (folder / "toy.inter").write_text("\n".join([header] + rows + duplicated) + "\n")
    with pytest.raises(BehaviourTextError, match="changes which interactions RecBole puts in the training split"):
        _histories(tmp_path, tiny_llm_dir, load_col=DEFAULT, threshold=None, rm_dup_inter="first")
    # with the fields in load_col, the run itself sorts by time: nothing to refuse
    histories, _ = _histories(tmp_path, tiny_llm_dir, rm_dup_inter="first")
    assert len(histories) == 24


# ------------------------------------------------------------------------------------------- item texts
def test_item_texts_rendering(tmp_path):
    path = write(tmp_path / "toy.item", "item_id:token\ttitle:token_seq\tgenre:token_seq\tprice:float\n"
                                        "1\tStar Night\tAction Drama\t2\n3\t\t\t1\n")
    texts = ItemTexts(path, "item_id", ["title", "genre"], None)
    assert texts.template == "{title} ({genre})"
    assert texts.get("1") == "Star Night (Action Drama)"
    assert texts.get("2") is None
    assert ItemTexts(path, "item_id", ["title"], None).get("3") is None   # an empty text describes nothing
    custom = ItemTexts(path, "item_id", ["genre", "price"], "{genre} for {price}")
    assert custom.get("1") == "Action Drama for 2"
    with pytest.raises(BehaviourTextError, match="cannot be filled"):
        ItemTexts(path, "item_id", ["title"], "{title} {genre}")


def test_pipeline_refuses_an_item_file_without_text(tmp_path, tiny_llm_dir):
    from recbole_uip.quick_start import build_config, infer_profiles

    folder = write_dataset(tmp_path / "data", n_users=6, n_items=10, per_user=4)
    lines = ["item_id:token\tprice:float"] + [f"{i}\t{i / 2}" for i in range(1, 11)]
    (folder / "toy.item").write_text("\n".join(lines) + "\n")
    load_col = {"inter": ["user_id", "item_id", "rating", "timestamp"], "user": ["user_id", "age", "gender"],
                "item": ["item_id", "price"]}
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, load_col=load_col,
                                                                   uip_llm=str(tmp_path / "no_such_llm")))
    with pytest.raises(BehaviourTextError, match="fields: item_id, price"):
        infer_profiles(config)
    assert not (tmp_path / "out" / "toy-uip").exists()


# ------------------------------------------------------------------------------------ users without history
def test_users_without_training_history_get_the_no_history_token(tmp_path, tiny_llm_dir):
    """User 50 has interactions only in valid/test (they are the latest, split in time order); user 99 has none."""
    from recbole_uip.bank import FeatureBank
    from recbole_uip.data.behaviour import build_training_split
    from recbole_uip.quick_start import build_config, infer_profiles

    folder = write_dataset(tmp_path / "data")
    with open(folder / "toy.inter", "a") as f:
        f.write("50\t3\t5\t990000000\n50\t4\t4\t990000001\n")
    with open(folder / "toy.user", "a") as f:
        f.write("50\t30\tM\n99\t40\tF\n")
    eval_args = {"split": {"RS": [0.98, 0.01, 0.01]}, "order": "TO", "group_by": None, "mode": "labeled"}
    histories, settings = _histories(tmp_path, tiny_llm_dir, eval_args=eval_args)
    assert sorted(histories.users_without_history) == ["50", "99"]
    assert "50" not in histories.users and len(histories.users) == 24

    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, eval_args=eval_args))
    dataset, train = build_training_split(config)
    train_users = set(dataset.id2token(dataset.uid_field, train.inter_feat[dataset.uid_field].numpy()))
    assert "50" not in train_users and "99" not in train_users and len(train_users) == 24
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
    assert dataset_files(target, "toy-uip").keys() == {"inter", "item", "user"}


# ------------------------------------------------------------------------------------------ tokenised text
def test_pieces_are_shared_and_targets_respect_the_budget(tmp_path, tiny_llm_dir):
    import torch

    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import load_frozen_llm

    write_dataset(tmp_path / "data")
    histories, settings = _histories(tmp_path, tiny_llm_dir)
    tokenizer = load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32").tokenizer
    text = BehaviourText(histories, settings, tokenizer)
    pairs = {(int(i), float(r)) for items, ratings in zip(histories.items, histories.ratings) for i, r in zip(items, ratings)}
    assert len(text.piece_ids) == len(pairs) < sum(map(len, histories.items))     # one piece per distinct pair
    user = 3
    ids, flags = text.tokens(user, np.arange(len(histories.items[user])))
    assert len(ids) == len(flags) == text.piece_lengths[text.user_pieces[user]].sum()
    item, rating = histories.items[user][0], histories.ratings[user][0]
    first = tokenizer.decode(text.piece_ids[text.user_pieces[user][0]])
    assert first == f" {histories.item_texts[item]} rated {rating:g};"
    marked = tokenizer.decode([t for t, f in zip(text.piece_ids[text.user_pieces[user][0]], text.rating_flags[text.user_pieces[user][0]]) if f])
    assert marked.strip() == f"rated {rating:g}"
    rng = np.random.default_rng(0)
    for u in range(len(histories)):
        target, rest = text.random_target(u, 20, rng)
        assert len(target) >= 1 and len(rest) >= 1
        assert sorted(np.concatenate([target, rest]).tolist()) == list(range(len(histories.items[u])))
        assert len(target) == 1 or text.piece_lengths[text.user_pieces[u][target]].sum() <= 20
        newest = text.newest_target(u, 20)
        assert newest[-1] == len(histories.items[u]) - 1 and (np.diff(newest) == 1).all()
    assert len(text.tokens(0, np.arange(len(histories.items[0])), budget=5)[0]) == 5
