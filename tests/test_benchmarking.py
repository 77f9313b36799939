"""The benchmarks' shared module (statistics, run records, result files) and the generalisation benchmark run end
to end on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import import_benchmark, write_dataset
from recbole_uip.benchmarking import (
    RESULTS, goal_verdict, held_out_positions, mean_ci, paired_test, parse_known_with_overrides, results_dir,
    write_result,
)
from recbole_uip.token_probe.group_scores import GroupTokens, group_modes, relative_part_differences
from recbole_uip.token_probe.groups import fit_group_tokens_jointly, relative_choice, shuffled_members
from recbole_uip.token_probe.report import describe_objective, render
from recbole_uip.token_probe.stages import (distillation_teacher, still_learning, teacher_contexts, train_encoder,
                                           use_mult_vae_features)
from recbole_uip.utils import write_json_atomic


def test_mean_ci_is_the_student_interval():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # t(0.975, 3) = 3.182; std 1.291; half width 3.182 * 1.291 / 2
    assert high - mean == pytest.approx(3.1824 * 1.2910 / 2, rel=1e-3) and mean - low == pytest.approx(high - mean)
    assert np.isnan(mean_ci([1.0])[1])


def test_paired_test():
    diff, std, p = paired_test([1.0, 2.0, 3.5], [0.5, 1.0, 3.0])
    assert diff == pytest.approx(2 / 3) and std == pytest.approx(np.std([0.5, 1.0, 0.5], ddof=1)) and 0 < p < 0.2
    assert np.isnan(paired_test([1.0, 2.0], [0.0, 1.0])[2])        # a constant difference has no p-value


def test_interval_summary_leaves_out_missing_values_pairwise():
    from recbole_uip.benchmarking import interval_summary

    values = {"own": np.array([1.0, 2.0, np.nan, 4.0]), "other": np.array([2.0, 2.5, 3.0, np.nan])}
    means, differences = interval_summary(values, [("own", "other")])
    assert means["own"]["mean"] == pytest.approx(7 / 3) and means["other"]["mean"] == pytest.approx(7.5 / 3)
    diff = differences["own_minus_other"]                          # users 0 and 1 only: -1.0 and -0.5
    assert diff["mean"] == pytest.approx(-0.75) and diff["share_below_zero"] == 1.0
    assert diff["ci"][0] < diff["mean"] < diff["ci"][1]


def test_overrides_are_parsed_as_yaml_and_unknown_arguments_refused():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset")
    args, overrides = parse_known_with_overrides(parser, ["--dataset=x", "--uip_epochs=2", "--uip_profiles={a: 'A:'}"])
    assert args.dataset == "x" and overrides == {"uip_epochs": 2, "uip_profiles": {"a": "A:"}}
    with pytest.raises(SystemExit):
        parse_known_with_overrides(parser, ["stray"])


def test_results_folders_are_named_by_the_settings_fingerprint(tmp_path):
    from recbole_uip.benchmarking import settings_fingerprint

    settings = {"epochs": 0, "codebook_sizes": {"hobby": 8, "background": 8}}
    name = settings_fingerprint(settings)
    assert len(name) == 12 and int(name, 16) >= 0
    assert settings_fingerprint({"codebook_sizes": {"background": 8, "hobby": 8}, "epochs": 0}) == name  # key order
    assert settings_fingerprint({**settings, "epochs": 3}) != name
    record = {"dataset": "ml-100k", "settings": settings, "date": "2026-12-01", "command": ["x"]}
    assert results_dir(record, tmp_path) == tmp_path / "ml-100k" / name
    assert results_dir({**record, "date": "2026-12-02", "command": ["y"]}, tmp_path) == tmp_path / "ml-100k" / name


def test_the_repositorys_results_are_in_their_settings_folders_and_indexed():
    """Every folder under results/<dataset>/ (archive/, convert/ and diagnostics/ aside) holds run records whose
    settings hash to its name, has its settings.json, and is listed in results/README.md."""
    from recbole_uip.benchmarking import RESULTS, folder_records, settings_fingerprint

    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    folders = [f for d in RESULTS.iterdir() if d.is_dir() and d.name not in ("archive", "convert", "diagnostics")
               for f in d.iterdir() if f.is_dir()]
    assert folders
    for folder in folders:
        records = folder_records(folder)
        assert records, f"{folder}: no result with a run record"
        assert {settings_fingerprint(r["settings"]) for r in records.values()} == {folder.name}, folder
        assert (folder / "settings.json").is_file(), folder
        assert f"{folder.parent.name}/{folder.name}/" in index, f"{folder} is not in results/README.md"


def test_write_result(tmp_path):
    folder = tmp_path / "ml-100k" / "x"
    json_path, md_path = write_result(folder, "x", {"a": 1}, "# title\n\n")
    assert json.loads(json_path.read_text()) == {"a": 1} and md_path.read_text() == "# title\n"


def test_generalisation_benchmark_holds_out_the_newest_items_and_reports_every_mode(tmp_path, tiny_llm_dir, monkeypatch):
    generalisation = import_benchmark("generalisation")
    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20",
            f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            "--uip_epochs=1", "--uip_codebook_size=3", "--uip_line_search_users=4", "--show_progress=false",
            f"--checkpoint_dir={tmp_path / 'saved'}"]
    assert generalisation.main(argv) == 0
    folders = list((tmp_path / "results" / "toy").iterdir())
    assert len(folders) == 1                                              # named by the settings' fingerprint
    data = json.loads((folders[0] / "generalisation.json").read_text())
    assert folders[0] == results_dir(data["record"], tmp_path / "results")
    for key in ("own", "mean", "other_user", "no_profile", "codes"):
        assert np.isfinite(data[key])
    low, high = data["own_minus_mean_ci"]
    assert low <= data["own"] - data["mean"] <= high
    assert data["users_evaluated"] == 24 and 0 < data["held_out_tokens_mean"] <= 20 + 15
    assert data["record"]["dataset"] == "toy" and data["record"]["settings"]["epochs"] == 1
    assert str(tmp_path) not in json.dumps(data["record"])               # no machine paths in the record
    rating = data["rating_tokens"]                                        # the toy text marks its ratings
    assert set(rating["modes"]) == {"own", "mean", "other_user", "no_profile", "codes"}
    assert rating["modes"]["own"]["mean"] != data["own"] and np.isfinite(rating["modes"]["own"]["mean"])
    markdown = (folders[0] / "generalisation.md").read_text()
    assert "Goal" in markdown and "rating tokens alone" in markdown
    assert "the gap is the user's" in markdown or "not shown to be the user's" in markdown   # own - another user's
    assert json.loads((folders[0] / "settings.json").read_text())["settings"] == data["record"]["settings"]
    # the collaborative models' reference on the same held-out items: what the count-reference benchmark gives them
    assert set(data["count_reference"]) == {"set", "recent", "sequence"} and "For scale, collaborative models" in markdown
    count_reference = import_benchmark("count_reference")
    assert count_reference.main([a for a in argv if a.split("=")[0] in ("--dataset", "--holdout_tokens", "--data_path",
                                                                         "--uip_llm", "--uip_llm_dtype")]
                                + [f"--results={tmp_path / 'counts'}", "--users=0"]) == 0
    (counts,) = (tmp_path / "counts" / "toy").glob("*/count_reference.json")
    (every,) = json.loads(counts.read_text())["summaries"]
    for model in ("set", "recent", "sequence"):
        assert data["count_reference"][model]["mean"] == pytest.approx(every["models"][model]["gain_per_token"]["mean"])


def published(results, name: str):
    """The file ``name`` (a glob pattern; the first match) that a benchmark run with ``--results=results`` on the
    toy dataset published in its settings folder, ``results/toy/<fingerprint>/``."""
    return next((results / "toy").glob(f"*/{name}"))


def toy_probe_argv(tmp_path, tiny_llm_dir) -> list[str]:
    """The token probe's flags for a small run on ``write_dataset``'s toy data with the tiny LLM: 5 probed users,
    3 fit steps, one shift pass over 6 users, no oracle; results still to be named."""
    return ["--dataset=toy", "--holdout_tokens=20", "--users=5", "--fit_steps=3", "--shift_users=6",
            "--shift_passes=1", f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}",
            "--uip_llm_dtype=float32", "--uip_batch_size=4", "--show_progress=false", "--oracle=false",
            f"--checkpoint_dir={tmp_path / 'saved'}"]


@pytest.mark.parametrize("resample,objective", [(False, "plain"), (True, "weighted"), (False, "distil")])
def test_token_probe_fits_each_users_tokens_and_reports_every_difference(tmp_path, tiny_llm_dir, resample, objective):
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--users=5",
            "--fit_steps=3", "--shift_users=6", "--shift_passes=1", f"--data_path={tmp_path / 'data'}",
            f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32", "--uip_batch_size=4", "--show_progress=false",
            f"--checkpoint_dir={tmp_path / 'saved'}", f"--resample={resample}", f"--fit_objective={objective}"]
    argv += ["--keep=0.25,0.75"] if objective == "plain" else []        # own tokens shrunk towards the mean
    assert token_probe.main(argv) == 0
    folder, = (tmp_path / "results" / "toy").iterdir()
    name = ("token_probe" + ("_resampled" if resample else "") + ("" if objective == "plain" else "_" + objective)
            + ("_keep" if objective == "plain" else ""))
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["resample"] is resample and data["fit_objective"] == objective
    assert data["users"] == 5 and data["shift_users"] == 6 and len(data["shift_nll"]) == 1
    for mode in ("own", "mean", "other_user", "shared", "oracle", "own_on_fitted_text", "mean_on_fitted_text"):
        assert np.isfinite(data["modes"][mode]["mean"])
    for mode in ("own", "mean", "other_user", "own_halfway", "shared", "oracle"):  # the held-out rating tokens alone
        assert np.isfinite(data["modes"]["rating_" + mode]["mean"])
        assert data["modes"]["rating_" + mode]["mean"] != data["modes"][mode]["mean"]
    assert "rating_own_on_fitted_text" not in data["modes"]
    assert data["modes"]["own_halfway"]["mean"] not in (data["modes"]["own"]["mean"], data["modes"]["mean"]["mean"])
    for key in ("own_minus_mean", "own_minus_other_user", "mean_minus_shared", "oracle_minus_mean",
                "own_on_fitted_text_minus_mean_on_fitted_text", "own_halfway_minus_mean", "rating_own_minus_rating_mean",
                "rating_own_minus_rating_other_user", "rating_own_halfway_minus_rating_mean",
                "rating_mean_minus_rating_shared", "rating_oracle_minus_rating_mean"):
        low, high = data["differences"][key]["ci"]
        assert low <= data["differences"][key]["mean"] <= high
    # fitted on the very text it is scored on, each user's tokens beat the mean of the fitted tokens
    assert data["differences"]["oracle_minus_mean"]["share_below_zero"] == 1.0
    per_user = data["per_user"]                     # every user's score per mode, for pairing runs user by user
    assert len(set(per_user["users"])) == 5 and set(per_user) == {"users", *data["modes"]}
    own, mean = np.array(per_user["own"]), np.array(per_user["mean"])
    assert len(own) == 5 and np.mean(own - mean) == pytest.approx(data["differences"]["own_minus_mean"]["mean"])
    report = (folder / f"{name}.md").read_text()
    assert "goal" in report and "own - mean (held-out rating tokens)" in report
    keeps = {"own_keep25", "own_keep75"}
    if objective == "plain":
        assert data["keep"] == [0.25, 0.75] and keeps <= set(data["modes"])
        assert {"own_keep25_minus_mean", "rating_own_keep75_minus_rating_mean"} <= set(data["differences"])
        shrunk = [data["modes"][m]["mean"] for m in ("own", "own_keep75", "own_halfway", "own_keep25", "mean")]
        assert len(set(shrunk)) == 5                                    # five different tokens, five scores
        assert "own kept 25%, shrunk 75% towards the mean - mean (held-out text)" in report
        for bad in ("--keep=1", "--keep=0", "--keep=0.5,0.5", "--keep=a"):     # once: the parser is the same
            with pytest.raises(SystemExit):
                token_probe.parse_args(["--dataset=toy", bad])
    else:
        assert not keeps & set(data["modes"])
    assert "the gap is the user's" in report or "not shown to be the user's" in report
    assert ("M-step's objective" in report) is (objective == "weighted")
    assert ("distillation" in report) is (data.get("distil_context_tokens") == 128) is (objective == "distil")
    with pytest.raises(SystemExit):                                  # distillation fits one draw to its teacher
        token_probe.parse_args(["--dataset=toy", "--fit_objective=distil", "--resample=true"])
    assert str(tmp_path) not in json.dumps(data["record"])


def test_token_probe_says_when_a_stage_stopped_while_still_learning():
    """``still_learning``: the last pass's drop where it exceeds 1% of the loss; the report flags such a shift."""
    assert still_learning([2.2707, 2.2080]) == pytest.approx(0.0627)
    assert still_learning([2.65, 2.64]) is None                     # 0.4%: converged enough
    assert still_learning([2.0, 2.1]) is None and still_learning([2.0]) is None
    # a real record: the genre-only text's probe, whose shift was still falling after 16 passes (1.9361 -> 1.8892)
    data = json.loads((RESULTS / "ml-100k" / "5068856ecb02" /
                       "token_probe_resampled_context_oldest_shift16.json").read_text())
    assert still_learning(data["shift_nll"]) == pytest.approx(1.9361 - 1.8892, abs=1e-4)
    falling = render({**data, "shift_nll": [2.2707, 2.2080]})
    flat = render({**data, "shift_nll": [2.65, 2.64]})
    assert "**still falling**: the last pass lowered it by 0.0627 (2.8%)" in falling
    assert "still falling" not in flat and "NLL per pass 2.6500, 2.6400" in flat


