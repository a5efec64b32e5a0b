"""Leave-one-out split and training windows: no training window reaches the validation or test position,
validation inputs never contain the validation target's position."""
import numpy as np
import pytest
import torch

import HoloMambaRec as H


def unique_id_data(lengths):
    """SequenceData whose every interaction is a distinct item id, so positions can be told apart by value."""
    sequences, next_id = [], 1
    for n in lengths:
        sequences.append(np.arange(next_id, next_id + n, dtype=np.int64))
        next_id += n
    n_items = next_id - 1
    attrs = torch.ones(n_items + 1, 1, dtype=torch.long)
    attrs[0] = 0
    return H.SequenceData("unique", len(sequences), n_items, 1, n_items, attrs, sequences,
                          torch.ones(n_items + 1, dtype=torch.long))


def windows_of(windows, mode, generator=None):
    return windows.cut(windows.window_ends(mode, generator))


LENGTHS = [3, 4, 5, 9, 12, 13, 14, 30]


def strip_padding(row):
    row = row.tolist()
    k = 0
    while k < len(row) and row[k] == 0:
        k += 1
    assert all(v > 0 for v in row[k:]), "padding must be on the left only"
    return row[k:]


def is_contiguous_slice(window, history):
    n = len(window)
    return any(history[s:s + n].tolist() == window for s in range(len(history) - n + 1))


@pytest.mark.parametrize("max_len", [4, 10, 40])
def test_valid_and_test_targets(max_len):
    data = unique_id_data(LENGTHS)
    (vx, vy, _, v_ends, _), (tx, ty, _, t_ends, _) = data.eval_split("valid", max_len), data.eval_split("test", max_len)
    assert v_ends.tolist() == [n - 2 for n in LENGTHS] and t_ends.tolist() == [n - 1 for n in LENGTHS]
    assert vx.shape == tx.shape == (len(LENGTHS), max_len)
    for u, s in enumerate(data.sequences):
        assert vy[u].item() == s[-2] and ty[u].item() == s[-1]
        assert strip_padding(vx[u]) == s[:-2][-max_len:].tolist()
        assert strip_padding(tx[u]) == s[:-1][-max_len:].tolist()
        assert s[-2] not in vx[u].tolist() and s[-1] not in vx[u].tolist()
        assert s[-1] not in tx[u].tolist()
    assert data.train_lengths().tolist() == [n - 2 for n in LENGTHS]


@pytest.mark.parametrize("mode", ["last", "random"])
@pytest.mark.parametrize("max_len", [4, 10, 40])
def test_training_windows_stay_inside_the_training_history(mode, max_len):
    data = unique_id_data(LENGTHS)
    windows = H.TrainingWindows(data, max_len, "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(5 if mode == "random" else 1):
        inputs, targets = windows_of(windows, mode, g)
        assert inputs.shape == targets.shape == (len(LENGTHS), max_len)
        # targets are the inputs shifted by one: together they are one window of max_len + 1 positions
        torch.testing.assert_close(inputs[:, 1:], targets[:, :-1], rtol=0, atol=0)
        for u, s in enumerate(data.sequences):
            history = s[:-2]
            window = strip_padding(torch.cat([inputs[u, :1], targets[u]]))
            assert is_contiguous_slice(window, history), (u, window)
            assert s[-2] not in window and s[-1] not in window
            expected_len = min(len(history), max_len + 1)
            assert len(window) == expected_len  # full windows when the history allows, never shorter
            if mode == "last":
                assert window == history[-(max_len + 1):].tolist()
            # no position past the end of the training history can occur
            assert window[-1] <= history[-1]


def test_random_windows_do_crop_long_histories():
    data = unique_id_data([40] * 20)
    windows = H.TrainingWindows(data, 5, "cpu")
    g = torch.Generator().manual_seed(0)
    last_ends = {int(t) for t in windows_of(windows, "last")[1][:, -1]}
    random_ends = set()
    for _ in range(3):
        random_ends |= {int(t) for t in windows_of(windows, "random", g)[1][:, -1]}
    assert len(last_ends) == 20
    assert random_ends - last_ends  # some windows end before the last training item
    # the earliest possible window starts at the first item: ends at history position >= max_len
    ends_pos = [(e - 1) % 40 for e in random_ends]
    assert min(ends_pos) >= 5 and max(ends_pos) <= 37


def test_leakage_on_synthetic_dataset():
    data = H.load_dataset("synthetic")
    windows = H.TrainingWindows(data, 8, "cpu")
    g = torch.Generator().manual_seed(1)
    vy, ty = data.eval_split("valid", 8).targets, data.eval_split("test", 8).targets
    for mode in ("last", "random"):
        inputs, targets = windows_of(windows, mode, g)
        for u, s in enumerate(data.sequences):
            history = s[:-2]
            window = strip_padding(torch.cat([inputs[u, :1], targets[u]]))
            assert is_contiguous_slice(window, history)
            assert vy[u].item() == s[-2] and ty[u].item() == s[-1]
    # the popularity used for sampled softmax counts training positions only
    counts = np.zeros(data.n_items + 1, dtype=np.int64)
    for s in data.sequences:
        np.add.at(counts, s[:-2], 1)
    assert data.item_counts.tolist() == counts.tolist()
