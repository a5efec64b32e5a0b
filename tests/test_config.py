"""Configuration: one table (roles, checks, meanings) from which parsing, validation, --help, the run hash and
the data-cache key are derived; presets, --config files, exit codes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import HoloMambaRec as H

ROOT = Path(H.__file__).resolve().parent


def test_the_table_is_the_single_source_of_keys():
    assert set(H.GLOBAL_CONFIG) == set(H.CONFIG_TABLE)
    assert all(key.role in H.ROLES and key.meaning for key in H.CONFIG_TABLE.values())
    assert H.GLOBAL_CONFIG == {name: key.default for name, key in H.CONFIG_TABLE.items()}
    H.resolve_config({})  # the defaults pass their own checks


def test_unknown_key_is_rejected():
    with pytest.raises(H.ConfigError, match="unknown config key 'no_such_key'"):
        H.parse_cli(["--no_such_key=3"])
    with pytest.raises(H.ConfigError, match="unknown config key 'no_such_key'"):
        H.config(no_such_key=3)


@pytest.mark.parametrize("arg,key", [("--d_model=abc", "d_model"), ("--lr=fast", "lr"), ("--ffn=maybe", "ffn"),
                                     ("--epochs=1.5", "epochs")])
def test_bad_type_is_rejected(arg, key):
    with pytest.raises(H.ConfigError, match=f"--{key}="):
        H.parse_cli([arg])


def test_parse_cli_types_and_flags():
    o = H.parse_cli(["--d_model=32", "--lr=0.01", "--ffn=no", "--download=0", "--quick", "--max-len=7"])
    assert o == {"d_model": 32, "lr": 0.01, "ffn": False, "download": False, "quick": True, "max_len": 7}
    assert type(o["d_model"]) is int and type(o["lr"]) is float
    assert H.parse_cli(["--d_model", "48"]) == {"d_model": 48}  # argparse's space form works too
    # --quick implies the quick preset; an explicit preset wins
    assert H.resolve_config(H.parse_cli(["--quick"]))["preset"] == "quick"
    assert H.resolve_config(H.parse_cli(["--quick", "--preset=paper"]))["preset"] == "paper"
    with pytest.raises(H.ConfigError, match="--d_model: expected one argument"):
        H.parse_cli(["--d_model"])
    with pytest.raises(H.ConfigError, match="unexpected argument 'd_model=3'"):
        H.parse_cli(["d_model=3"])
    with pytest.raises(H.ConfigError, match="unknown config key 'max'"):
        H.parse_cli(["--max=3"])  # no abbreviations of keys


@pytest.mark.parametrize("overrides,key", [
    ({"d_model": 0}, "d_model"),
    ({"max_len": 1}, "max_len"),
    ({"lr": 0.0}, "lr"),
    ({"lr": float("inf")}, "lr"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"patience": 0}, "patience"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"models": "HoloMamba,BERT4Rec"}, "models"),
    ({"stage": "train"}, "stage"),
    ({"dropout": 1.0}, "dropout"),
    ({"d_model": 30, "n_heads": 4}, "n_heads"),
    ({"seeds": "1,x"}, "seeds"),
    ({"attribute_mode": "some"}, "attribute_mode"),
    ({"preset": "fastest"}, "preset"),
    ({"ramrec_decay": 0.0}, "ramrec_decay"),
])
def test_out_of_range_values_raise_config_error_naming_the_key(overrides, key):
    with pytest.raises(H.ConfigError, match=f"--{key}="):
        H.resolve_config(overrides)


def test_config_is_read_only_and_variants_are_validated():
    cfg = H.config("synthetic", memory_slots=4, memory_len=8)
    with pytest.raises(TypeError):
        cfg["d_model"] = 8
    assert cfg.replace(d_model=8)["d_model"] == 8 and cfg["d_model"] == 64  # a new Config, the old unchanged
    with pytest.raises(H.ConfigError, match="--memory_slots=4: cannot be combined with bundle_k > 1"):
        cfg.replace(bundle_k=2)
    with pytest.raises(H.ConfigError, match="unknown config key 'dmodel'"):
        cfg.replace(dmodel=8)
    assert cfg.replace(lr=1)["lr"] == 1.0 and type(cfg.replace(lr=1)["lr"]) is float  # typed like the default
    with pytest.raises(H.ConfigError, match="--epochs=2.5: expected int"):
        cfg.replace(epochs=2.5)


def test_run_hash_covers_exactly_the_data_model_and_training_roles():
    cfg = H.config("synthetic")
    tag = H.run_hash(cfg)
    for name, key in H.CONFIG_TABLE.items():
        default = key.default
        changed = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2 if v else 0.5,
                   str: lambda v: v}[type(default)](cfg[name])
        if isinstance(default, str) or name in ("n_heads",):
            continue  # string keys are covered below
        try:
            other = cfg.replace(**{name: changed})
        except H.ConfigError:
            continue  # a value out of range (e.g. ramrec bounds); covered by the string keys below
        assert (H.run_hash(other) != tag) == (key.role in H.HASHED_ROLES), name
    for name, value in [("attribute_mode", "first"), ("train_window", "random"), ("memory_binding", "bipolar"),
                        ("dataset", "ml-1m"), ("mixer", "mamba2"), ("headdim", 64)]:
        assert H.run_hash(cfg.replace(**{name: value})) != tag, name
    for name, value in [("preset", "paper"), ("stage", "grid"), ("seeds", "1"), ("results_dir", "x"),
                        ("device", "cpu"), ("scan_backend", "reference"), ("data_dir", "/elsewhere"), ("ssd_chunk", 128),
                        ("grid", "lr=0.1,0.2"), ("models", "SASRec")]:
        assert H.run_hash(cfg.replace(**{name: value})) == tag, name


def test_data_key_is_the_data_role_and_the_source_files(tmp_path):
    cfg = H.config("synthetic")
    assert H.data_key(cfg, []) == H.data_key(cfg.replace(d_model=8, lr=0.5, data_dir="/x"), [])
    assert H.data_key(cfg, []) != H.data_key(cfg.replace(min_user_count=6), [])
    f = tmp_path / "a.csv"
    f.write_text("x")
    assert H.data_key(cfg, [f]) != H.data_key(cfg, [])


def test_unknown_dataset_given_as_argument():
    with pytest.raises(H.ConfigError, match="--dataset=movielens"):
        H.resolve_config({}, "movielens")


def test_valid_custom_datasets_are_accepted():
    cfg = H.resolve_config({"dataset": "synthetic,csv:/x,recbole:/y/z"})
    assert H.as_list(cfg["dataset"]) == ["synthetic", "csv:/x", "recbole:/y/z"]


@pytest.mark.parametrize("argv,key", [(["--d_model=0"], "d_model"), (["--no_such_key=1"], "no_such_key"),
                                      (["--max_len=1"], "max_len"), (["--lr=0"], "lr"),
                                      (["--dataset=imagenet"], "dataset"), (["--models=Foo"], "models"),
                                      (["--grid=stage=grid"], "stage"), (["--grid=lr=0.1;lr=0.2"], "lr")])
def test_main_returns_2_with_one_error_line(argv, key, capsys):
    assert H.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and key in lines[0]
    assert captured.out == ""


def test_config_file_is_merged_under_the_command_line(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"d_model": 48, "lr": 0.002, "preset": "paper", "ffn": True}))
    overrides = H.parse_cli([f"--config={path}", "--lr=0.005"])
    assert overrides == {"d_model": 48, "lr": 0.005, "preset": "paper", "ffn": True}
    cfg = H.resolve_config(overrides, "ml-1m")
    assert cfg["d_model"] == 48 and cfg["n_layers"] == 3 and cfg["ffn"] is True  # the file's preset applies
    for text, phrase in [('{"d_mdl": 3}', "unknown config key 'd_mdl'"), ("{oops", "not valid JSON"),
                         ("[1, 2]", "expected a JSON object"), ('{"epochs": "many"}', "--epochs=many: expected int")]:
        path.write_text(text)
        assert H.main([f"--config={path}", "--stage=stats", "--dataset=synthetic"]) == 2
        assert phrase in capsys.readouterr().err
    assert H.main([f"--config={tmp_path / 'missing.json'}"]) == 2
    assert "cannot read it" in capsys.readouterr().err


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
    # the public config() merges the dataset entry too
    assert H.config("ml-1m", preset="paper")["n_layers"] == 3


def test_resolve_config_does_not_mutate_globals():
    before = dict(H.GLOBAL_CONFIG)
    H.resolve_config({"preset": "paper", "d_model": 8}, "ml-1m")
    assert H.GLOBAL_CONFIG == before
    assert H.PRESETS["paper"]["ml-1m"] == {"n_layers": 3}


def test_editing_global_config_changes_the_defaults(monkeypatch):
    monkeypatch.setitem(H.GLOBAL_CONFIG, "d_model", 24)
    assert H.config("synthetic")["d_model"] == 24
    monkeypatch.setitem(H.GLOBAL_CONFIG, "d_model", 0)
    with pytest.raises(H.ConfigError, match="--d_model=0"):
        H.config("synthetic")


def test_help_lists_every_key_once_grouped_by_role(capsys):
    assert H.main(["--help"]) == 0
    out = capsys.readouterr().out
    sections = out.split("\n\n")
    for name, key in H.CONFIG_TABLE.items():
        shown = str(key.default).lower() if isinstance(key.default, bool) else str(key.default) or '""'
        assert out.count(f"  --{name}=") == 1, name
        section = next(i for i, s in enumerate(sections) if f"  --{name}=" in s)
        assert f"{key.role} keys:" in sections[section - 1], name  # under its role's heading
        assert f"--{name}={shown}" in out
    assert "--config=FILE.json" in out and "--version" in out


def test_version(capsys):
    assert H.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"HoloMambaRec {H.__version__}"


def test_cli_subprocess_config_error():
    """As a user meets it: a real process, one line on stderr, exit code 2 (--help is tested in-process above)."""
    bad = subprocess.run([sys.executable, "HoloMambaRec.py", "--d_model=0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --d_model=0: must be > 0"]