def test_token_probe_fits_deep_prompts_in_place_of_the_tokens_and_scores_every_mode_with_them(tmp_path, tiny_llm_dir):
    """``--fit_prefix=deep``: the same users, shift and draws as the shallow run, every fitted mode (own, mean,
    another user's, shrunk, the oracle, on the fitted text) now a deep prompt, beside its unfitted start
    (``shared_prefix``); the shared token's score is the shallow run's to the last digit, the fitted ones are not."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    base = ["--dataset=toy", "--holdout_tokens=20", "--users=5", "--fit_steps=3", "--shift_users=6",
            "--shift_passes=1", f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}",
            "--uip_llm_dtype=float32", "--uip_batch_size=4", "--show_progress=false", "--keep=0.25",
            f"--checkpoint_dir={tmp_path / 'saved'}", f"--results={tmp_path / 'results'}"]
    assert token_probe.main(base) == 0
    assert token_probe.main(base + ["--fit_prefix=deep"]) == 0
    folder, = (tmp_path / "results" / "toy").iterdir()
    shallow = json.loads((folder / "token_probe_keep.json").read_text())
    deep = json.loads((folder / "token_probe_deep_keep.json").read_text())
    assert deep["fit_prefix"] == "deep" and "fit_prefix" not in shallow
    assert deep["per_user"]["users"] == shallow["per_user"]["users"]
    assert deep["modes"]["shared"] == shallow["modes"]["shared"]         # the same shift, users and held-out text
    for mode in ("own", "mean", "other_user", "own_halfway", "own_keep25", "oracle", "own_on_fitted_text"):
        assert np.isfinite(deep["modes"][mode]["mean"]) and deep["modes"][mode] != shallow["modes"][mode]
    for mode in ("shared_prefix", "rating_shared_prefix"):
        assert np.isfinite(deep["modes"][mode]["mean"]) and mode not in shallow["modes"]
    assert deep["modes"]["shared_prefix"] != deep["modes"]["shared"]     # the prompt is read: it changes the scores
    for key in ("mean_minus_shared_prefix", "shared_prefix_minus_shared", "rating_mean_minus_rating_shared_prefix",
                "oracle_minus_mean"):
        low, high = deep["differences"][key]["ci"]
        assert low <= deep["differences"][key]["mean"] <= high
    # fitted on the very text it is scored on, each user's prompt beats what it started from
    oracle, start = (np.array(deep["per_user"][m]) for m in ("oracle", "shared_prefix"))
    assert (oracle < start).all()
    report = (folder / "token_probe_deep_keep.md").read_text()
    assert "deep prompts (keys and values at every layer of the LLM" in report
    assert "each layer's root mean square key and value" in report
    assert "the deep prompt before fitting - the shared token alone (held-out text)" in report
    with pytest.raises(SystemExit):                                   # nothing to fit
        token_probe.parse_args(base + ["--fit_prefix=deep", "--fit_steps=0"])


def test_token_probe_report_names_the_text_the_tokens_were_fitted_to():
    """``describe_objective``: a random draw under ``uip_target: random``, the newest tokens under ``newest`` (every
    draw the same text), whatever the number of draws."""
    record = {"settings": {"max_behaviour_tokens": 64, "rating_weight": 10.0, "target": "random"}}
    data = {"record": record, "draws": 4, "distil_context_tokens": 128}
    assert "4 random draws, one per step in turn, each of 64 tokens" in describe_objective("distil", data)
    record["settings"]["target"] = "newest"
    described = describe_objective("distil", data)
    assert "the newest 64 tokens of their remaining training text" in described and "random" not in described
    assert "newest 128 tokens of their other remaining items" in described


def test_token_probe_compares_fit_objectives_user_by_user_from_the_same_draws(tmp_path, tiny_llm_dir):
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    base = toy_probe_argv(tmp_path, tiny_llm_dir) + ["--fit_objective=distil", "--distil_context_tokens=8"]
    assert token_probe.main(base + [f"--results={tmp_path / 'alone'}"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'both'}", "--also_fit=teacher_text,plain"]) == 0
    alone = json.loads(published(tmp_path / "alone", "token_probe_distil.json").read_text())
    both = json.loads(published(tmp_path / "both", "token_probe_distil_vs_teacher_text_vs_plain.json").read_text())
    assert both["also_fit"] == ["teacher_text", "plain"] and both["distil_context_tokens"] == 8
    for mode in ("own", "mean", "other_user", "own_on_fitted_text", "rating_own"):  # the further fits draw nothing
        assert both["modes"][mode] == alone["modes"][mode]
    modes = both["modes"]
    for objective in ("teacher_text", "plain"):
        for mode in (f"{objective}_{m}" for m in ("own", "mean", "other_user", "own_halfway", "own_on_fitted_text")):
            assert np.isfinite(modes[mode]["mean"]) and (mode.endswith("_text") or np.isfinite(modes["rating_" + mode]["mean"]))
        for key in (f"own_minus_{objective}_own", f"{objective}_own_minus_{objective}_mean",
                    f"{objective}_mean_minus_shared", f"rating_own_minus_rating_{objective}_own"):
            low, high = both["differences"][key]["ci"]
            assert low <= both["differences"][key]["mean"] <= high
    # three fits of the same users from the same start: the objectives, not the draws, set them apart
    assert modes["plain_own"]["mean"] != modes["own"]["mean"] != modes["teacher_text_own"]["mean"]
    assert "rating_teacher_text_own_on_fitted_text" not in modes
    assert both["record"]["settings"] == alone["record"]["settings"]
    report = published(tmp_path / "both", "token_probe_distil_vs_teacher_text_vs_plain.md").read_text()
    assert "own (distil) - own fitted on teacher_text (held-out text)" in report
    assert "teacher's whole text" in report and "tokens fitted on plain" in report
    # two draws, one per step in turn, each with its own teacher (and its own teacher's text)
    assert token_probe.main(base + [f"--results={tmp_path / 'draws'}", "--also_fit=teacher_text", "--draws=2"]) == 0
    two = json.loads(published(tmp_path / "draws", "token_probe_draws2_distil_vs_teacher_text.json").read_text())
    assert two["draws"] == 2 and two["modes"]["own"] != alone["modes"]["own"]
    assert two["modes"]["own_on_fitted_text"] != alone["modes"]["own_on_fitted_text"]  # half the steps on draws[0]
    assert "2 random draws, one per step in turn" in published(tmp_path / "draws", "*.md").read_text()
    # the shift distilled from the same teacher before the per-user fits: another start, so other fitted tokens
    assert token_probe.main(base + [f"--results={tmp_path / 'shift'}", "--shift_objective=distil"]) == 0
    shifted = json.loads(published(tmp_path / "shift", "token_probe_distil_shiftdistil.json").read_text())
    assert shifted["shift_objective"] == "distil" and alone["shift_objective"] == "nll"
    assert len(shifted["shift_nll"]) == 1 and shifted["shift_nll"] != alone["shift_nll"]
    assert shifted["modes"]["shared"] != alone["modes"]["shared"] and shifted["modes"]["own"] != alone["modes"]["own"]
    assert "shift trained alone for 1 passes over 6 users, on the frozen LLM's predictions (distillation" in published(
        tmp_path / "shift", "*.md").read_text()
    for bad in (["--also_fit=distil"], ["--also_fit=plain,plain"], ["--shift_objective=weighted"], ["--also_fit=nll"],
                ["--also_fit=plain", "--fit_steps=0"],
                ["--also_fit=teacher_text", "--fit_objective=plain", "--resample=true"], ["--draws=0"],
                ["--fit_objective=plain", "--draws=2", "--resample=true"]):
        with pytest.raises(SystemExit):
            token_probe.parse_args(base + bad)


@pytest.mark.parametrize("objective", ["nll", "distil", "mult_vae"])
def test_token_probe_trains_the_encoder_at_every_batch_and_scores_it_without_per_user_fits(tmp_path, tiny_llm_dir,
                                                                                           objective):
    """``--encoder_passes``: the linear encoder is trained by Adam at every batch (it moves, and the shift beside
    it; on the M-step's objective, by distillation or on texts drawn from a Mult-VAE), the probed users are scored
    with ``A z``, its batch mean and another user's, on every held-out token and on the rating tokens (and, trained
    on Mult-VAE texts, on a new one); ``--fit_steps=0`` leaves out every per-user fit."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--users=5",
            "--fit_steps=0", "--shift_users=6", "--shift_passes=1", "--encoder_passes=2", f"--data_path={tmp_path / 'data'}",
            f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32", "--uip_batch_size=4", "--show_progress=false",
            f"--checkpoint_dir={tmp_path / 'saved'}", f"--encoder_objective={objective}"]
    assert token_probe.main(argv) == 0
    folder, = (tmp_path / "results" / "toy").iterdir()
    name = "token_probe_encoder" + ("" if objective == "nll" else "_" + objective)
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["encoder_objective"] == objective and ("distil_context_tokens" in data) is (objective == "distil")
    assert data["encoder_passes"] == 2 and len(data["encoder_nll"]) == 2
    new_draw = {"encoder_on_new_draw", "encoder_mean_on_new_draw", "encoder_other_on_new_draw"}
    assert set(data["modes"]) == {prefix + mode for prefix in ("", "rating_")
                                  for mode in ("shared", "encoder", "encoder_mean", "encoder_other")} | (
        new_draw if objective == "mult_vae" else set())   # scored on a new text from the distribution trained on
    for key in ("encoder_minus_encoder_mean", "encoder_minus_encoder_other", "encoder_mean_minus_shared",
                "rating_encoder_minus_rating_encoder_mean",
                *(("encoder_on_new_draw_minus_encoder_other_on_new_draw",) if objective == "mult_vae" else ())):
        low, high = data["differences"][key]["ci"]
        assert low <= data["differences"][key]["mean"] <= high
    assert data["differences"]["encoder_minus_encoder_other"]["mean"] != 0        # users get different tokens
    report = (folder / f"{name}.md").read_text()
    assert "encoder trained at every batch" in report and "fitted alone" not in report
    assert ("distillation" in report) is (objective == "distil")
    assert ("texts drawn from a Mult-VAE" in report) is (objective == "mult_vae")


def test_token_probe_trains_an_encoder_to_deep_prompts_and_scores_its_modes_with_them(tmp_path, tiny_llm_dir):
    """``--encoder_prefix=deep``: the encoder stage writes deep prompts (on texts drawn from a Mult-VAE here), the
    users get different prompts, every ``encoder*`` mode differs from the shallow encoder's run over the same users;
    its control (``deep_shared``) gives every user the same prompt; a deep encoder without passes or on a teacher is
    refused."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--users=5",
            "--fit_steps=0", "--shift_users=6", "--shift_passes=1", "--encoder_passes=2", f"--data_path={tmp_path / 'data'}",
            f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32", "--uip_batch_size=4", "--show_progress=false",
            f"--checkpoint_dir={tmp_path / 'saved'}", "--encoder_objective=mult_vae"]
    assert token_probe.main(argv) == 0 and token_probe.main(argv + ["--encoder_prefix=deep"]) == 0
    folder, = (tmp_path / "results" / "toy").iterdir()
    shallow = json.loads((folder / "token_probe_encoder_mult_vae.json").read_text())
    deep = json.loads((folder / "token_probe_encoder_deep_mult_vae.json").read_text())
    assert deep["encoder_prefix"] == "deep" and "encoder_prefix" not in shallow
    assert set(deep["modes"]) == set(shallow["modes"]) and deep["per_user"]["users"] == shallow["per_user"]["users"]
    # the shallow encoder trains the shift beside it; the deep one its own shared prompt, the shift left as it was
    assert deep["modes"]["shared"] != shallow["modes"]["shared"]
    for mode in ("encoder", "encoder_mean", "encoder_other", "encoder_on_new_draw", "rating_encoder"):
        assert np.isfinite(deep["modes"][mode]["mean"]) and deep["modes"][mode] != shallow["modes"][mode]
    assert len(deep["encoder_nll"]) == 2 and deep["encoder_nll"] != shallow["encoder_nll"]
    assert deep["differences"]["encoder_minus_encoder_other"]["mean"] != 0        # users get different prompts
    report = (folder / "token_probe_encoder_deep_mult_vae.md").read_text()
    assert "a linear encoder from `z` to a deep prompt" in report and "texts drawn from a Mult-VAE" in report
    # its control: the shared deep prompt trained alone on the same batches, one prompt for every user
    assert token_probe.main(argv + ["--encoder_prefix=deep_shared"]) == 0
    control = json.loads((folder / "token_probe_encoder_deepshared_mult_vae.json").read_text())
    assert control["encoder_prefix"] == "deep_shared" and control["modes"]["shared"] == deep["modes"]["shared"]
    own, mean, other = (np.array(control["per_user"][m]) for m in ("encoder", "encoder_mean", "encoder_other"))
    np.testing.assert_allclose(own, mean, rtol=1e-6)
    np.testing.assert_allclose(own, other, rtol=1e-6)
    assert not np.allclose(own, deep["per_user"]["encoder"])
    assert "one deep prompt for every user" in (folder / "token_probe_encoder_deepshared_mult_vae.md").read_text()
    for bad in (["--encoder_passes=0"], ["--encoder_objective=distil"]):
        with pytest.raises(SystemExit):
            token_probe.parse_args(argv + ["--encoder_prefix=deep"] + bad)


def test_token_probe_fits_start_from_the_encoders_prompts_with_fit_start_encoder(tmp_path, tiny_llm_dir):
    """``--fit_start=encoder``: each per-user fit (and the oracle) starts from what the encoder stage wrote for the
    user. With no step (learning rate 0) a user's fitted prompt scores what the encoder's does, to rounding, for
    deep prompts (from the shared deep prompt, ``deep_shared``) and shallow tokens (from ``A z``); with steps it moves
    away, and fitted on the held-out text itself it beats its start for every user. Mismatched stages are refused."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--users=5",
            "--fit_steps=3", "--shift_users=6", "--shift_passes=1", "--encoder_passes=1",
            f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            "--uip_batch_size=4", "--show_progress=false", f"--checkpoint_dir={tmp_path / 'saved'}",
            "--fit_start=encoder"]
    # a large encoder step, so that the start is far from the shared token (the tiny LLM's scores move little)
    deep_argv = argv + ["--fit_prefix=deep", "--encoder_prefix=deep_shared", "--encoder_learning_rate=0.5"]
    folder = tmp_path / "results" / "toy"
    name = "token_probe_deep_fromencoder_encoder_deepshared"
    assert token_probe.main(deep_argv + ["--fit_learning_rate=0"]) == 0
    still = json.loads(next(folder.iterdir()).joinpath(name + ".json").read_text())
    assert still["fit_start"] == "encoder" and "shared_prefix" not in still["modes"]
    for a, b in (("own", "encoder"), ("mean", "encoder"), ("other_user", "encoder"), ("rating_own", "rating_encoder")):
        np.testing.assert_allclose(still["per_user"][a], still["per_user"][b], rtol=1e-6)
    assert np.abs(np.array(still["per_user"]["encoder"]) - still["per_user"]["shared"]).max() > 1e-3
    assert token_probe.main(deep_argv) == 0
    data = json.loads(next(folder.iterdir()).joinpath(name + ".json").read_text())
    own, start, oracle = (np.array(data["per_user"][m]) for m in ("own", "encoder", "oracle"))
    assert not np.allclose(own, start) and (oracle < start).all()
    assert data["per_user"]["encoder"] == still["per_user"]["encoder"]          # the same start, whatever the step
    assert "own_minus_encoder" in data["differences"] and "mean_minus_encoder" in data["differences"]
    report = next(folder.iterdir()).joinpath(name + ".md").read_text()
    assert "starting with what the encoder stage above wrote for the user" in report
    assert "own - the encoder's prompt they started from (held-out text: what the fit adds)" in report
    # shallow: from A z (as above, a large encoder step: the start far from the shared token)
    assert token_probe.main(argv + ["--fit_learning_rate=0", "--encoder_learning_rate=0.5"]) == 0
    shallow = json.loads(next(folder.iterdir()).joinpath("token_probe_fromencoder_encoder.json").read_text())
    own, start, shared = (np.array(shallow["per_user"][m]) for m in ("own", "encoder", "shared"))
    np.testing.assert_allclose(own, start, rtol=1e-6)
    assert np.abs(start - shared).max() > 1e-3
    # no encoder stage, nothing to fit, deep fits from the shallow encoder, shallow fits from a deep one
    for bad in (["--encoder_passes=0"], ["--fit_steps=0"], ["--fit_prefix=deep"], ["--encoder_prefix=deep_shared"]):
        with pytest.raises(SystemExit):
            token_probe.parse_args(argv + bad)


