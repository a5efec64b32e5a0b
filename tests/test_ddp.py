"""Multi-process training on the CPU: two torchrun ranks over gloo, as a user starts them. DDP keeps the
one-process recipe (the batch is global), the grid deals its trials out so each runs once, and the ddp stage
fills results/ddp.csv from a one-process and a torchrun invocation."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, H, outputs

SMALL = {"d_model": 16, "n_layers": 1, "d_state": 8, "max_len": 10, "epochs": 2, "batch_size": 32,
         "dropout": 0.0, "device": "cpu"}


def torchrun(*args, cwd):
    """`torchrun --standalone --nproc_per_node=2 args` on the CPU; its completed process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env={**H.os.environ, "OMP_NUM_THREADS": "1"})


def why(done):
    """The lines of a failed command that say what failed, each rank's included (the tail alone is torchrun's)."""
    lines = (done.stdout + done.stderr).splitlines()
    return "\n".join([x for x in lines if any(w in x for w in ("Error", "error", "terminate", "abort", "rank"))][:60]
                     or lines[-40:])


def full_windows(path):
    """96 users with 30 events each over 50 items: every training window of max_len 10 is full, so each rank's
    loss averages as many targets as the other's and DDP's mean of the two is the one-process mean."""
    rng = np.random.default_rng(0)
    rows = [(u, int(i), t) for u in range(96) for t, i in enumerate(rng.choice(50, 30, replace=False))]
    pd.DataFrame(rows, columns=["user", "item", "time"]).to_csv(path, index=False)


WORKER = """
import sys, torch, pandas as pd
sys.path.insert(0, {root!r})
import HoloMambaRec as H
torch.distributed.init_process_group("gloo")
data = H.load_dataset(pd.read_csv({csv!r}))
H.set_seed(0)
model = H.build_model("HoloMamba", data, None, **{small!r})
result = H.fit(model, data, distributed=True)
try:
    H.fit(model, data, distributed=True, batch_size=33)
    refused = ""
except H.ConfigError as exc:
    refused = str(exc)
if torch.distributed.get_rank() == 0:
    torch.save({{"state": model.state_dict(), "history": result.history, "world": result.world_size,
                "refused": refused}}, {out!r})
torch.distributed.destroy_process_group()
"""


def test_two_ranks_train_the_one_process_model(tmp_path):
    """Two gloo ranks, each taking half of every global batch of 32, end two epochs with the weights of one
    process training on the whole batches (dropout 0, full windows), to 1e-5; the logged loss is the mean over
    ranks; a batch that does not split over the ranks is refused."""
    csv, out = tmp_path / "events.csv", tmp_path / "ddp.pt"
    full_windows(csv)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), csv=str(csv), small=SMALL, out=str(out)))
    done = torchrun(str(script), cwd=tmp_path)
    assert done.returncode == 0, why(done)
    ddp = torch.load(out, weights_only=False)

    data = H.load_dataset(pd.read_csv(csv))
    H.set_seed(0)
    model = H.build_model("HoloMamba", data, None, **SMALL)
    alone = H.fit(model, data)
    assert ddp["world"] == 2 and alone.world_size == 1
    assert model.state_dict().keys() == ddp["state"].keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=0, atol=1e-5, msg=name)
    for mine, theirs in zip(alone.history, ddp["history"]):
        assert theirs["loss"] == pytest.approx(mine["loss"], abs=1e-5)
        assert theirs["valid_ndcg@10"] == pytest.approx(mine["valid_ndcg@10"], abs=1e-6)
    assert "--batch_size=33" in ddp["refused"] and "multiple of 2" in ddp["refused"]


