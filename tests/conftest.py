"""Shared set-up of the CPU suite: the script is importable from the repository root; `tiny` is a small
config on the synthetic data; `trained` is one RunStore, shared by the stage tests, holding a benchmark of three
small models trained once per test session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ["HOLOMAMBA_CACHE_DIR"] = ""  # tests never write a dataset cache into the repository (test_data turns it on)
import HoloMambaRec as H  # noqa: E402

TINY = {"d_model": 16, "n_layers": 1, "d_state": 8, "max_len": 10, "epochs": 2, "batch_size": 128,
        "device": "cpu", "dropout": 0.1}


def outputs(folder):
    """Output keys that keep a test's files inside `folder`."""
    return {"results_dir": str(folder / "results"), "figures_dir": str(folder / "figures"),
            "checkpoint_dir": str(folder / "checkpoints"), "grid_csv": str(folder / "results" / "grid.csv")}


@pytest.fixture
def tiny(tmp_path):
    """Overrides of a small synthetic run writing under tmp_path."""
    return {**TINY, **outputs(tmp_path), "dataset": "synthetic"}


class Trained:
    """A RunStore and its per-dataset configs, with the benchmark already run (HoloMamba, SASRec, GRU4Rec)."""

    def __init__(self, folder):
        self.folder = folder
        self.overrides = {**TINY, **outputs(folder), "dataset": "synthetic", "models": "HoloMamba,SASRec,GRU4Rec",
                          "preset": "quick", "compression_len": 16, "bundle_windows": "1,2",
                          "efficiency_lengths": "16", "efficiency_catalogs": "500", "grid_max_trials": 2,
                          "grid": "dropout=0.1,0.3;n_layers=1"}
        self.base, self.configs = H.plan(self.overrides)
        self.store = H.RunStore(self.base)
        self.benchmark_rows = H.benchmark_stage(self.store, self.configs)

    @property
    def results(self):
        return self.folder / "results"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return Trained(tmp_path_factory.mktemp("trained"))