def test_the_deep_encoder_learns_how_users_differ_from_the_batch_and_the_shared_prompt_what_all_need(tmp_path,
                                                                                                     tiny_llm_dir):
    """``train_deep_encoder``: ``W`` learns from ``z`` minus its batch mean only. In batches of one user that is
    zero, so ``W`` never moves (every user gets the same prompt) while the shared prompt ``S`` does; in batches of
    four, users get prompts of their own, and a user's prompt is the same whichever users are encoded beside them."""
    from test_trainer import make_trainer

    from recbole_uip.token_probe.stages import train_deep_encoder

    logger = logging.getLogger("test")
    for batch_size in (1, 4):
        trainer = make_trainer(tmp_path / str(batch_size), tiny_llm_dir, uip_batch_size=batch_size)
        trainer.setup()
        users = np.arange(8)
        nll, encode = train_deep_encoder(trainer, users, 1, 0.05, np.random.default_rng(0), logger)
        positions = [np.arange(len(trainer.text.user_pieces[u])) for u in users]
        prompts = encode(users, positions)
        start = trainer.shared_prefix(len(users))
        assert len(nll) == 1 and prompts.shape == start.shape and not prompts.requires_grad
        assert not torch.allclose(prompts, start)                               # S moved
        same = torch.allclose(prompts[0], prompts[1:], atol=1e-6)
        assert same is (batch_size == 1)
        torch.testing.assert_close(encode(users[:2], positions[:2])[1], prompts[1])


@pytest.mark.parametrize("group_by, training", [("items", "separate"), ("mult_vae", "separate"), ("items", "joint")])
def test_token_probe_fits_one_token_per_group_of_users_and_leaves_every_other_mode_as_it_was(tmp_path, tiny_llm_dir,
                                                                                           group_by, training):
    """``--group_tokens``: the users not probed are grouped, each group's token is trained on its users (one group
    at a time, or all together beside the shift) and differs from the others; the probed users are scored with
    their group's, the groups' mean, the next group's and the likeliest group's token, and by count models of the
    same groups and of their own history; the shift is put back and the stage draws on its own generator, so the
    per-user fits and the shared token score every user exactly as in a run without it; bad values are refused."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    base = ["--dataset=toy", "--holdout_tokens=20", "--users=5", "--fit_steps=2", "--oracle=false",
            "--shift_users=6", "--shift_passes=1", f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}",
            "--uip_llm_dtype=float32", "--uip_batch_size=4", "--show_progress=false",
            f"--checkpoint_dir={tmp_path / 'saved'}"]
    assert token_probe.main(base + [f"--results={tmp_path / 'alone'}"]) == 0
    grouping = ["--group_tokens=2", "--group_passes=2", f"--group_by={group_by}", "--group_learning_rate=0.005",
                f"--group_training={training}"] + (["--group_offset_learning_rate=0.01"] if training == "joint" else [])
    scored_every = ["--group_score_every=1"] if training == "joint" else []      # the group's part after each pass
    assert token_probe.main(base + [f"--results={tmp_path / 'grouped'}"] + grouping + scored_every) == 0
    alone = json.loads(published(tmp_path / "alone", "token_probe.json").read_text())
    suffix = "_joint" if training == "joint" else ""
    grouped = json.loads(published(tmp_path / "grouped", f"token_probe_groups2_{group_by}{suffix}.json")
                         .read_text())
    probed_modes = {"group_own", "group_mean", "group_other", "group_likeliest", "group_likeliest_other", "group_best",
                   "group_own_additive", "group_likeliest_additive", "group_relative", "group_relative_additive",
                   "group_any", "count_population", "count_group_own",
                   "count_group_other", "count_group_own_additive", "count_set"}
    assert set(grouped["modes"]) == set(alone["modes"]) | probed_modes | {"rating_" + m for m in probed_modes}
    for mode in alone["per_user"]:                                   # the shift put back, no other draw changed
        assert grouped["per_user"][mode] == alone["per_user"][mode], mode
    assert grouped["group_by"] == group_by and len(grouped["group_sizes"]) == 2 and min(grouped["group_sizes"]) > 0
    assert sum(grouped["group_sizes"]) >= grouped["shift_users"]     # every user not probed, the shift's among them
    if training == "joint":                                  # one loss per pass, every group's together
        assert len(grouped["group_nll"]) == 2 and all(isinstance(v, float) for v in grouped["group_nll"])
        trajectory = grouped["group_trajectory"]
        assert [entry["passes"] for entry in trajectory] == [1, 2] and grouped["group_score_every"] == 1
        for prefix in ("", "rating_"):      # the last scoring is the end's, to the last digit
            assert trajectory[-1][prefix + "held_out"] == {
                k: grouped["differences"][f"{prefix}group_own_minus_{prefix}group_own_additive"][k] for k in ("mean", "ci")}
            for entry in trajectory:
                for name in ("trained_users", "trained_users_held_out"):
                    low, high = entry[prefix + name]["ci"]
                    assert low <= entry[prefix + name]["mean"] <= high
            low, high = grouped["group_trained_users_count_part"][prefix + "held_out"]["ci"]
            assert low <= grouped["group_trained_users_count_part"][prefix + "held_out"]["mean"] <= high
        assert trajectory[0]["held_out"] != trajectory[1]["held_out"]                  # the tokens moved between
        # scoring between passes changes nothing: the same run without it trains the same tokens on the same draws
        assert token_probe.main(base + [f"--results={tmp_path / 'unscored'}"] + grouping) == 0
        unscored = json.loads(published(tmp_path / "unscored", "token_probe_groups2_*.json").read_text())
        assert unscored["group_nll"] == grouped["group_nll"] and "group_trajectory" not in unscored
        assert unscored["per_user"] == grouped["per_user"]
        # the E-step over more draws: drawn after everything else, so every other score and choice stays the same
        assert token_probe.main(base + [f"--results={tmp_path / 'pooled'}", "--group_choice_draws=3"] + grouping) == 0
        pooled = json.loads(published(tmp_path / "pooled", "token_probe_groups2_*_joint_choice3.json")
                            .read_text())
        assert {m: pooled["per_user"][m] for m in unscored["per_user"]} == unscored["per_user"]
        assert {k: pooled["group_per_user"][k] for k in unscored["group_per_user"]} == unscored["group_per_user"]
        assert pooled["group_choice_draws"] == 3
        choice = np.array(pooled["group_per_user"]["relative_pooled"])
        assert pooled["group_relative_pooled_is_nearest"] == np.mean(choice == nearest_of(unscored))
        assert pooled["group_relative_pooled_is_relative"] == np.mean(
            choice == np.array(unscored["group_per_user"]["relative"]))
        pooled_scores = np.array(pooled["per_user"]["group_relative_pooled"])
        assert np.array_equal(pooled_scores[choice == nearest_of(unscored)],
                              np.array(pooled["per_user"]["group_own"])[choice == nearest_of(unscored)])
        for prefix in ("", "rating_"):
            for other in ("own", "relative"):
                summary = pooled["differences"][f"{prefix}group_relative_pooled_part_minus_{prefix}group_{other}_part"]
                assert summary["ci"][0] <= summary["mean"] <= summary["ci"][1]
        report = published(tmp_path / "pooled", "*.md").read_text()
        assert "The same E-step over 3 draws of each user's text" in report
        assert "the same over the mean NLL of 3 draws of their remaining text" in report
        # the shuffled-ID control: the same groups' sizes and probed users' groups, tokens trained on other users
        assert token_probe.main(base + [f"--results={tmp_path / 'shuffled'}", "--group_shuffle=true"] + grouping) == 0
        shuffled = json.loads(published(tmp_path / "shuffled", "token_probe_groups2_*_joint_shuffled.json")
                              .read_text())
        assert shuffled["group_shuffle"] is True and unscored["group_shuffle"] is False
        assert shuffled["group_sizes"] == unscored["group_sizes"]
        assert shuffled["group_per_user"]["nearest"] == unscored["group_per_user"]["nearest"]
        assert {m: shuffled["per_user"][m] for m in alone["per_user"]} == alone["per_user"]
        assert shuffled["per_user"]["group_own"] != unscored["per_user"]["group_own"]       # other users trained them
        shuffled_report = published(tmp_path / "shuffled", "*.md").read_text()
        assert "shuffled among those users" in shuffled_report
        # groups are judged against a random group's token, not the vector mean of the group tokens
        assert ("The issue's goal for one token per group of users (0.05 nats/token below a random group's token"
                in shuffled_report and "so it is not the goal's reference for groups" in shuffled_report)
    else:
        assert [len(nll) for nll in grouped["group_nll"]] == [2, 2]
    assert 0 <= grouped["group_likeliest_is_nearest"] <= 1
    assert grouped["group_learning_rate"] == 0.005 and grouped["group_training"] == training
    assert grouped.get("group_offset_learning_rate") == (0.01 if training == "joint" else None)
    nearest, likeliest = (np.array(grouped["group_per_user"][k]) for k in ("nearest", "likeliest"))
    scores = {m: np.array(grouped["per_user"][m]) for m in ("group_own", "group_likeliest", "group_best")}
    same = nearest == likeliest                             # the same group's token: the same score, else another
    assert np.array_equal(scores["group_own"][same], scores["group_likeliest"][same])
    assert (scores["group_own"][~same] != scores["group_likeliest"][~same]).all()
    relative = np.array(grouped["group_per_user"]["relative"])
    assert grouped["group_relative_is_nearest"] == np.mean(relative == nearest)
    same = nearest == relative
    assert np.array_equal(scores["group_own"][same], np.array(grouped["per_user"]["group_relative"])[same])
    for prefix in ("", "rating_"):
        low, high = grouped["differences"][f"{prefix}group_relative_part_minus_{prefix}group_own_part"]["ci"]
        assert low <= grouped["differences"][f"{prefix}group_relative_part_minus_{prefix}group_own_part"]["mean"] <= high
    best = nearest == grouped["group_best"]
    assert np.array_equal(scores["group_own"][best], scores["group_best"][best])
    assert (scores["group_own"][~best] != scores["group_best"][~best]).all()
    assert grouped["differences"]["group_own_minus_group_other"]["mean"] != 0      # two groups, two tokens
    assert grouped["modes"]["group_mean"]["mean"] != grouped["modes"]["shared"]["mean"]     # the tokens moved
    for key in ("group_own_minus_group_mean", "group_mean_minus_shared", "group_likeliest_minus_group_own",
                "group_likeliest_minus_group_likeliest_other", "group_likeliest_minus_group_best",
                "group_best_minus_shared", "rating_group_own_minus_rating_group_mean"):
        low, high = grouped["differences"][key]["ci"]
        assert low <= grouped["differences"][key]["mean"] <= high
    count = {m: np.array(grouped["per_user"][m], dtype=float)
             for m in ("count_group_own", "count_group_other", "count_population", "count_set")}
    assert np.array_equal(count["count_group_own"] != count["count_group_other"], np.ones(5, dtype=bool))
    assert np.isfinite(count["count_set"]).all() and (count["count_set"] != count["count_population"]).any()
    report = published(tmp_path / "grouped", "*.md").read_text()
    assert "2 group tokens" in report and "The issue's goal for one token per group of users" in report
    assert "The group's part alone (own - what the same token scores on a user of any group)" in report
    assert "Chosen by likelihood against how each token explains every user (an E-step)" in report
    assert "the relatively likeliest; the nearest code's group for" in report
    assert "With no LLM, the groups' own count models on the same users and items" in report
    assert ("trained together" in report) is (training == "joint")
    assert ("(Adam, step 0.005, the groups' offsets 0.01;" in report) is (training == "joint")
    assert ("The group's part (own group's token - its additive twin" in report) is (training == "joint")
    assert ("on one draw of the remaining training text of 5 of the users" in report) is (training == "joint")
    for bad in (["--group_tokens=1"], ["--group_tokens=-2"], ["--group_tokens=2", "--group_passes=0"],
                ["--group_tokens=2", "--group_learning_rate=-1"], ["--group_tokens=2", "--group_training=both"],
                ["--group_tokens=2", "--group_score_every=1"], ["--group_score_every=1", "--group_training=joint"],
                ["--group_tokens=2", "--group_training=joint", "--group_score_every=-1"],
                ["--group_tokens=2", "--group_offset_learning_rate=0.01"],          # separate: no offsets apart
                ["--group_tokens=2", "--group_training=joint", "--group_offset_learning_rate=-1"],
                ["--group_tokens=2", "--group_choice_draws=0"], ["--group_choice_draws=2"],
                ["--group_shuffle=true"]):
        with pytest.raises(SystemExit):
            token_probe.parse_args(base + bad)


def nearest_of(data: dict) -> np.ndarray:
    """The token probe's JSON: each probed user's nearest code's group."""
    return np.array(data["group_per_user"]["nearest"])