def test_two_ranks_share_out_a_grid_and_run_each_trial_once(tmp_path):
    """A grid of 4 trials under 2 ranks: 4 rows in the log, one per trial, trained by both processes (their
    claims name two pids), and a rerun trains nothing again."""
    out = outputs(tmp_path)
    args = [str(ROOT / "HoloMambaRec.py"), "--preset=quick", "--stage=grid", "--grid=dropout=0.1,0.2;d_model=16,32",
            "--grid_max_trials=0", "--epochs=2", "--device=cpu", *(f"--{k}={v}" for k, v in out.items())]
    done = torchrun(*args, cwd=tmp_path)
    assert done.returncode == 0, why(done)
    log = pd.read_csv(out["grid_csv"])
    assert len(log) == 4 and log["trial"].nunique() == 4
    claims = [line.split(",") for line in open(f"{out['grid_csv']}.claims").read().splitlines()]
    assert len(claims) == 4 and len({pid for _, _, pid in claims}) == 2
    again = torchrun(*args, cwd=tmp_path)
    assert again.returncode == 0, why(again)
    assert len(pd.read_csv(out["grid_csv"])) == 4
    assert len(open(f"{out['grid_csv']}.claims").read().splitlines()) == 4  # nothing claimed, so nothing trained


def test_the_ddp_stage_fills_one_table_from_one_process_and_torchrun(tmp_path):
    """--stage=ddp once as one process, once under torchrun: one row per run and per step for each world size,
    their runs kept apart, the checkpoint's CPU reload scoring what the run reported, the torchrun rows' speed-up
    the ratio of the two epoch times."""
    out = outputs(tmp_path)
    args = [str(ROOT / "HoloMambaRec.py"), "--preset=quick", "--stage=ddp", "--models=SASRec",
            "--efficiency_lengths=16,32", *(f"--{k}={v}" for k, v in out.items())]
    alone = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, why(alone)
    done = torchrun(*args, cwd=tmp_path)
    assert done.returncode == 0, why(done)
    table = pd.read_csv(tmp_path / "results" / "ddp.csv")
    assert sorted(zip(table["what"], table["world_size"])) == [("training run", 1), ("training run", 2),
                                                              ("training step", 1), ("training step", 2)]
    runs = table[table["what"] == "training run"].set_index("world_size")
    assert list(runs["batch_per_rank"]) == [64, 32] and set(runs["backend"]) == {"none", "gloo"}
    np.testing.assert_allclose(runs["reload_cpu_test_ndcg@10"], runs["test_ndcg@10"], rtol=0, atol=1e-9)
    assert runs.loc[2, "speedup"] == pytest.approx(runs.loc[1, "epoch_seconds"] / runs.loc[2, "epoch_seconds"])
    assert runs.loc[2, "scaling_efficiency"] == pytest.approx(runs.loc[2, "speedup"] / 2)
    steps = table[table["what"] == "training step"].set_index("world_size")
    assert list(steps["max_len"]) == [32, 32] and list(steps["batch_per_rank"]) == [16, 8]
    for world in (1, 2):
        assert len(list((tmp_path / "checkpoints" / "ddp" / f"ranks{world}-eager").glob("*.pt"))) == 1


@pytest.mark.parametrize("name,binding,frozen", [("HoloMamba", "item", set()), ("HoloMamba", "roles", {"alpha"}),
                                                 ("HoloMamba", "both", set()),
                                                 ("Mamba-ItemOnly", "roles", {"alpha", "attr_emb.weight", "field_gain"})])
def test_every_trainable_parameter_gets_a_gradient(name, binding, frozen):
    """DDP waits for the gradient of every parameter that requires one: a variant freezes exactly the
    parameters it never reads, and one step gives all the others a gradient."""
    data = H.load_dataset("synthetic", attribute_mode="all")
    model = H.build_model(name, data, None, **SMALL, binding=binding, attribute_mode="all")
    step = H.make_train_step(model, model, H.Config(model.config))
    windows = H.TrainingWindows(data, model.input_len, torch.device("cpu"), 10)
    x, y = windows.cut(windows.window_ends("last", torch.Generator().manual_seed(0)))
    step(H.Batch(x[:32], y[:32]))
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
