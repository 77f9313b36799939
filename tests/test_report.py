"""The profile-report measures: code usage, NMI against shuffled IDs, attribute buckets, and typical values (lift)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recbole_uip.data.atomic import AtomicTable
from recbole_uip.inference.soft_profiles import SoftProfiles
from recbole_uip.report import (
    bucket_numeric, encoder_column_weights, item_labels, lift_table, nmi_permutation_test, quantile_edges, render_profile_report, usage_and_perplexity,
    user_attribute_labels,
)


# ------------------------------------------------------------------------------------------------ usage
def test_usage_counts_every_code_and_perplexity_is_effective_number_of_codes():
    counts, perplexity = usage_and_perplexity([0, 1, 2, 3, 0, 1, 2, 3], 5)
    assert counts.tolist() == [2, 2, 2, 2, 0]          # an unused code is counted as 0, not dropped
    assert perplexity == pytest.approx(4.0)             # four equally used codes
    counts, perplexity = usage_and_perplexity([2, 2, 2], 4)
    assert counts.tolist() == [0, 0, 3, 0]
    assert perplexity == pytest.approx(1.0)             # a collapsed codebook


def test_perplexity_is_lower_for_skewed_usage():
    _, even = usage_and_perplexity([0] * 5 + [1] * 5, 2)
    _, skewed = usage_and_perplexity([0] * 9 + [1], 2)
    assert even == pytest.approx(2.0)
    assert 1.0 < skewed < 1.5


# ------------------------------------------------------------------------------------------------ NMI
def test_nmi_of_ids_that_encode_the_attribute_is_one_and_beats_the_shuffled_reference():
    rng = np.random.default_rng(1)
    attribute = rng.choice(["F", "M"], size=200)
    ids = np.where(attribute == "F", 3, 7)
    test = nmi_permutation_test(ids, attribute, permutations=100, seed=0)
    assert test.nmi == pytest.approx(1.0)
    assert test.shuffled_mean < 0.05
    assert test.p_value == pytest.approx(1 / 101)       # no permutation reaches the observed value


def test_nmi_of_independent_ids_is_at_chance_level():
    rng = np.random.default_rng(2)
    attribute = rng.choice(list("abcd"), size=400)
    ids = rng.integers(0, 8, size=400)
    test = nmi_permutation_test(ids, attribute, permutations=200, seed=0)
    assert test.nmi < 0.05
    assert abs(test.nmi - test.shuffled_mean) < 3 * test.shuffled_std + 1e-9
    assert test.p_value > 0.01


def test_nmi_permutation_test_is_deterministic_and_checks_lengths():
    ids, values = [0, 1, 1, 0, 2, 2], list("xyyxzx")
    assert nmi_permutation_test(ids, values, 50, seed=3) == nmi_permutation_test(ids, values, 50, seed=3)
    with pytest.raises(ValueError, match="same users"):
        nmi_permutation_test([0, 1], ["a"])


# ------------------------------------------------------------------------------------------------ buckets
def test_bucket_numeric_uses_half_open_buckets_and_marks_non_numbers():
    labels = bucket_numeric(["17", "18", "24", "25", "59", "60", "73", "", "n/a"], [18, 25, 60])
    assert labels == ["<18", "18-24", "18-24", "25-59", "25-59", ">=60", ">=60", "unknown", "unknown"]


def test_quantile_edges_split_into_equal_buckets():
    values = [str(v) for v in range(1, 101)]           # 1..100
    edges = quantile_edges(values, 4)
    assert edges == [26.0, 51.0, 76.0]
    labels = bucket_numeric(values, edges)
    assert sorted(np.unique(labels, return_counts=True)[1].tolist()) == [25, 25, 25, 25]


def test_user_attribute_labels_keeps_small_token_fields_buckets_numbers_and_skips_the_rest():
    rows = [[str(u), str(18 + u), "MF"[u % 2], f"job{u % 3}", f"{10000 + u:05d}X", str(u % 8)] for u in range(60)]
    table = AtomicTable(path=Path("toy.user"), header="", rows=rows,
                        fields=["user_id", "age", "gender", "occupation", "zip_code", "uip_hobby"],
                        types=["token"] * 6)
    users = ["3", "0", "unknown-user"]
    out = user_attribute_labels(table, "user_id", users, max_values=50, buckets=3)
    skipped = out.pop("_skipped")
    assert set(out) == {"age", "gender", "occupation"}         # never the ID itself or a uip_* column
    assert out["gender"] == (["F", "M", ""], "as is")           # rows in `users` order; unknown user -> ""
    assert out["age"][0][:2] == ["<38", "<38"] and out["age"][0][2] == "unknown"
    assert "quantile buckets" in out["age"][1]
    assert set(skipped) == {"zip_code"}                        # 60 distinct non-numeric values


# ------------------------------------------------------------------------------------------------ lift
def test_lift_table_finds_the_value_over_represented_in_each_group():
    # 4 users: group 0 watches mostly "horror", group 1 mostly "comedy"; "drama" is 20% of both groups.
    counts = np.array([[8, 0, 2], [6, 2, 2], [0, 8, 2], [1, 7, 2]], dtype=float)
    labels = ["horror", "comedy", "drama"]
    table = lift_table([0, 0, 1, 1], counts, labels, top=3, min_count=1)
    assert [v.label for v in table[0]] == ["horror"]           # drama (lift < 1) and comedy are not typical
    top0 = table[0][0]
    assert top0.count == 14
    assert top0.group_share == pytest.approx(14 / 20)
    assert top0.overall_share == pytest.approx(15 / 40)
    assert top0.lift == pytest.approx((14 / 20) / (15 / 40))
    assert table[1][0].label == "comedy"


def test_lift_table_respects_min_count_top_and_orders_by_lift():
    counts = np.array([[1, 5, 30, 0], [0, 5, 30, 0], [0, 0, 10, 40], [0, 0, 10, 40]], dtype=float)
    table = lift_table([0, 0, 1, 1], counts, ["rare", "b", "c", "d"], top=5, min_count=2)
    labels0 = [v.label for v in table[0]]
    assert "rare" not in labels0                                # one interaction only: below min_count
    assert labels0 == ["b", "c"]                                # b: lift 2.4 > c: lift 1.8
    assert table[0][0].lift > table[0][1].lift
    assert len(lift_table([0, 0, 1, 1], counts, ["rare", "b", "c", "d"], top=1, min_count=2)[0]) == 1


def test_lift_table_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected"):
        lift_table([0, 1], np.ones((2, 3)), ["a", "b"])


def test_item_labels_name_items_by_title_from_the_item_file_and_fall_back_to_the_token():
    from types import SimpleNamespace

    dataset = SimpleNamespace(iid_field="item_id", field2id_token={"item_id": ["[PAD]", "7", "3", "9"]})
    table = AtomicTable(path=Path("toy.item"), header="", fields=["item_id", "movie_title"], types=["token", "token_seq"],
                        rows=[["3", "Toy Story"], ["7", "Heat"]])
    assert item_labels(dataset, table, "movie_title") == ["[PAD]", "Heat", "Toy Story", "9"]   # by internal id
    assert item_labels(dataset, None, "movie_title") == ["[PAD]", "7", "3", "9"]
    assert item_labels(dataset, table, "no_such_field") == ["[PAD]", "7", "3", "9"]


# ------------------------------------------------------------------------------------------------ encoder
def test_the_untrained_encoder_weighs_every_column_of_z_alike_and_a_stretched_column_by_its_square():
    torch = pytest.importorskip("torch")
    soft = SoftProfiles(torch.zeros(2, 16), 5, 0.3, torch.Generator().manual_seed(0))
    start = soft.encoder.detach().numpy()                                              # (P, D, k)
    np.testing.assert_allclose(encoder_column_weights(start), np.ones((2, 5)), rtol=1e-5)
    stretched = start.copy()
    stretched[1, :, 3] *= 2.0                                   # profile 1 measures column 3 twice as far
    weights = encoder_column_weights(stretched)
    np.testing.assert_allclose(weights[0], np.ones(5), rtol=1e-5)
    assert weights[1, 3] / weights[1, 0] == pytest.approx(4.0, rel=1e-5)
    assert weights[1].mean() == pytest.approx(1.0)


def test_the_best_gain_along_a_step_is_the_top_of_the_quadratic_through_the_two_shortest_lengths():
    from recbole_uip.report import best_gain_along_step

    slope, curvature = 0.5, 300.0
    tried = {t: 1.2 - slope * t + curvature * t * t for t in (0.0, 0.003, 0.01, 0.03)}
    tried[0.03] += 5.0                                      # the longer lengths do not enter the fit
    assert best_gain_along_step(tried) == pytest.approx(slope**2 / (4 * curvature), rel=1e-6)
    ascent = {t: 1.2 + slope * t + curvature * t * t for t in (0.0, 0.003, 0.01)}
    assert best_gain_along_step(ascent) == 0.0
    assert best_gain_along_step({0.0: 1.0, 0.003: 0.9}) is None


# ------------------------------------------------------------------------------------------------ render
def test_a_steps_z_is_the_taken_lengths_or_in_parentheses_the_refused_best_ones():
    from recbole_uip.inference.gradient_agreement import format_step_z

    gain_z = {0.003: 2.21, 0.01: 1.5}
    assert format_step_z(0.003, gain_z, 1.5) == "2.21"                 # the step taken, not the best length
    assert format_step_z(0.0, gain_z, 1.5) == "(1.50)"                 # refused by the gate
    assert format_step_z(0.0, {0.003: -1.0}, None) == "-"              # no length beat 0
    assert format_step_z(0.003, {"0.003": 2.21}, 2.21) == "2.21"       # a bank's JSON history keys by strings
    assert format_step_z({"hobby": 0.003, "background": 0.0}, {"hobby": gain_z, "background": {0.003: 0.2}},
                         {"hobby": 2.21, "background": 0.2}) == "hobby 2.21, background (0.20)"


def test_render_profile_report_lists_every_section():
    report = {
        "dataset": "toy", "users": 4, "llm": "tiny", "profiles": ["hobby"], "codebook_sizes": {"hobby": 2},
        "fingerprint": "abcdef0123456789", "inference_seconds": 1.5,
        "usage": {"UIP hobby": {"counts": [2, 2], "perplexity": 2.0, "num_codes": 2}},
        "attributes": {"gender": "as is"}, "attributes_skipped": {"zip_code": "60 distinct token values"},
        "nmi": {"gender": {"UIP hobby": {"nmi": 0.5, "shuffled_mean": 0.1, "shuffled_std": 0.05, "p_value": 0.02}}},
        "attribute_field": "class",
        "encoder_weights": {"columns": ["pc1", "generosity"], "profiles": {"hobby": [0.5, 1.5]}},
        "encoder_steps": [{"round": 1, "step": 0.0, "gain": 0.0, "agreement": {}},
                          {"round": 2, "step": 0.003, "gain": 0.0012, "z": "2.50",
                           "agreement": {"hobby": {"cosine": 0.25, "signal_share": 0.4}}},
                          {"round": 3, "step": {"hobby": 0.0}, "gain": 0.0, "z": "hobby (0.23)", "agreement": {}}],
        "typical": {"UIP hobby": {"0": {"users": 2, "items": [{"label": "A|B", "lift": 2.0, "count": 12}],
                                        "attributes": [{"label": "Horror", "lift": 1.8, "count": 30}]}}},
    }
    text = render_profile_report(report, header="configuration line")
    assert "configuration line" in text
    assert "| UIP hobby | 2 | [2, 2] | 2.00 |" in text
    assert "0.5000 (0.1000, p=0.020)" in text
    assert "zip_code (60 distinct token values)" in text
    assert "| profile | pc1 | generosity |" in text and "| hobby | 0.50 | 1.50 |" in text
    assert "| 1 | 0 | +0.0000 | ? | - | - |" in text                    # a bank from before z was recorded
    assert "| 2 | 0.003 | +0.0012 | 2.50 | - | 0.250 (0.40) |" in text
    assert "| 3 | hobby 0 | +0.0000 | hobby (0.23) | - | - |" in text
    assert "Horror (1.80, 30)" in text and "A/B (2.00, 12)" in text   # '|' in a title cannot break the table
    assert "held-out AUC of the IDs" not in text                      # no column where no step was chosen by it

    report["encoder_steps"][1]["ids_auc"] = "0.7338 (no step 0.7226)"        # uip_line_search_criterion: ctr
    text = render_profile_report(report)
    assert "| round | step | validation objective gain | z | at best | held-out AUC of the IDs | hobby |" in text
    assert "| 2 | 0.003 | +0.0012 | 2.50 | - | 0.7338 (no step 0.7226) | 0.250 (0.40) |" in text
    assert "| 1 | 0 | +0.0000 | ? | - | - | - |" in text


def test_the_encoder_steps_carry_the_ids_held_out_auc_where_the_ctr_criterion_chose_them():
    from recbole_uip.report import encoder_steps

    search = {"step": 0.01, "gain": -0.001, "tried": {"0.0": 1.0, "0.01": 1.001}, "gain_z": {"0.01": -0.5},
              "best_z": -0.5, "ctr_auc": {"0.0": 0.72, "0.01": 0.73}}
    steps = encoder_steps([{"round": 1, "line_search": search},
                           {"round": 2, "line_search": {k: v for k, v in search.items() if k != "ctr_auc"}}])
    assert steps[0]["ids_auc"] == "0.7300 (no step 0.7200)" and steps[1]["ids_auc"] is None


def test_no_llm_user_vectors_separate_planted_groups_and_align_with_users(tmp_path, tiny_llm_dir):
    """The genre twin of the encoder input: odd users like genres 0-1, even users 2-3 (conftest's toy data)."""
    from conftest import uip_config_dict, write_dataset
    from recbole_uip.config import UIPSettings
    from recbole_uip.quick_start import build_config
    from recbole_uip.report import attribute_user_vectors, kmeans_ids, normalized_mutual_information

    write_dataset(tmp_path / "data", n_users=30, n_items=24, per_user=10)
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_encoder_dims=1))
    users = [str(u) for u in range(1, 31)] + ["nobody"]
    z = attribute_user_vectors(config, UIPSettings.from_config(config), users)
    # one whitened direction of the genre parts (the planted contrast), then generosity, spread and activity
    assert z.shape == (31, 4) and (z[-1] == 0).all()
    np.testing.assert_array_equal(attribute_user_vectors(config, UIPSettings.from_config(config), users[::-1])[::-1], z)
    ids = kmeans_ids(z[:-1, :1], 2, seed=0)
    assert normalized_mutual_information(ids, [u % 2 for u in range(1, 31)]) > 0.8