def test_group_modes_take_out_how_good_a_token_is_for_everyone_and_how_hard_a_user_is():
    """``own - own_additive`` is zero when a token's score is a user's difficulty plus the token's quality, and
    finds a planted bonus of a group's token on its own users; the other modes pick the right cells."""
    rng = np.random.default_rng(0)
    users, nearest = np.arange(12), np.arange(12) % 3
    groups = GroupTokens(torch.zeros(3, 1, 1), nearest, (nearest + 2) % 3, 1, [4, 4, 4], [],
                         np.arange(12, 24), nearest)
    additive = rng.normal(size=(1, 12)) + np.array([[0.0], [-0.3], [0.2]])        # user difficulty + token quality
    plain = group_modes(additive, groups, nearest[::-1])
    assert np.allclose(plain["group_own"] - plain["group_own_additive"], 0)
    assert np.array_equal(plain["group_best"], additive[1])
    assert np.array_equal(plain["group_own"][:3], additive[[0, 1, 2], [0, 1, 2]])
    assert np.array_equal(plain["group_likeliest_other"], additive[nearest[::-1], users])
    assert np.allclose(plain["group_any"], additive.mean(0))                # a group's token drawn at random
    planted = additive.copy()
    planted[nearest, users] -= 0.1                                     # each group's token better on its own users
    modes = group_modes(planted, groups, nearest[::-1], "rating_")
    interaction = modes["rating_group_own"] - modes["rating_group_own_additive"]
    assert np.allclose(interaction, -0.1 * (1 - 1 / 3))        # the bonus, less the share the means absorb (1 / K)
    assert np.allclose(modes["rating_group_likeliest"] - modes["rating_group_likeliest_additive"], 0.1 / 3)


def test_shuffled_members_keep_every_groups_size_and_draw_its_users_at_random():
    """``--group_shuffle``: each group keeps its size, its users are drawn anew (seeded, the same every time), and a
    group's shuffled users are no more its own than chance makes them."""
    fitted = np.repeat(np.arange(4), [50, 30, 15, 5])
    shuffled = shuffled_members(fitted, seed=7)
    assert np.array_equal(np.bincount(shuffled, minlength=4), np.bincount(fitted, minlength=4))
    assert np.array_equal(shuffled, shuffled_members(fitted, seed=7))
    assert not np.array_equal(shuffled, shuffled_members(fitted, seed=8))
    assert np.mean(shuffled == fitted) < 0.6                # by chance 0.5^2 + 0.3^2 + ... = 0.36 of users stay


def test_the_relative_choice_finds_the_group_a_token_fits_better_than_others_not_the_best_token():
    """An E-step by likelihood with each token's fit to everyone taken out: where one token is better for every user
    and each user's own group's token fits them a little better than it fits the others, the plain argmin picks the
    token best for everyone, the relative choice each user's own group; and the part difference is below zero where
    the relative choice finds a planted group the nearest code misses, zero where both choose the same."""
    rng = np.random.default_rng(1)
    truth = np.arange(12) % 3
    draws = rng.normal(scale=0.01, size=(1, 12)) + np.array([[0.0], [-0.5], [0.1]])   # token 1 best for everyone
    draws[truth, np.arange(12)] -= 0.2                                          # each user's own group fits them
    assert (draws.argmin(0) == 1).all()
    assert np.array_equal(relative_choice(draws), truth)
    held = draws.copy()                                                # the held-out texts share the planted groups
    wrong = (truth + 1) % 3                                            # a code that places every user elsewhere
    groups = GroupTokens(torch.zeros(3, 1, 1), wrong, draws.argmin(0), 1, [4, 4, 4], [],
                         np.arange(12, 24), truth, relative=relative_choice(draws))
    modes = group_modes(held, groups, truth[::-1])
    difference = relative_part_differences(modes)["group_relative_part_minus_group_own_part"]
    assert difference["mean"] < 0 and difference["ci"][1] < 0 and difference["share_below_zero"] == 1
    same = group_modes(held, dataclasses.replace(groups, group=truth), truth[::-1])
    assert relative_part_differences(same)["group_relative_part_minus_group_own_part"]["mean"] == 0
    assert relative_part_differences({"group_own": held[0]}) == {}      # no relative choice: nothing


def test_the_relative_choice_over_more_draws_finds_groups_that_one_noisy_draw_misses():
    """``--group_choice_draws``: where one draw's noise is as large as a group's bonus, the first draw's relative
    choice misses many users' planted groups and the mean over many draws finds nearly all; the pooled choice's part
    is then below the first draw's, user by user, and equal where both choose the same."""
    rng = np.random.default_rng(2)
    truth = np.arange(60) % 3
    bonus = np.zeros((3, 60))
    bonus[truth, np.arange(60)] = -0.2                                        # each user's own group fits them
    draws = rng.normal(scale=0.2, size=(16, 3, 60)) + np.array([[0.0], [-0.5], [0.1]]) + bonus
    first, pooled = relative_choice(draws[0]), relative_choice(draws.mean(0))
    assert np.mean(first == truth) < 0.8 and np.mean(pooled == truth) > 0.95
    groups = GroupTokens(torch.zeros(3, 1, 1), truth, draws[0].argmin(0), 1, [20, 20, 20], [],
                         np.arange(60, 120), truth, relative=first, relative_pooled=pooled)
    held = bonus + np.array([[0.0], [-0.5], [0.1]]) + rng.normal(scale=0.01, size=(1, 60))   # a held-out text
    differences = relative_part_differences(group_modes(held, groups, truth[::-1]))
    better = differences["group_relative_pooled_part_minus_group_relative_part"]
    assert better["ci"][1] < 0 and better["share_below_zero"] == pytest.approx(np.mean(pooled != first))
    assert 0 <= differences["group_relative_pooled_part_minus_group_own_part"]["mean"] \
        < differences["group_relative_part_minus_group_own_part"]["mean"]      # the code is the truth: closer to it


def test_token_probe_reads_each_users_history_in_context_beside_the_shared_token(tmp_path, tiny_llm_dir):
    """``--context_tokens``: the shared token alone and beside the user's own newest history or another user's of
    the same length, per budget, on every held-out token and on the rating tokens; the differences the report
    compares with the goal; bad budgets refused."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--users=5",
            "--fit_steps=0", "--shift_users=6", "--shift_passes=1", "--context_tokens=8,32",
            f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            "--uip_batch_size=4", "--show_progress=false", f"--checkpoint_dir={tmp_path / 'saved'}"]
    assert token_probe.main(argv) == 0
    folder, = (tmp_path / "results" / "toy").iterdir()
    data = json.loads((folder / "token_probe_context.json").read_text())
    assert data["context_tokens"] == [8, 32]
    assert 0 < data["context_tokens_mean"]["8"] <= 8 < data["context_tokens_mean"]["32"] <= 32
    assert set(data["modes"]) == {prefix + mode for prefix in ("", "rating_")
                                  for mode in ("shared", "context8_own", "context8_other", "context32_own",
                                               "context32_other")}
    for n in (8, 32):
        assert data["modes"][f"context{n}_own"]["mean"] != data["modes"]["shared"]["mean"]   # the context is read
        for key in (f"context{n}_own_minus_shared", f"context{n}_own_minus_context{n}_other",
                    f"rating_context{n}_own_minus_rating_shared"):
            low, high = data["differences"][key]["ci"]
            assert low <= data["differences"][key]["mean"] <= high
    report = (folder / "token_probe_context.md").read_text()
    assert "own history in context (N=32)" in report and "the user's part alone" in report
    # the oldest end of each history instead: the same shift and held-out text, other contexts
    argv = [a for a in argv if not a.startswith("--results")] + [f"--results={tmp_path / 'oldest'}"]
    assert token_probe.main(argv + ["--context_from=oldest"]) == 0
    oldest = json.loads(published(tmp_path / "oldest", "token_probe_context_oldest.json").read_text())
    assert oldest["context_from"] == "oldest" and data["context_from"] == "newest"
    assert oldest["modes"]["shared"] == data["modes"]["shared"]
    assert oldest["modes"]["context8_own"] != data["modes"]["context8_own"]
    assert oldest["context_tokens_mean"]["8"] <= 8
    assert "read after the oldest N tokens" in published(tmp_path / "oldest", "*.md").read_text()
    for bad in ("--context_tokens=0", "--context_tokens=a,8", "--context_from=random"):
        with pytest.raises(SystemExit):
            token_probe.parse_args(["--dataset=toy", bad])


def test_the_groups_offsets_take_their_own_step_apart_from_the_shifts_when_given_one(tmp_path, tiny_llm_dir):
    """``fit_group_tokens_jointly(..., offset_learning_rate=...)``: the groups' offsets step by it: a tenfold step
    spreads the groups' tokens apart far more on the same draws, 0 is the shift's step to the last digit, and the
    shift is put back either way."""
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, tiny_llm_dir)
    trainer.setup()
    users = np.sort(trainer.training_users()[:8])
    groups = np.arange(len(users)) % 2
    base = trainer.soft.shared.detach().clone()
    logger = logging.getLogger("test")

    def fitted(offset_learning_rate):
        tokens, _ = fit_group_tokens_jointly(trainer, users, groups, 2, 1, 0.005,
                                             np.random.default_rng(0), logger,
                                             offset_learning_rate=offset_learning_rate)
        assert torch.equal(trainer.soft.shared, base)                       # the shift put back
        return tokens

    same, explicit, larger = fitted(0.0), fitted(0.005), fitted(0.05)
    assert torch.equal(same, explicit)
    spread = [float((tokens[0] - tokens[1]).norm()) for tokens in (same, larger)]   # O[0] - O[1]: the offsets alone
    assert spread[0] > 0 and spread[1] > 5 * spread[0]


def test_matched_contexts_are_each_users_newest_tokens_cut_to_the_same_length(tmp_path, tiny_llm_dir):
    """``matched_contexts``: the user's and the other user's newest tokens (the end of their text), both as long as
    the shorter of the two within the budget; no positions, no context."""
    from recbole_uip.benchmarking import matched_contexts
    from test_trainer import make_trainer

    text = make_trainer(tmp_path, tiny_llm_dir).text
    positions = {u: np.arange(len(text.user_pieces[u])) for u in range(4)}
    positions[3] = np.arange(1)                                     # a short history: its pair gets its length
    own, theirs = matched_contexts(text, [0, 1, 2], [1, 3, 0], positions, budget=40)
    for user, other, mine, foreign in zip([0, 1, 2], [1, 3, 0], own, theirs):
        full_mine, full_theirs = text.tokens(user, positions[user])[0], text.tokens(other, positions[other])[0]
        assert len(mine) == len(foreign) == min(40, len(full_mine), len(full_theirs))
        assert mine == full_mine[len(full_mine) - len(mine):] and foreign == full_theirs[len(full_theirs) - len(foreign):]
    assert len(own[0]) == 40 and len(own[1]) == len(text.tokens(3, positions[3])[0]) < 40
    assert matched_contexts(text, [0], [1], {0: np.arange(0), 1: positions[1]}, budget=40) == ([[]], [[]])


def test_context_positions_read_the_oldest_items_that_hold_the_budget(tmp_path, tiny_llm_dir):
    """``oldest_positions``: the oldest of the given positions whose text reaches the budget (the item that crosses
    it included), all of them when they hold fewer; only the given positions (never a held-out item);
    ``context_positions`` leaves the newest end's positions as they are and refuses an unknown end."""
    from recbole_uip.benchmarking import context_positions, matched_contexts, oldest_positions
    from test_trainer import make_trainer

    text = make_trainer(tmp_path, tiny_llm_dir).text
    user = max(range(len(text.user_pieces)), key=lambda u: len(text.user_pieces[u]))
    allowed = np.arange(1, len(text.user_pieces[user]) - 1)          # not the oldest item, not the newest
    lengths = text.piece_lengths[np.asarray(text.user_pieces[user])[allowed]]
    budget = int(lengths[:2].sum()) + 1                                # crosses into the third allowed item
    oldest = oldest_positions(text, user, allowed, budget)
    assert oldest.tolist() == allowed[:3].tolist()
    assert oldest_positions(text, user, allowed, 10 ** 6).tolist() == allowed.tolist()
    assert oldest_positions(text, user, allowed[:0], budget).tolist() == []
    positions = {user: allowed}
    assert context_positions(text, [user], positions, budget, "newest") is positions
    cut = context_positions(text, [user], positions, budget, "oldest")
    (own,), _ = matched_contexts(text, [user], [user], cut, budget)
    assert own == text.tokens(user, allowed[:3])[0][-budget:]
    with pytest.raises(ValueError, match="context end"):
        context_positions(text, [user], positions, budget, "middle")


def test_the_probes_encoder_training_moves_the_encoder_and_the_shift(tmp_path, tiny_llm_dir):
    """``train_encoder``: ``A`` and the shift both move, each pass's NLL is reported, and no gradient is left
    behind in ``A``."""
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, tiny_llm_dir)
    trainer.setup()
    encoder, shared = trainer.soft.encoder.detach().clone(), trainer.soft.shared.detach().clone()
    users = trainer.training_users()[:8]
    nll = train_encoder(trainer, users, 2, 0.01, np.random.default_rng(0), logging.getLogger("test"))
    assert len(nll) == 2 and all(np.isfinite(nll))
    assert not torch.equal(trainer.soft.encoder, encoder) and not torch.equal(trainer.soft.shared, shared)
    assert trainer.soft.encoder.grad is None


