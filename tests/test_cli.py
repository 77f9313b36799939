"""The command line (``python -m recbole_uip``, ``run_recbole_uip.py``) and the RecBole checkpoint-loading patch."""

from __future__ import annotations

import pickle
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import uip_config_dict, write_dataset
from recbole_uip.__main__ import UsageError, main, parse_flags, parse_value

REPO = Path(__file__).resolve().parent.parent


def as_flags(config: dict) -> list[str]:
    """``--key=value`` flags; dicts and lists as YAML flow strings, booleans as true/false."""
    flags = []
    for key, value in config.items():
        if isinstance(value, (dict, list)):
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        flags.append(f"--{key}={text}")
    return flags


# ------------------------------------------------------------------------------------------------ usage
@pytest.mark.parametrize("argv", [["--help"], [], ["-h"], ["run", "--help"], ["infer", "--dataset=toy", "-h"]])
def test_help_prints_usage(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python run_recbole_uip.py --model=MODEL --dataset=DATASET")
    assert "infer" in out and "--uip=true" in out


def test_run_recbole_uip_script_is_main_run(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run_recbole_uip.py", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / "run_recbole_uip.py"), run_name="__main__")
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["train", "--dataset=toy"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_misspelt_recbole_flag_suggests_the_right_one(capsys):
    assert main(["run", "--model=DeepFM", "--dataset=toy", "--epoch=3"]) == 2
    captured = capsys.readouterr()
    assert "unknown flag --epoch" in captured.err
    assert "Did you mean --epochs" in captured.err
    assert "--help" in captured.err and captured.out == ""


def test_misspelt_uip_key_is_refused(capsys):
    assert main(["run", "--model=DeepFM", "--dataset=toy", "--uip_epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "Unknown recbole-uip key 'uip_epoch'" in err and "Did you mean uip_epochs" in err


def test_unknown_model_names_close_ones(tmp_path, capsys):
    write_dataset(tmp_path / "data")
    assert main(["run", "--model=DeepFN", "--dataset=toy", f"--data_path={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'DeepFN'" in err and "DeepFM" in err


def test_missing_dataset_is_reported(tmp_path, capsys):
    args = ["run", "--model=DeepFM", "--dataset=nosuch", f"--data_path={tmp_path / 'data'}", "--state=ERROR"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Dataset 'nosuch' not found" in err and str(tmp_path / "data" / "nosuch" / "nosuch.inter") in err


@pytest.mark.parametrize("argv,message", [
    (["run", "--model=DeepFM"], "--dataset is required"),
    (["run", "--dataset=toy"], "--model is required"),
    (["run", "toy"], "unexpected argument 'toy'"),
    (["run", "--dataset=toy", "--dataset=other"], "given twice"),
    (["run", "--dataset"], "needs a value"),
])
def test_bad_command_lines(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_parse_value_reads_python_none_like_recbole():
    assert parse_value("None") is None and parse_value("~") is None


def test_parse_value_reads_yaml():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("1e-3") == 0.001 and isinstance(parse_value("1e-3"), float)
    assert parse_value("0.05") == 0.05
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("[a, b]") == ["a", "b"]
    assert parse_value("{RS: [0.8,0.1,0.1]}") == {"RS": [0.8, 0.1, 0.1]}
    assert parse_value("DeepFM") == "DeepFM"
    assert parse_value("{unclosed") == "{unclosed"          # not YAML: kept as text
    assert parse_value("~") is None


def test_parse_flags_accepts_both_spellings():
    assert parse_flags(["--a=1", "--b", "x y", "--c=k=v"]) == {"a": "1", "b": "x y", "c": "k=v"}
    with pytest.raises(UsageError):
        parse_flags(["--"])


# ---------------------------------------------------------------------------------------------- commands
def test_infer_prints_the_augmented_folder(tmp_path, tiny_llm_dir, capsys):
    write_dataset(tmp_path / "data")
    config = uip_config_dict(tmp_path, tiny_llm_dir)
    assert main(["infer", "--dataset=toy", *as_flags(config)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    target = tmp_path / "out" / "toy-uip"
    assert out[-1] == str(target)
    assert (target / "uip_manifest.json").is_file() and (target / "toy-uip.user").is_file()
    header = (target / "toy-uip.user").read_text().splitlines()[0]
    assert header == "user_id:token\tage:token\tgender:token\tuip_hobby:token\tuip_background:token"
    # the YAML flags reached the config: 3 codes per profile, 2 EM rounds
    from recbole_uip.bank import FeatureBank

    bank = FeatureBank.load(target / "bank")
    assert [c.shape[0] for c in bank.codebooks] == [3, 3]
    assert [r["round"] for r in bank.metadata["history"]] == [0, 1, 2]


def test_run_without_profiles_end_to_end(tmp_path, tiny_llm_dir, capsys):
    write_dataset(tmp_path / "data")
    config = uip_config_dict(tmp_path, tiny_llm_dir)
    assert main(["run", "--model=DeepFM", "--dataset=toy", "--uip=false", *as_flags(config)]) == 0
    out = capsys.readouterr().out
    assert "test result: {" in out and "auc" in out
    assert "profile columns" not in out
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- compat
class Payload:
    """A non-tensor object, as in RecBole checkpoints (which pickle the whole Config)."""

    def __init__(self, value):
        self.value = value


def test_checkpoint_loading_patch(tmp_path):
    import recbole.quick_start.quick_start as recbole_quick_start
    import recbole.trainer.trainer as recbole_trainer

    from recbole_uip.compat import patch_recbole_checkpoint_loading

    path = tmp_path / "checkpoint.pth"
    torch.save({"config": Payload({"lr": 0.1}), "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)                                     # torch >= 2.6: weights_only by default

    patch_recbole_checkpoint_loading()
    patch_recbole_checkpoint_loading()                       # idempotent
    loaded = recbole_trainer.torch.load(path)
    assert isinstance(loaded["config"], Payload) and loaded["config"].value == {"lr": 0.1}
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert recbole_quick_start.torch.load(path)["config"].value == {"lr": 0.1}
    # only RecBole's modules see the trusted load; everyone else keeps torch's default
    assert recbole_trainer.torch is not torch and recbole_trainer.torch.ones is torch.ones
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(pickle.UnpicklingError):
        recbole_trainer.torch.load(path, weights_only=True)  # an explicit choice is kept


def test_uip_with_a_model_that_cannot_use_profiles_is_refused_before_any_work(tmp_path, tiny_llm_dir, capsys):
    """Pop and ItemKNN have no user representation: --uip=true must not look as if it worked."""
    write_dataset(tmp_path / "data")
    for model in ("Pop", "ItemKNN"):
        code = main(["run", f"--model={model}", "--dataset=toy", "--uip=true", f"--data_path={tmp_path / 'data'}",
                     f"--uip_llm={tiny_llm_dir}", f"--uip_output_dir={tmp_path / 'out'}", "--use_gpu=false"])
        assert code == 2
        err = capsys.readouterr().err
        assert f"{model} cannot use the uip_* profiles" in err and "python -m recbole_uip infer" in err
    assert not (tmp_path / "out").exists()