def test_rating_statistics_are_the_users_generosity_spread_and_activity_in_the_order_asked(tmp_path, tiny_llm_dir):
    """Generosity (the first column) must follow each user's own mean rating; users the histories lack get zeros."""
    from conftest import uip_config_dict, write_dataset
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.quick_start import build_config, check_dataset_files
    from recbole_uip.report import rating_statistics

    write_dataset(tmp_path / "data", n_users=30, n_items=24, per_user=10)
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir))
    settings = UIPSettings.from_config(config)
    users = [str(u) for u in range(1, 31)] + ["nobody"]
    x = rating_statistics(config, settings, users)
    assert x.shape == (31, 3) and (x[-1] == 0).all()
    np.testing.assert_allclose(x[:-1].mean(0), 0, atol=1e-5)                     # standardised over the users
    np.testing.assert_array_equal(rating_statistics(config, settings, users[::-1])[::-1], x)
    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
    mean_rating = {u: float(r.mean()) for u, r in zip(histories.users, histories.ratings)}
    order = np.argsort([mean_rating[u] for u in users[:-1]])
    assert np.corrcoef(x[:-1, 0], [mean_rating[u] for u in users[:-1]])[0, 1] > 0.9    # generosity
    assert x[order[-1], 0] > x[order[0], 0]