def test_an_m_step_batch_against_a_teacher_returns_and_lowers_its_cross_entropy(tmp_path, steerable_llm_dir):
    """``train_batch(..., teacher=...)``: the batch's cross-entropy against the teacher is what it returns (not the
    NLL of the text) and what the encoder (Adam at every batch) and the shift step on: it falls over steps (on the
    steerable tiny model, whose predictions the soft tokens can move)."""
    from recbole_uip.inference.soft_profiles import soft_target_nll
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, steerable_llm_dir)
    trainer.setup()
    targets = trainer.targets(trainer.training_users()[:4], np.random.default_rng(0))
    teacher = distillation_teacher(trainer, targets, 12)
    optimizer = torch.optim.Adam([trainer.soft.encoder], lr=0.003)
    shared_opt = trainer.shared_optimizer()
    losses = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            offsets = trainer.offsets(targets.users, targets.inputs)
            expected = soft_target_nll(trainer.llm.model, trainer.layout, trainer.prompt_batch(targets),
                                       trainer.soft(offsets), teacher)
        losses.append(trainer.train_batch(targets, [1.0, 1.0], shared_opt, teacher=teacher))
        torch.testing.assert_close(losses[-1], expected, rtol=1e-4, atol=1e-5)
        optimizer.step()
    means = [float(loss.mean()) for loss in losses]
    assert all(later < earlier for earlier, later in zip(means, means[1:]))
    assert not torch.allclose(losses[0], trainer.train_batch(targets, [1.0, 1.0], shared_opt))   # not the NLL


def test_the_distillation_teacher_reads_the_history_with_each_users_prompt(tmp_path, tiny_llm_dir):
    """``distillation_teacher(..., offsets=...)`` or ``(..., prefix=...)``: with soft-token offsets ``(B, P, D)``
    the teacher is the LLM's with those offsets, with deep prompts ``(B, N, 2, H, m, d)`` the LLM's with them read
    before the shared token; each user's rows follow that user's prompt (not their neighbour's), and either differs
    from the shared token's."""
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, tiny_llm_dir)
    trainer.setup()
    targets = trainer.targets(trainer.training_users()[:4], np.random.default_rng(0))
    contexts = teacher_contexts(trainer, targets, 12)
    generator = torch.Generator().manual_seed(0)
    offsets = 0.5 * torch.randn(4, *trainer.soft.anchors.shape, generator=generator)
    deep = trainer.shared_prefix(4)
    deep = deep + 0.5 * torch.randn(deep.shape, generator=generator) * deep.abs().mean()
    shared = distillation_teacher(trainer, targets, 12)
    zero = torch.zeros_like(offsets)
    for key, prompt, expected in (("offsets", offsets, trainer.teacher_probabilities(targets, contexts, offsets)),
                                  ("prefix", deep, trainer.teacher_probabilities(targets, contexts, zero, deep))):
        teacher = distillation_teacher(trainer, targets, 12, **{key: prompt})
        torch.testing.assert_close(teacher, expected)
        assert not torch.allclose(teacher, shared, rtol=1e-3, atol=0)
        swapped = distillation_teacher(trainer, targets, 12, **{key: prompt[[1, 0, 2, 3]]})
        torch.testing.assert_close(swapped[2:], teacher[2:])                      # the other users' rows unchanged
        assert not torch.allclose(swapped[0], teacher[0], rtol=1e-3, atol=0)


def test_the_distillation_teacher_mixes_in_the_prediction_without_its_context(tmp_path, tiny_llm_dir):
    """``alone_weight=w``: the teacher is ``w`` times the LLM's prediction without the context plus ``1 - w`` times
    its prediction after it; ``label_scores`` of a teacher's probabilities is ``score_offsets`` of the same reading
    (plain and rating tokens); ``teacher_scores`` scores the mixture, user by user no worse than the same mixture
    of the two readings' NLLs (the log of a mixture is concave) and different from either. ``bare_context``: the
    context part read after the shared token, the part without it after the teacher's offsets."""
    from recbole_uip.token_probe.stages import label_scores, teacher_scores
    from test_trainer import make_trainer

    trainer = make_trainer(tmp_path, tiny_llm_dir)
    trainer.setup()
    targets = trainer.targets(trainer.training_users()[:4], np.random.default_rng(0))
    assert targets.flags is not None
    contexts = teacher_contexts(trainer, targets, 12)
    zero = torch.zeros(4, *trainer.soft.anchors.shape)
    read = trainer.teacher_probabilities(targets, contexts, zero)
    alone = trainer.teacher_probabilities(targets, [[] for _ in contexts], zero)
    torch.testing.assert_close(distillation_teacher(trainer, targets, 12, alone_weight=0.25), 0.25 * alone + 0.75 * read)
    torch.testing.assert_close(distillation_teacher(trainer, targets, 12), read)
    for probabilities, reading in ((read, contexts), (alone, [[] for _ in contexts])):
        plain, rating = label_scores(trainer, targets, probabilities, with_ratings=True)
        expected_plain, expected_rating = trainer.score_offsets(targets, zero, True, contexts=reading)
        np.testing.assert_allclose(plain, expected_plain, rtol=1e-5)
        np.testing.assert_allclose(rating, expected_rating, rtol=1e-5)
    rotate = np.roll(np.arange(4), 1)
    unmixed = teacher_scores(trainer, targets, 12, rotate)
    mixed = teacher_scores(trainer, targets, 12, rotate, alone_weight=0.5)
    without = trainer.score_offsets(targets, zero)
    for mode in ("teacher", "teacher_other"):
        bound = 0.5 * unmixed[mode][0] + 0.5 * without
        assert np.all(mixed[mode][0] <= bound + 1e-6)
        assert not np.allclose(mixed[mode][0], unmixed[mode][0]) and not np.allclose(mixed[mode][0], without)
    assert not np.allclose(mixed["teacher"][0], mixed["teacher_other"][0])
    contexts_only = trainer.teacher_probabilities(targets, contexts, zero)       # the shared token before them
    offsets = 0.5 * torch.randn(4, *trainer.soft.anchors.shape, generator=torch.Generator().manual_seed(0))
    prompted_alone = trainer.teacher_probabilities(targets, [[] for _ in contexts], offsets)
    torch.testing.assert_close(distillation_teacher(trainer, targets, 12, offsets=offsets, alone_weight=0.5,
                                                    bare_context=True), 0.5 * prompted_alone + 0.5 * contexts_only)
    bare = teacher_scores(trainer, targets, 12, rotate, offsets=offsets, alone_weight=0.5, bare_context=True)
    prompted = teacher_scores(trainer, targets, 12, rotate, offsets=offsets, alone_weight=0.5)
    assert not np.allclose(bare["teacher"][0], prompted["teacher"][0])


def test_token_probe_distils_from_a_teacher_with_each_fits_start_with_teacher_prompt(tmp_path, tiny_llm_dir):
    """``--teacher_prompt=start``: the deep fits' teacher reads the user's history with the deep prompt the fit
    starts from; ``--teacher_context=mult_vae``: a Mult-VAE's prediction for the user in place of the history;
    ``--teacher_alone_weight=0.5``: that teacher mixed half and half with the start's prediction alone, and with
    ``--teacher_context_prompt=shared`` its context read after the shared token instead of the start. The
    start and the shared token score as without them, the fits do not; the held-out text as the teacher reads it
    (``teacher``) is, with the shared token and the history, the in-context mode of the same budget to the last
    digit, and follows each flag; the names and the reports say so; without a distilled fit the flags are
    refused, and so is a weight outside [0, 1)."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    base = toy_probe_argv(tmp_path, tiny_llm_dir) + [
        "--fit_objective=distil", "--fit_prefix=deep", "--fit_start=encoder", "--encoder_prefix=deep_shared",
        "--encoder_passes=1", "--encoder_objective=nll", "--fit_learning_rate=0.5", "--distil_context_tokens=12"]
    assert token_probe.main(base + [f"--results={tmp_path / 'shared'}", "--context_tokens=12"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'start'}", "--teacher_prompt=start"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'mv'}", "--teacher_prompt=start",
                                    "--teacher_context=mult_vae"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'mixed'}", "--teacher_prompt=start",
                                    "--teacher_context=mult_vae", "--teacher_alone_weight=0.5"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'bare'}", "--teacher_prompt=start",
                                    "--teacher_context=mult_vae", "--teacher_alone_weight=0.5",
                                    "--teacher_context_prompt=shared"]) == 0
    name = "token_probe_distil_deep_fromencoder{}_encoder_deepshared"
    shared = json.loads(published(tmp_path / "shared", name.format("") + "_context.json").read_text())
    start = json.loads(published(tmp_path / "start", name.format("_teacherstart") + ".json").read_text())
    mv = json.loads(published(tmp_path / "mv", name.format("_teacherstart_teachermultvae") + ".json").read_text())
    mixed = json.loads(published(tmp_path / "mixed", name.format("_teacherstart_teachermultvae_teacheralone0.5")
                                 + ".json").read_text())
    bare = json.loads(published(tmp_path / "bare", name.format("_teacherstart_teachermultvae_teacheralone0.5_contextbare")
                                + ".json").read_text())
    assert start["teacher_prompt"] == "start" and "teacher_prompt" not in shared
    assert mv["teacher_context"] == "mult_vae" and "teacher_context" not in start
    for mode in ("shared", "encoder"):
        assert start["per_user"][mode] == shared["per_user"][mode] == mv["per_user"][mode]
    assert all(x != y for x, y in zip(start["per_user"]["own"], shared["per_user"]["own"]))
    assert all(x != y for x, y in zip(mv["per_user"]["own"], start["per_user"]["own"]))
    for mode in ("own", "other"):
        assert shared["per_user"][f"teacher{'_other' if mode == 'other' else ''}"] == \
            shared["per_user"][f"context12_{mode}"]
    for run in (start, mv):
        assert run["per_user"]["teacher"] != shared["per_user"]["teacher"]
        assert run["per_user"]["teacher"] != run["per_user"]["teacher_other"]
        assert "teacher_minus_encoder" in run["differences"] and "own_minus_teacher" in run["differences"]
    assert mv["per_user"]["teacher"] != start["per_user"]["teacher"]
    assert mixed["teacher_alone_weight"] == 0.5 and "teacher_alone_weight" not in mv
    assert mixed["per_user"]["encoder"] == mv["per_user"]["encoder"]
    assert bare["teacher_context_prompt"] == "shared" and "teacher_context_prompt" not in mixed
    for mode in ("own", "teacher", "teacher_other"):
        assert all(x != y for x, y in zip(mixed["per_user"][mode], mv["per_user"][mode]))
        assert all(x != y for x, y in zip(bare["per_user"][mode], mixed["per_user"][mode]))
    report = published(tmp_path / "start", name.format("_teacherstart") + ".md").read_text()
    assert "the teacher reads each fit's start prompt, then the user's newest" in report
    report = published(tmp_path / "mv", name.format("_teacherstart_teachermultvae") + ".md").read_text()
    assert "then the last 12 tokens of a text of items a Mult-VAE predicts" in report
    assert "the distillation teacher with the user's context - with another user's" in report
    report = published(tmp_path / "mixed", name.format("_teacherstart_teachermultvae_teacheralone0.5") + ".md")
    assert "its predictions mixed, weight 0.5, with the LLM's without the context" in report.read_text()
    report = published(tmp_path / "bare", name.format("_teacherstart_teachermultvae_teacheralone0.5_contextbare")
                       + ".md").read_text()
    assert "the context read after the shared token, without the start prompt" in report
    for flag in ("--teacher_prompt=start", "--teacher_context=mult_vae", "--teacher_alone_weight=0.5"):
        with pytest.raises(SystemExit):
            token_probe.parse_args(toy_probe_argv(tmp_path, tiny_llm_dir) + [flag])
    for extra in (["--teacher_alone_weight=1"], ["--teacher_alone_weight=-0.1"], ["--teacher_context_prompt=shared"],
                  ["--teacher_context_prompt=shared", "--teacher_alone_weight=0.5"]):     # the last without start
        with pytest.raises(SystemExit):
            token_probe.parse_args(base + extra)


@pytest.mark.parametrize("encoder_prefix", ["shallow", "deep_shared"])
def test_token_probe_loads_a_cached_start_with_the_trained_starts_results(tmp_path, tiny_llm_dir, encoder_prefix):
    """``--start_cache=DIR``: the first run writes its trained start (the shift and the encoder stage, shallow or
    deep), the next loads it, and both score every mode as a run without the cache, to the last digit. An argument
    of a stage trains (and caches) another start; one of the fits only loads the same; a damaged file is reported
    and trained over."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    base = toy_probe_argv(tmp_path, tiny_llm_dir) + [
        "--encoder_passes=1", f"--encoder_prefix={encoder_prefix}", "--fit_start=encoder",
        "--fit_learning_rate=0.5"] + (["--fit_prefix=deep"] if encoder_prefix != "shallow" else [])

    def run(name: str, *extra: str, cached: bool = True) -> dict:
        argv = base + [f"--results={tmp_path / name}", *extra] + ([f"--start_cache={cache}"] if cached else [])
        assert token_probe.main(argv) == 0
        return json.loads(published(tmp_path / name, "token_probe*.json").read_text())

    plain, first, second = run("plain", cached=False), run("first"), run("second")
    assert "start_cache" not in plain and first["start_cache"] == "written" and second["start_cache"] == "loaded"
    for loaded in (first, second):
        assert loaded["per_user"] == plain["per_user"]
        assert (loaded["shift_nll"], loaded["encoder_nll"]) == (plain["shift_nll"], plain["encoder_nll"])
    (written,) = cache.iterdir()
    if encoder_prefix == "shallow":
        return
    assert run("passes", "--encoder_passes=2")["start_cache"] == "written" and len(list(cache.iterdir())) == 2
    assert run("steps", "--fit_steps=2")["start_cache"] == "loaded"
    written.write_bytes(b"not a start")
    again = run("again")
    assert again["start_cache"] == "written" and again["per_user"] == plain["per_user"]
    assert run("loaded_again")["start_cache"] == "loaded"


