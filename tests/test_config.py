"""Configuration: parsing, validation (ConfigError naming the key), presets, --help, exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

import HoloMambaRec as H

ROOT = Path(H.__file__).resolve().parent


def test_unknown_key_is_rejected():
    with pytest.raises(H.ConfigError, match="unknown config key 'no_such_key'"):
        H.parse_cli(["--no_such_key=3"])


@pytest.mark.parametrize("arg,key", [("--d_model=abc", "d_model"), ("--lr=fast", "lr"), ("--ffn=maybe", "ffn"),
                                     ("--epochs=1.5", "epochs")])
def test_bad_type_is_rejected(arg, key):
    with pytest.raises(H.ConfigError, match=f"--{key}="):
        H.parse_cli([arg])


def test_parse_cli_types_and_flags():
    o = H.parse_cli(["--d_model=32", "--lr=0.01", "--ffn=no", "--download=0", "--quick", "--max-len=7"])
    assert o == {"d_model": 32, "lr": 0.01, "ffn": False, "download": False, "quick": True, "max_len": 7,
                 "preset": "quick"}
    assert type(o["d_model"]) is int and type(o["lr"]) is float
    # an explicit preset wins over the one implied by --quick
    assert H.parse_cli(["--quick", "--preset=paper"])["preset"] == "paper"
    with pytest.raises(H.ConfigError, match="needs a value"):
        H.parse_cli(["--d_model"])
    with pytest.raises(H.ConfigError, match="unexpected argument 'd_model=3'"):
        H.parse_cli(["d_model=3"])


@pytest.mark.parametrize("overrides,key", [
    ({"d_model": 0}, "d_model"),
    ({"max_len": 1}, "max_len"),
    ({"lr": 0.0}, "lr"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"models": "HoloMamba,BERT4Rec"}, "models"),
    ({"stage": "train"}, "stage"),
    ({"dropout": 1.0}, "dropout"),
    ({"d_model": 30, "n_heads": 4}, "n_heads"),
    ({"seeds": "1,x"}, "seeds"),
    ({"attribute_mode": "some"}, "attribute_mode"),
    ({"preset": "fastest"}, "preset"),
])
def test_out_of_range_values_raise_config_error_naming_the_key(overrides, key):
    with pytest.raises(H.ConfigError, match=f"--{key}="):
        H.resolve_config(overrides)


def test_unknown_dataset_given_as_argument():
    with pytest.raises(H.ConfigError, match="--dataset=movielens"):
        H.resolve_config({}, "movielens")


def test_valid_custom_datasets_are_accepted():
    cfg = H.resolve_config({"dataset": "synthetic,csv:/x,recbole:/y/z"})
    assert H.as_list(cfg["dataset"]) == ["synthetic", "csv:/x", "recbole:/y/z"]


@pytest.mark.parametrize("argv,key", [(["--d_model=0"], "d_model"), (["--no_such_key=1"], "no_such_key"),
                                      (["--max_len=1"], "max_len"), (["--lr=0"], "lr"),
                                      (["--dataset=imagenet"], "dataset"), (["--models=Foo"], "models")])
def test_main_returns_2_with_one_error_line(argv, key, capsys):
    assert H.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and key in lines[0]
    assert captured.out == ""


def test_presets_merge():
    paper_ml = H.resolve_config({"preset": "paper"}, "ml-1m")
    paper_beauty = H.resolve_config({"preset": "paper"}, "amazon-beauty")
    assert paper_ml["n_layers"] == 3 and paper_beauty["n_layers"] == 2
    assert paper_beauty["attribute_mode"] == "modulo" and paper_ml["attribute_mode"] == "first"
    assert paper_ml["d_model"] == 96 and paper_ml["max_len"] == 50 and paper_ml["epochs"] == 10
    assert paper_ml["dataset"] == "ml-1m"
    # the command line wins over both the preset and the preset's dataset entry
    assert H.resolve_config({"preset": "paper", "n_layers": 5, "d_model": 48}, "ml-1m")["n_layers"] == 5
    assert H.resolve_config({"preset": "paper", "n_layers": 5, "d_model": 48}, "ml-1m")["d_model"] == 48
    # default preset: per-dataset values over GLOBAL_CONFIG
    assert H.resolve_config({}, "ml-1m")["max_len"] == 200
    assert H.resolve_config({}, "amazon-beauty")["dropout"] == 0.5
    assert H.resolve_config({}, "synthetic")["max_len"] == H.GLOBAL_CONFIG["max_len"]
    # without a dataset, no dataset entry is merged
    assert H.resolve_config({"preset": "paper"})["n_layers"] == H.GLOBAL_CONFIG["n_layers"]
    assert H.resolve_config(H.parse_cli(["--quick"]))["dataset"] == "synthetic"


def test_resolve_config_does_not_mutate_globals():
    before = dict(H.GLOBAL_CONFIG)
    H.resolve_config({"preset": "paper", "d_model": 8}, "ml-1m")
    assert H.GLOBAL_CONFIG == before
    assert H.PRESETS["paper"]["ml-1m"] == {"n_layers": 3}


def test_help_lists_every_key(capsys):
    assert H.main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in H.GLOBAL_CONFIG:
        assert f"--{key}=" in out, key
    assert len([line for line in out.splitlines() if line.startswith("  --")]) == len(H.GLOBAL_CONFIG)


def test_cli_subprocess_help_and_config_error():
    ok = subprocess.run([sys.executable, "HoloMambaRec.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0
    assert all(f"--{key}=" in ok.stdout for key in H.GLOBAL_CONFIG)
    bad = subprocess.run([sys.executable, "HoloMambaRec.py", "--d_model=0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --d_model=0: must be > 0"]