def test_zoo_grids_of_one_setting_share_its_folder_and_keep_every_command(tmp_path, tiny_llm_dir):
    """Two zoo grids (id_free, then standard) of the same settings land in one folder named by the settings'
    fingerprint; its meta keeps both portable commands and the granularity of every ID set either used, a rerun
    adds no run and no command, and the report names both commands."""
    zoo = import_benchmark("zoo")
    from recbole_uip.benchmarking import read_records

    write_dataset(tmp_path / "data")
    common = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--models=FM", "--seeds=1", "--epochs=2",
              f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
              "--uip_codebook_size=3", "--uip_item_text_fields=[movie_title,class]", "--threshold={rating: 4}",
              "--load_col={inter: [user_id, item_id, rating, timestamp], item: [item_id, movie_title, class]}",
              f"--checkpoint_dir={tmp_path / 'saved'}", f"--uip_output_dir={tmp_path / 'out'}",
              "--feature_sets=none,uip"]
    assert zoo.main(common + ["--settings=id_free"]) == 0
    assert zoo.main(common[:-1] + ["--feature_sets=none,uip,shuffled", "--settings=standard"]) == 0
    assert zoo.main(common + ["--settings=id_free"]) == 0                 # everything done: nothing runs again
    (folder,) = (tmp_path / "results" / "toy").iterdir()
    meta = json.loads((folder / "zoo.meta.json").read_text())
    assert folder == results_dir(meta["record"], tmp_path / "results")
    assert len(meta["commands"]) == 2 and str(tmp_path) not in json.dumps(meta)
    assert [c.split()[-1] for c in meta["commands"]] == ["--settings=id_free", "--settings=standard"]
    assert sorted(meta["granularity"]) == ["shuffled", "uip"]     # the rerun kept the standard grid's set
    runs = read_records(folder / "zoo.jsonl")
    assert sorted((r["setting"], r["feature_set"]) for r in runs) == [
        ("id_free", "none"), ("id_free", "uip"), ("standard", "none"), ("standard", "shuffled"), ("standard", "uip")]
    report = (folder / "zoo.md").read_text()
    assert all(f"`{c}`" in report for c in meta["commands"])
    assert re.search(r"\| shuffled \| \d+ of \d+ users \|", report)     # its row in the granularity table
    profiles = (folder / "profile_report.md").read_text()
    assert re.search(r"\| hobby( \| 1\.00)+ \|", profiles)      # no EM round: the untrained encoder weighs z alike
    assert json.loads((folder / "settings.json").read_text())["settings"] == meta["record"]["settings"]

    kept = {name: (folder / name).read_bytes() for name in ("settings.json", "zoo.meta.json")}
    (folder / "profile_report.md").unlink()
    assert zoo.main(common + ["--settings=id_free", "--report_only"]) == 0   # a redraw of the profile report alone
    assert (folder / "profile_report.md").is_file()
    assert {name: (folder / name).read_bytes() for name in kept} == kept     # the grid's record and commands kept


def test_zoo_writes_the_banks_two_controls_and_refuses_a_bank_without_them(tmp_path, tiny_llm_dir):
    """``uip-untrained`` and ``uip-random-step`` are the bank's ``initial_codes`` and ``random_step_codes``, user by
    user, and the k-means redraws use their own seeds; a bank without the random-direction control (format 5, free
    tokens), without the encoder that ``kmeans-llm-weighted`` weighs z by, or a run whose whitened metric ignores
    those weights and the offsets' Euclidean distances, gets an error that says why."""
    import dataclasses
    import logging

    zoo = import_benchmark("zoo")
    from conftest import uip_config_dict
    from recbole_uip.bank import FeatureBank
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.atomic import read_atomic
    from recbole_uip.recbole_config import build_config, check_dataset_files

    write_dataset(tmp_path / "data")
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip=True))
    settings = UIPSettings.from_config(config)
    users = [str(u) for u in range(1, 25)]
    rng = np.random.default_rng(0)
    codes = {name: rng.integers(0, 3, size=(24, 2)).astype(np.int64) for name in ("codes", "initial", "random")}
    bank = FeatureBank(fingerprint="f" * 64, profiles=settings.profile_names, users=users, codes=codes["codes"],
                       codebooks=[np.zeros((3, 4), np.float32)] * 2, no_history_token="none",
                       initial_codes=codes["initial"], random_step_codes=codes["random"])
    folders = zoo.prepare_id_sets(config, settings, check_dataset_files(config), tmp_path / "out" / "toy-uip", bank,
                                  {"uip", "uip-untrained", "uip-random-step"}, logging.getLogger("test"))
    for id_set, expected in (("uip-untrained", codes["initial"]), ("uip-random-step", codes["random"])):
        table = read_atomic(folders[id_set] / f"{folders[id_set].name}.user")
        row_of = {row[0]: row for row in table.rows}
        for p, field in enumerate(settings.field_names):
            column = table.fields.index(field)
            assert [row_of[u][column] for u in users] == [str(v) for v in expected[:, p]]
    # the redraws: z and the final offsets k-means'd again, draw d with the seeds 10 (d - 1) + column
    from recbole_uip.feature_sets import kmeans_columns, offset_kmeans_columns
    vectors = dataclasses.replace(bank, summaries=rng.normal(size=(24, 3)).astype(np.float32),
                                  offsets=rng.normal(size=(24, 2, 4)).astype(np.float32))
    redraws = zoo.prepare_id_sets(config, settings, check_dataset_files(config), tmp_path / "out5" / "toy-uip",
                                  vectors, {"uip", "kmeans-llm-draw2", "kmeans-offsets", "kmeans-offsets-draw3"},
                                  logging.getLogger("test"))
    for id_set, expected in (("kmeans-llm-draw2", kmeans_columns(vectors.summaries, [3, 3], first_seed=10)),
                             ("kmeans-offsets", offset_kmeans_columns(vectors.offsets, [3, 3])),
                             ("kmeans-offsets-draw3", offset_kmeans_columns(vectors.offsets, [3, 3], first_seed=20))):
        table = read_atomic(redraws[id_set] / f"{redraws[id_set].name}.user")
        row_of = {row[0]: row for row in table.rows}
        for p, field in enumerate(settings.field_names):
            assert [row_of[u][table.fields.index(field)] for u in users] == [str(v) for v in expected[:, p]]
    assert not np.array_equal(offset_kmeans_columns(vectors.offsets, [3, 3]),
                              offset_kmeans_columns(vectors.offsets, [3, 3], first_seed=20))    # other draws
    with pytest.raises(ValueError, match="random-direction control"):
        zoo.prepare_id_sets(config, settings, check_dataset_files(config), tmp_path / "out2" / "toy-uip",
                            dataclasses.replace(bank, random_step_codes=None), {"uip", "uip-random-step"},
                            logging.getLogger("test"))
    with pytest.raises(ValueError, match="no encoder"):                  # nothing to weigh z's columns by
        zoo.prepare_id_sets(config, settings, check_dataset_files(config), tmp_path / "out3" / "toy-uip", bank,
                            {"uip", "kmeans-llm-weighted"}, logging.getLogger("test"))
    with pytest.raises(ValueError, match="needs the euclidean metric"):  # whitened: the weights are not the metric
        zoo.prepare_id_sets(config, dataclasses.replace(settings, quantiser_metric="whitened"),
                            check_dataset_files(config), tmp_path / "out4" / "toy-uip", bank,
                            {"uip", "kmeans-llm-weighted"}, logging.getLogger("test"))
    with pytest.raises(ValueError, match="kmeans-offsets-draw2 needs the euclidean metric"):
        zoo.prepare_id_sets(config, dataclasses.replace(settings, quantiser_metric="whitened"),
                            check_dataset_files(config), tmp_path / "out6" / "toy-uip", vectors,
                            {"uip", "kmeans-offsets-draw2"}, logging.getLogger("test"))


def test_in_context_scoring_matches_one_unpadded_sequence_at_a_time(tmp_path, tiny_llm_dir):
    """The in-context benchmark's batched, left-padded scoring gives each sequence the NLL it gets alone, and its
    rating-token mean covers the flagged tokens only; the benchmark then runs end to end on the toy data."""
    import torch

    in_context = import_benchmark("in_context")
    from recbole_uip.inference.llm import load_frozen_llm

    llm = load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32")
    rng = np.random.default_rng(0)
    sequences = [(rng.integers(5, 100, h).tolist(), rng.integers(5, 100, t).tolist(), [i % 3 == 0 for i in range(t)])
                 for h, t in ((3, 4), (12, 2), (1, 7), (20, 5))]
    batched = in_context.score(llm, sequences, batch_size=3)
    for (head, target, flags), (plain, rating) in zip(sequences, batched):
        ids = torch.tensor([head + target])
        logp = torch.log_softmax(llm.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        nll = -logp[-len(target):].gather(1, torch.tensor(target).unsqueeze(1)).squeeze(1).numpy()
        assert plain == pytest.approx(nll.mean(), abs=1e-4)
        assert rating == pytest.approx(nll[np.array(flags)].mean(), abs=1e-4)

    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--context_tokens=8,32",
            "--users=0", f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            f"--checkpoint_dir={tmp_path / 'saved'}"]
    assert in_context.main(argv) == 0
    (folder,) = (tmp_path / "results" / "toy").iterdir()
    data = json.loads((folder / "in_context.json").read_text())
    assert data["users_evaluated"] == 24 and [b["budget"] for b in data["budgets"]] == [8, 32]
    short, long = data["budgets"]
    assert 0 < short["context_tokens_mean"] <= 8 < long["context_tokens_mean"] <= 32
    assert short["plain"]["none"] == long["plain"]["none"]               # no context: the same scores
    assert "own - other" in (folder / "in_context.md").read_text()
    assert data["per_user"]["newest8_own"] and "oldest8_own" not in data["per_user"]
    # both ends of the history in one run: the newest end's scores are the run's above, user by user
    argv = [a for a in argv if not a.startswith("--results")] + [f"--results={tmp_path / 'ends'}"]
    assert in_context.main(argv + ["--context_from=oldest,newest"]) == 0
    ends = json.loads(published(tmp_path / "ends", "in_context_newest_oldest.json").read_text())
    assert ends["context_from"] == ["newest", "oldest"]
    assert [(b["budget"], b["context_from"]) for b in ends["budgets"]] == [(8, "newest"), (8, "oldest"),
                                                                          (32, "newest"), (32, "oldest")]
    per_user = ends["per_user"]
    assert per_user["users"] == data["per_user"]["users"] and len(per_user["users"]) == 24
    for n in (8, 32):
        assert per_user[f"newest{n}_own"] == data["per_user"][f"newest{n}_own"]
        assert per_user[f"oldest{n}_own"] != per_user[f"newest{n}_own"]            # another context is read
    own_n, own_o = np.array(per_user["newest32_own"]), np.array(per_user["oldest32_own"])
    other_n, other_o = np.array(per_user["newest32_other"]), np.array(per_user["oldest32_other"])
    (compared,) = [e for e in ends["ends"] if e["budget"] == 32]
    assert compared["plain"]["own_newest_minus_own_oldest"]["mean"] == pytest.approx((own_n - own_o).mean())
    assert compared["plain"]["gap_newest_minus_gap_oldest"]["mean"] == pytest.approx(
        ((own_n - other_n) - (own_o - other_o)).mean())
    report = published(tmp_path / "ends", "in_context_newest_oldest.md").read_text()
    assert "| oldest |" in report and "The newest end against the oldest, user by user" in report
    for bad in ("--context_from=random", "--context_from=newest,newest", "--context_from=", "--context_tokens=a",
                "--population=-1"):
        with pytest.raises(SystemExit):
            in_context.parse_args(["--dataset=toy", bad])


def test_in_context_reads_a_collaborative_models_prediction_in_place_of_the_history(tmp_path, tiny_llm_dir):
    """``--context_source=mult_vae`` and ``mult_vae_top``: the same users and held-out text (``none`` bit-identical
    to the history run's), other contexts (``own`` differs), the mixture's members read from the same source, and
    the report says what the contexts are; the oldest end is refused (a prediction has none)."""
    in_context = import_benchmark("in_context")
    write_dataset(tmp_path / "data")
    base = ["--dataset=toy", "--holdout_tokens=20", "--context_tokens=16", "--users=0", "--population=2",
            f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            f"--checkpoint_dir={tmp_path / 'saved'}"]
    runs = {}
    for source in ("history", "mult_vae", "mult_vae_top"):
        assert in_context.main(base + [f"--results={tmp_path / source}", f"--context_source={source}"]) == 0
        name = {"history": "in_context", "mult_vae": "in_context_multvae", "mult_vae_top": "in_context_multvae_top"}[source]
        runs[source] = json.loads(published(tmp_path / source, f"{name}_population2.json").read_text())
        assert runs[source]["context_source"] == source
    history, drawn, top = (runs[s]["per_user"] for s in ("history", "mult_vae", "mult_vae_top"))
    assert drawn["none"] == history["none"] == top["none"] and drawn["users"] == history["users"]
    assert drawn["newest16_own"] != history["newest16_own"] and drawn["newest16_own"] != top["newest16_own"]
    assert drawn["newest16_population"] != history["newest16_population"]
    assert 0 < runs["mult_vae"]["budgets"][0]["context_tokens_mean"] <= 16
    report = published(tmp_path / "mult_vae_top", "in_context_multvae_top_population2.md").read_text()
    assert "a collaborative model's prediction for the user as text" in report and "most probable first" in report
    assert "drawn from its distribution" in published(tmp_path / "mult_vae", "in_context_multvae_population2.md").read_text()
    with pytest.raises(SystemExit):
        in_context.parse_args(["--dataset=toy", "--context_source=mult_vae", "--context_from=newest,oldest"])


def test_in_context_mixture_of_other_users_histories(tmp_path, tiny_llm_dir):
    """``--population=M`` scores each held-out token under the equal mixture of M other users' predictive
    distributions: a mixture of one is the ``other`` condition itself, a mixture of several is never worse than its
    members' average, and the members are distinct other users, the first being ``other``'s. The mixtures that hold
    the user's own history: the own history in place of ``other``'s, and half own, half the mixture."""
    in_context = import_benchmark("in_context")

    nll = [np.array([0.5, 2.0]), np.array([1.5, 0.1])]
    expected = [-np.log((np.exp(-0.5) + np.exp(-1.5)) / 2), -np.log((np.exp(-2.0) + np.exp(-0.1)) / 2)]
    (mixed,) = in_context.mixture_nlls([[nll[0]], [nll[1]]])
    assert mixed == pytest.approx(expected)
    (alone,) = in_context.mixture_nlls([[nll[0]]])
    assert alone == pytest.approx(nll[0])
    users, other = np.arange(10, 16), np.array([11, 12, 13, 14, 15, 10])
    members = in_context.population_members(users, other, 4)
    assert (members[:, 0] == other).all() and not (members == users[:, None]).any()
    assert all(len(set(row)) == 4 and set(row) <= set(users) for row in members)
    with pytest.raises(ValueError, match="needs more than 6 users"):
        in_context.population_members(users, other, 6)
    outside = in_context.outside_users(users, members)          # the other_half control's: in neither
    assert all(o in users and o != u and o not in row for u, o, row in zip(users, outside, members))
    with pytest.raises(ValueError, match="needs more than 6 users"):
        in_context.outside_users(users, in_context.population_members(users, other, 5))

    write_dataset(tmp_path / "data")
    base = ["--dataset=toy", "--holdout_tokens=20", "--context_tokens=16", "--users=0", "--context_from=oldest",
            f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            f"--checkpoint_dir={tmp_path / 'saved'}"]
    runs = {}
    for size in (1, 3):
        assert in_context.main(base + [f"--results={tmp_path / str(size)}", f"--population={size}"]) == 0
        (path,) = (tmp_path / str(size) / "toy").glob(f"*/in_context_oldest_population{size}.json")
        runs[size] = json.loads(path.read_text())
    one, three = runs[1]["per_user"], runs[3]["per_user"]
    assert one["oldest16_population"] == pytest.approx(one["oldest16_other"], abs=1e-6)
    assert one["oldest16_own"] == three["oldest16_own"] and one["oldest16_other"] == three["oldest16_other"]
    (budget,) = runs[3]["budgets"]
    population = budget["population"]["plain"]
    assert population["population"]["mean"] <= population["others_mean"]["mean"] + 1e-9
    assert population["own_minus_population"]["mean"] == pytest.approx(
        np.mean(np.array(three["oldest16_own"]) - np.array(three["oldest16_population"])))
    assert three["oldest16_population"] != three["oldest16_other"]           # the other members are read
    # the mixtures that hold the user's own history: with M = 1 the own history replaces the only member
    assert one["oldest16_own_in_population"] == pytest.approx(one["oldest16_own"], abs=1e-6)
    own, mixture, half = (np.array(three[f"oldest16_{k}"]) for k in ("own", "population", "own_half"))
    assert (half <= (own + mixture) / 2 + 1e-9).all() and (half != own).any()
    control = np.array(three["oldest16_other_half"])                  # one more user's context in place of the own
    assert (control <= mixture + np.log(2) + 1e-9).all() and (control != half).any()
    assert population["own_half_minus_other_half"]["mean"] == pytest.approx((half - control).mean())
    report = published(tmp_path / "3", "in_context_oldest_population3.md").read_text()
    assert "Against a mixture of 3 other users' histories" in report and "own - mixture" in report
    assert "own and mixture - one more user's and mixture" in report


def test_held_out_items_never_reach_inference(tmp_path, tiny_llm_dir):
    """Changing the held-out items (and their ratings) leaves the inferred offsets bit-identical, and the items only
    they hold are not even embedded; nor do they reach the in-context benchmark's collaborative contexts (the
    Mult-VAE's predictions written as text, ``--context_source=mult_vae``), drawn or most probable first."""
    import logging

    import torch

    from conftest import uip_config_dict
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.quick_start import build_config, check_dataset_files

    write_dataset(tmp_path / "data")
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_epochs=1, uip_line_search_users=4))
    settings = UIPSettings.from_config(config)
    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
    llm = load_frozen_llm(str(tiny_llm_dir), torch.device("cpu"), "float32")
    held = held_out_positions(BehaviourText(histories, settings, llm.tokenizer), 20)
    assert all(0 < len(h) < len(items) for h, items in zip(held, histories.items))
    keep = [len(items) - len(h) for items, h in zip(histories.items, held)]
    remaining = histories.truncated(keep)
    kept_items = {histories.item_ids[i] for items, k in zip(histories.items, keep) for i in items[:k]}
    assert set(remaining.item_ids) == kept_items and len(kept_items) <= len(histories.item_ids)
    for before, after, k in zip(histories.items, remaining.items, keep):
        assert [histories.item_ids[i] for i in before[:k]] == [remaining.item_ids[i] for i in after]
    in_context = import_benchmark("in_context")
    users = np.arange(len(histories.items))
    offsets, contexts = [], []
    for variant in range(2):
        if variant:   # other held-out items and ratings
            for items, ratings, k in zip(histories.items, histories.ratings, keep):
                items[k:] = (items[k:] + 1) % len(histories.item_ids)
                ratings[k:] = 6 - ratings[k:]
        remaining = histories.truncated(keep)
        trainer = ProfileInferenceTrainer(config, settings, llm, remaining, BehaviourText(remaining, settings, llm.tokenizer),
                                          logging.getLogger("test"))
        offsets.append(trainer.fit().offsets)
        contexts.append([[in_context.collaborative_source(histories, held, settings, llm.tokenizer, logging.getLogger("test"),
                                                          users, top)(u, 30) for u in users] for top in (False, True)])
    np.testing.assert_array_equal(offsets[0], offsets[1])
    assert contexts[0] == contexts[1] and contexts[0][0] != contexts[0][1] and all(map(len, contexts[0][0]))


def test_cold_start_split_holds_users_out_entirely_and_reveals_their_oldest_rows_only():
    from recbole_uip.benchmarking import split_cold_start

    rng = np.random.default_rng(3)
    users = [str(u) for u in rng.integers(0, 50, size=2000)]
    times = rng.permutation(2000).astype(float).tolist()
    split = split_cold_start(users, times, holdout=0.2, onboarding=10, valid_share=0.1, seed=0)
    cold = set(split["cold"].tolist())
    assert len(cold) == 10
    every = np.concatenate([split[k] for k in ("train", "valid", "warm_test", "onboarding", "test")])
    assert sorted(every.tolist()) == list(range(2000)) and len(split["warm_test"]) == 0   # a partition of the rows
    assert not cold & {users[r] for r in np.concatenate([split["train"], split["valid"]])}   # no cold row trains
    assert {users[r] for r in split["onboarding"]} == cold == {users[r] for r in split["test"]}
    for user in cold:
        revealed = [times[r] for r in split["onboarding"] if users[r] == user]
        rest = [times[r] for r in split["test"] if users[r] == user]
        assert len(revealed) == 10 and max(revealed) < min(rest)                # the oldest 10, then the rest
    assert 0.05 < len(split["valid"]) / (len(split["train"]) + len(split["valid"])) < 0.15
    again = split_cold_start(users, times, holdout=0.2, onboarding=10, valid_share=0.1, seed=0)
    assert all(np.array_equal(again[k], split[k]) for k in split)              # deterministic
    # the known users' own test rows: out of training and of early stopping, the held-out users' rows unchanged
    tested = split_cold_start(users, times, holdout=0.2, onboarding=10, valid_share=0.1, seed=0, test_share=0.1)
    every = np.concatenate([tested[k] for k in ("train", "valid", "warm_test", "onboarding", "test")])
    assert sorted(every.tolist()) == list(range(2000))
    assert not cold & {users[r] for r in tested["warm_test"]}
    assert 0.05 < len(tested["warm_test"]) / (len(tested["train"]) + len(tested["valid"]) + len(tested["warm_test"])) < 0.15
    assert all(np.array_equal(tested[k], split[k]) for k in ("valid", "onboarding", "test", "cold"))
    assert set(tested["train"].tolist()) == set(split["train"].tolist()) - set(tested["warm_test"].tolist())


def test_group_metrics_match_recboles_own_test_result_and_split_it_by_user_group(tmp_path, tiny_llm_dir):
    """One group: AUC and LogLoss as RecBole computes them on the same test data; two groups: each its own rows."""
    from conftest import uip_config_dict, write_dataset

    from recbole_uip.ctr_runs import group_metrics
    from recbole_uip.quick_start import build_config, run_recbole_with_config

    write_dataset(tmp_path / "data", n_users=40, per_user=12)
    config = build_config("FM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip=False, epochs=2,
                                                               metric_decimal_place=6))
    result = run_recbole_with_config(config, saved=True, after_test=lambda model, data: (
        group_metrics(model, data, lambda user: "all"), group_metrics(model, data, lambda user: "even" if int(user) % 2 == 0 else "odd")))
    one, two = result["after_test"]
    assert one["all"]["auc"] == pytest.approx(result["test_result"]["auc"], abs=2e-6)
    assert one["all"]["logloss"] == pytest.approx(result["test_result"]["logloss"], abs=2e-6)
    assert set(two) == {"even", "odd"} and two["even"]["rows"] + two["odd"]["rows"] == one["all"]["rows"]
    assert two["even"]["auc"] != two["odd"]["auc"]


def test_benchmark_parser_has_the_shared_flags_and_passes_overrides_on():
    from recbole_uip.benchmarking import benchmark_parser

    parser = benchmark_parser("What it measures.\n\nDetails.")
    parser.add_argument("--extra", type=int, default=1)
    args, overrides = parse_known_with_overrides(parser, ["--extra=3", "--uip_epochs=2", "--dataset=toy"])
    assert (args.dataset, args.extra, overrides) == ("toy", 3, {"uip_epochs": 2}) and Path(args.results).name == "results"
    assert parser.description == "What it measures."
    with pytest.raises(SystemExit):
        parse_known_with_overrides(parser, ["stray"])


def test_publish_result_writes_both_files_and_prints_the_report(tmp_path, capsys):
    from recbole_uip.benchmarking import publish_result

    json_path, md_path = publish_result(tmp_path / "ml-100k" / "x", "report", {"a": 1}, "# Title\n\nbody")
    assert json.loads(json_path.read_text()) == {"a": 1} and md_path.read_text() == "# Title\n\nbody\n"
    out = capsys.readouterr().out
    assert out.startswith("# Title") and f"written: {json_path}, {md_path}" in out


def _record(command: list[str], date: str = "2026-12-01", epochs: int = 2) -> dict:
    return {"command": command, "date": date, "cpu": "cpu", "llm": "bundled-smollm2", "dataset": "toy",
            "settings": {"epochs": epochs, "codebook_sizes": {"hobby": 8}}}


def test_settings_json_of_one_result_is_its_record_without_machine_paths(tmp_path):
    from recbole_uip.benchmarking import publish_result

    folder = tmp_path / "toy" / "one"
    record = _record(["benchmarks/serving.py", f"--data_path={tmp_path}/data", "--uip_epochs=2"])
    publish_result(folder, "serving", {"record": record, "value": 1}, "# Serving")
    written = json.loads((folder / "settings.json").read_text())
    assert written == {**record, "command": ["benchmarks/serving.py", "--data_path=.../data", "--uip_epochs=2"]}
    assert str(tmp_path) not in (folder / "settings.json").read_text()


def test_settings_json_keeps_what_results_share_at_the_top_and_each_results_own_values(tmp_path):
    from recbole_uip.benchmarking import folder_records, write_result, write_settings_json

    folder = tmp_path / "toy" / "two"
    write_result(folder, "serving", {"record": _record(["benchmarks/serving.py"])}, "a")
    write_result(folder, "scale", {"runs": [{"record": _record(["benchmarks/scale.py"], "2026-12-02")}, {"x": 1}]}, "b")
    write_json_atomic(folder / "zoo.meta.json", {"command": "python benchmarks/zoo.py", "record": _record(["benchmarks/zoo.py"])})
    write_json_atomic(folder / "plain.json", {"no": "record"})
    assert sorted(folder_records(folder)) == ["scale.runs[0]", "serving", "zoo"]
    written = json.loads(write_settings_json(folder).read_text())
    assert written["settings"] == {"epochs": 2, "codebook_sizes": {"hobby": 8}} and written["llm"] == "bundled-smollm2"
    assert "command" not in written and "date" not in written
    assert written["results"] == {"scale.runs[0]": {"command": ["benchmarks/scale.py"], "date": "2026-12-02"},
                                  "serving": {"command": ["benchmarks/serving.py"], "date": "2026-12-01"},
                                  "zoo": {"command": ["benchmarks/zoo.py"], "date": "2026-12-01"}}
    # differing settings are never merged: each result keeps its own
    write_result(folder, "serving", {"record": _record(["benchmarks/serving.py"], epochs=5)}, "a")
    written = json.loads(write_settings_json(folder).read_text())
    assert "settings" not in written and written["results"]["serving"]["settings"]["epochs"] == 5
    assert written["results"]["zoo"]["settings"]["epochs"] == 2


def test_settings_json_is_not_written_without_a_record(tmp_path):
    from recbole_uip.benchmarking import publish_result, write_settings_json

    folder = tmp_path / "toy" / "none"
    publish_result(folder, "kill_resume", {"cpu": "x", "flags": ["--uip_epochs=1"]}, "# K")
    assert write_settings_json(folder) is None and not (folder / "settings.json").exists()


def test_jsonl_records_survive_a_torn_last_line(tmp_path):
    from recbole_uip.benchmarking import append_record, read_records

    path = tmp_path / "runs" / "grid.jsonl"
    assert read_records(path) == []
    append_record(path, {"b": 2, "a": 1})
    append_record(path, {"a": 3})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"a": 4, "tor')                # a kill mid-write
    assert read_records(path) == [{"a": 1, "b": 2}, {"a": 3}]
    assert path.read_text().splitlines()[0] == '{"a": 1, "b": 2}'


def test_goal_verdict_says_whether_a_met_gap_to_the_mean_is_the_users():
    """own - mean is the issue's goal; beside it, own - another user's says whether the gap is the user's (the mean
    of fitted tokens can be a worse token than any one of them)."""
    met = {"mean": -0.06, "ci": [-0.08, -0.04]}
    assert "met**" in goal_verdict(met) and "not met" not in goal_verdict(met)
    assert "not met" in goal_verdict({"mean": -0.03, "ci": [-0.045, -0.015]})     # below zero, short of 0.05
    assert "not met" in goal_verdict({"mean": -0.06, "ci": [-0.12, +0.001]})      # interval reaching zero
    theirs = goal_verdict(met, own_minus_other={"mean": -0.02, "ci": [-0.03, -0.01]})
    anyones = goal_verdict(met, own_minus_other={"mean": -0.0015, "ci": [-0.018, 0.016]})
    assert "the gap is the user's" in theirs and "met**" in theirs
    assert "not shown to be the user's" in anyones and "-0.0015" in anyones and "met**" in anyones
    # own beats another user's, loses to the mean: something of the user, no gap to call theirs
    named = goal_verdict(met, reference=("a random group's token", "a random group's"))
    assert "below a random group's token" in named and "(own - a random group's -0.0600" in named
    worse = goal_verdict({"mean": 0.019, "ci": [0.001, 0.037]}, own_minus_other={"mean": -0.02, "ci": [-0.04, -0.001]})
    assert "not met" in worse and "carry something of the user" in worse and "the gap is the user's" not in worse


def test_fmt_p():
    from recbole_uip.benchmarking import fmt_p

    assert (fmt_p(float("nan")), fmt_p(0.04321), fmt_p(0.00012345)) == ("n/a", "0.043", "1.2e-04")


def test_explained_variance_is_eta_squared():
    from recbole_uip.report import explained_variance

    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert explained_variance(values, np.array([0, 0, 1, 1])) == pytest.approx(16 / 20)   # between / total
    assert explained_variance(values, np.array([0, 1, 2, 3])) == pytest.approx(1.0)
    assert explained_variance(values, np.zeros(4, dtype=int)) == pytest.approx(0.0)


def test_latest_records_keep_the_last_signatures_runs():
    from recbole_uip.benchmarking import latest_records

    records = [{"signature": "a", "n": 1}, {"signature": "b", "n": 2}, {"signature": "a", "n": 3}]
    assert latest_records(records) == [{"signature": "a", "n": 1}, {"signature": "a", "n": 3}]
    assert latest_records([]) == []


def test_the_proxy_check_reads_each_id_set_the_grid_used_aligned_with_the_users(tmp_path):
    """``benchmarks/ctr_proxy_check.py`` scores the ID sets as the grid wrote them: every ``uip_*`` column of each
    set's ``.user`` file, in the order of the users it is given; sets without a file are left out."""
    ctr_proxy_check = import_benchmark("ctr_proxy_check")
    for stem, rows in (("toy-uip", ["2\t0\ta\t7", "1\t3\tb\t7", "3\t3\ta\t9"]),
                       ("toy-uipzoo-shuffled", ["1\t5\tx\t7", "2\t5\ty\t7", "3\t6\ty\t7"])):
        (tmp_path / stem).mkdir()
        (tmp_path / stem / f"{stem}.user").write_text(
            "user_id:token\tuip_hobby:token\tuip_background:token\tage:token\n" + "\n".join(rows) + "\n")
    sets = ctr_proxy_check.id_sets(tmp_path, "toy", ["1", "2", "3"], ["uip", "shuffled", "none"])
    assert set(sets) == {"uip", "shuffled"}
    assert sets["uip"].shape == (3, 2)
    uip = sets["uip"]                                         # users 1, 2, 3: hobby 3, 0, 3; background b, a, a
    assert uip[0, 0] == uip[2, 0] != uip[1, 0] and uip[1, 1] == uip[2, 1] != uip[0, 1]
    shuffled = sets["shuffled"]                               # hobby 5, 5, 6; background x, y, y
    assert shuffled[0, 0] == shuffled[1, 0] != shuffled[2, 0] and shuffled[1, 1] == shuffled[2, 1] != shuffled[0, 1]


def test_count_reference_scores_the_generalisation_benchmarks_held_out_items(tmp_path, tiny_llm_dir):
    """The count reference runs end to end on the toy data: its users and held-out items are the in-context and
    generalisation benchmarks' (``held_out_positions``), its per-user gain is the models' NLL difference per token,
    and the report names each user model."""
    count_reference = import_benchmark("count_reference")
    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--users=0,10",
            f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            f"--checkpoint_dir={tmp_path / 'saved'}"]
    assert count_reference.main(argv) == 0
    (path,) = (tmp_path / "results" / "toy").glob("*/count_reference.json")
    data = json.loads(path.read_text())
    every, first = data["summaries"]
    assert (every["label"], every["users"], first["label"], first["users"]) == ("all", 24, "first 10", 10)
    per_user = data["per_user"]
    assert per_user["users"] == list(range(24)) and min(per_user["tokens"]) > 0     # at least one item each
    assert data["held_out_tokens_mean"] == pytest.approx(np.mean(per_user["tokens"]))
    for model in ("set", "recent", "sequence"):
        gains = np.array(per_user[f"{model}_gain_per_token"])
        assert every["models"][model]["gain_per_token"]["mean"] == pytest.approx(gains.mean())
        assert gains == pytest.approx(np.array(per_user[f"{model}_text_gain_per_token"]) +
                                      np.array(per_user[f"{model}_rating_gain_per_token"]))
    # the toy's two groups prefer different genres: the user's history predicts which (their ratings follow the
    # genre, which the item's text names, so the population predicts those as well)
    assert every["models"]["set"]["text_gain_per_token"]["ci"][0] > 0
    assert np.isfinite(every["models"]["population"]["rating_nll_per_item"]["mean"])
    # the toy has timestamps: each item counted once, within the hour of the user's newest remaining item or later
    held_items = round(data["held_out_items_mean"] * data["users_with_held_out"])
    assert all(sum(g["items"] for g in by.values()) == held_items for by in data["by_gap"].values())
    report = path.with_suffix(".md").read_text()
    assert "the history as a set" in report and "+ what followed its last items" in report and "gain per item, later" in report
    for bad in ("--users=a", "--users=-1", "--holdout_tokens=0"):
        with pytest.raises(SystemExit):
            count_reference.parse_args(["--dataset=toy", bad])


def test_the_probes_encoder_can_read_a_mult_vae_code_of_the_same_items(tmp_path, tiny_llm_dir):
    """``--encoder_input=mult_vae``: ``z`` becomes a Mult-VAE's ``k``-dimensional code of exactly the items at the
    given positions, standardised over the users' whole histories, the Mult-VAE trained on every user's history but
    those the encoder trains on; the run records it and names its files by it, and without an encoder stage it is
    refused."""
    from recbole_uip import mult_vae
    from test_trainer import make_trainer

    token_probe = import_benchmark("token_probe")
    trainer = make_trainer(tmp_path, tiny_llm_dir)
    trainer.setup()
    users = np.arange(len(trainer.histories.items))
    fitted_on = []
    fit = mult_vae.fit_mult_vae

    def recording_fit(matrix, **kwargs):
        fitted_on.append(matrix.toarray())
        return fit(matrix, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mult_vae, "fit_mult_vae", recording_fit)
        use_mult_vae_features(trainer, logging.getLogger("test"), users[:3])
    expected = mult_vae.user_item_matrix(trainer.histories.items, len(trainer.histories.item_texts)).toarray()[3:]
    assert len(fitted_on) == 1 and np.array_equal(fitted_on[0], expected)     # not the encoder's users
    whole = trainer.features(users)
    assert whole.shape == (len(users), trainer.soft.encoder.shape[-1]) and whole.dtype == torch.float32
    assert whole.mean(0).abs().max() < 1e-4 and (whole.std(0, unbiased=False) - 1).abs().max() < 1e-3
    user = int(np.argmax([len(h) for h in trainer.histories.items]))
    first, last = np.array([0, 1]), np.arange(len(trainer.histories.items[user]))[-2:]
    assert not torch.allclose(trainer.features([user], [first]), trainer.features([user], [last]))
    assert torch.allclose(trainer.features([user], [first]), trainer.features([user, user], [first, first])[:1])
    assert torch.isfinite(trainer.offsets(users[:3], [np.arange(2)] * 3)).all()   # A z from the new z

    write_dataset(tmp_path / "data")
    argv = ["--dataset=toy", f"--results={tmp_path / 'results'}", "--holdout_tokens=20", "--users=4",
            "--fit_steps=0", "--shift_users=6", "--shift_passes=1", f"--data_path={tmp_path / 'data'}",
            f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32", "--uip_batch_size=4", "--show_progress=false",
            f"--checkpoint_dir={tmp_path / 'saved2'}", "--encoder_input=mult_vae"]
    with pytest.raises(SystemExit, match="encoder stage"):
        token_probe.main(argv)
    assert token_probe.main(argv + ["--encoder_passes=1"]) == 0
    folder, = (tmp_path / "results" / "toy").iterdir()
    data = json.loads((folder / "token_probe_encoder_multvae.json").read_text())
    assert data["encoder_input"] == "mult_vae" and "Mult-VAE" in (folder / "token_probe_encoder_multvae.md").read_text()


def test_token_probe_fits_tokens_to_texts_drawn_from_a_mult_vae_without_changing_the_other_fits(tmp_path, tiny_llm_dir):
    """``--also_fit=mult_vae``: each user's tokens are also fitted to texts written from a Mult-VAE's distribution
    over the items they have not seen (a new text per step, drawn from a generator of its own), so the plain fits,
    their draws and scores, are those of a run without it."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    base = toy_probe_argv(tmp_path, tiny_llm_dir)
    assert token_probe.main(base + [f"--results={tmp_path / 'alone'}"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'both'}", "--also_fit=mult_vae"]) == 0
    alone = json.loads(published(tmp_path / "alone", "token_probe.json").read_text())
    both = json.loads(published(tmp_path / "both", "token_probe_vs_mult_vae.json").read_text())
    for mode in ("own", "mean", "other_user", "own_on_fitted_text", "rating_own", "shared"):
        assert both["modes"][mode] == alone["modes"][mode]
    modes = both["modes"]
    for mode in ("mult_vae_own", "mult_vae_mean", "mult_vae_other_user", "mult_vae_own_on_fitted_text",
                 "rating_mult_vae_own", "mult_vae_own_on_new_draw", "mult_vae_other_user_on_new_draw"):
        assert np.isfinite(modes[mode]["mean"])
    assert "own_on_new_draw" not in modes and "rating_mult_vae_own_on_new_draw" not in modes
    assert modes["mult_vae_own"]["mean"] != modes["own"]["mean"]
    assert modes["mult_vae_own_on_fitted_text"]["mean"] != modes["own_on_fitted_text"]["mean"]   # another text
    for key in ("mult_vae_own_minus_mult_vae_other_user",
                "mult_vae_own_on_new_draw_minus_mult_vae_other_user_on_new_draw"):
        low, high = both["differences"][key]["ci"]
        assert low <= both["differences"][key]["mean"] <= high
    report = published(tmp_path / "both", "token_probe_vs_mult_vae.md").read_text()
    assert "drawn from a Mult-VAE's distribution over the items the user has not seen" in report
    assert "mult_vae: own - another user's on a new text from the user's distribution" in report


def test_token_probe_fits_on_several_mult_vae_texts_per_step_with_fit_texts_per_step(tmp_path, tiny_llm_dir):
    """``--fit_texts_per_step=K``: each fit step on K new Mult-VAE texts. The shared token scores every user's
    held-out text as in a one-text run; the fitted prompts score otherwise, on the held-out text, the first text
    fitted to and a new one; the report and the file name say K. It needs fit steps and no further objective; the
    other objectives need K different draws (``--draws``, no ``--resample``)."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    base = toy_probe_argv(tmp_path, tiny_llm_dir) + ["--fit_objective=mult_vae", "--fit_learning_rate=0.5"]
    assert token_probe.main(base + [f"--results={tmp_path / 'one'}"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'two'}", "--fit_texts_per_step=2"]) == 0
    one = json.loads(published(tmp_path / "one", "token_probe_mult_vae.json").read_text())
    two = json.loads(published(tmp_path / "two", "token_probe_mult_vae_texts2.json").read_text())
    assert two["fit_texts_per_step"] == 2 and "fit_texts_per_step" not in one
    for mode in ("shared", "rating_shared"):
        assert two["per_user"][mode] == one["per_user"][mode]
    for mode in ("own", "own_on_fitted_text", "own_on_new_draw"):
        assert all(x != y for x, y in zip(two["per_user"][mode], one["per_user"][mode]))
    report = published(tmp_path / "two", "token_probe_mult_vae_texts2.md").read_text()
    assert "mean plain NLL of 2 new texts at every step" in report
    single = published(tmp_path / "one", "token_probe_mult_vae.md").read_text()
    assert "plain NLL of a new text at every step" in single
    for bad in (["--fit_texts_per_step=0"], ["--fit_texts_per_step=2", "--fit_objective=plain"],
                ["--fit_texts_per_step=2", "--also_fit=plain"], ["--fit_texts_per_step=2", "--fit_steps=0"],
                ["--fit_texts_per_step=3", "--fit_objective=distil", "--draws=2"],
                ["--fit_texts_per_step=2", "--fit_objective=plain", "--resample=true"]):
        with pytest.raises(SystemExit):
            token_probe.parse_args(base + bad)


def test_token_probe_fits_on_several_draws_per_step_on_the_other_objectives(tmp_path, tiny_llm_dir):
    """``--draws=2 --fit_texts_per_step=2`` with distillation: every fit step on both of a user's draws, each with
    its own teacher, where ``--draws=2`` alone takes one per step in turn. The draws, the first text fitted to and
    the shared token are those of the one-per-step run; the fitted tokens are not; the report and the name say
    so."""
    token_probe = import_benchmark("token_probe")
    write_dataset(tmp_path / "data")
    base = toy_probe_argv(tmp_path, tiny_llm_dir) + ["--fit_objective=distil", "--draws=2",
                                                     "--fit_learning_rate=0.5"]
    assert token_probe.main(base + [f"--results={tmp_path / 'turn'}"]) == 0
    assert token_probe.main(base + [f"--results={tmp_path / 'both'}", "--fit_texts_per_step=2"]) == 0
    turn = json.loads(published(tmp_path / "turn", "token_probe_draws2_distil.json").read_text())
    both = json.loads(published(tmp_path / "both", "token_probe_draws2_distil_texts2.json").read_text())
    assert both["fit_texts_per_step"] == 2 and both["draws"] == 2
    assert both["per_user"]["shared"] == turn["per_user"]["shared"]
    assert all(x != y for x, y in zip(both["per_user"]["own"], turn["per_user"]["own"]))
    report = published(tmp_path / "both", "token_probe_draws2_distil_texts2.md").read_text()
    assert "2 random draws, 2 per step in turn (each step on their mean gradient)" in report
    single = published(tmp_path / "turn", "token_probe_draws2_distil.md").read_text()
    assert "2 random draws, one per step in turn" in single
