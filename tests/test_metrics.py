"""Ranking metrics and ranks: hand-computed values, and the batched target_ranks against a per-user loop."""
import math

import pytest
import torch

import HoloMambaRec as H


def test_full_ranking_metrics_hand_computed():
    ranks = torch.tensor([0, 1, 4, 15])
    m = H.full_ranking_metrics(ranks)
    assert set(m) == {f"{n}@{k}" for n in ("hr", "ndcg", "mrr") for k in (5, 10, 20)} | {"mrr"}
    assert m["hr@5"] == pytest.approx(3 / 4, abs=1e-12)
    assert m["hr@10"] == pytest.approx(3 / 4, abs=1e-12)
    assert m["hr@20"] == pytest.approx(1.0, abs=1e-12)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4, abs=1e-12)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4, abs=1e-12)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(17)) / 4, abs=1e-12)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 4, abs=1e-12)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 16) / 4, abs=1e-12)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 16) / 4, abs=1e-12)


def test_full_ranking_metrics_custom_ks_and_boundary():
    # rank k-1 is a hit at k, rank k is not
    m = H.full_ranking_metrics(torch.tensor([2, 3]), ks=(3,))
    assert set(m) == {"hr@3", "ndcg@3", "mrr@3", "mrr"}
    assert m["hr@3"] == pytest.approx(0.5, abs=1e-12)
    assert m["ndcg@3"] == pytest.approx(0.5 / math.log2(4), abs=1e-12)
    assert m["mrr"] == pytest.approx((1 / 3 + 1 / 4) / 2, abs=1e-12)


def test_ranks_of_targets_hand_built():
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.3],  # target item 3 (score 0.5): only 0.9 is higher -> rank 1
        [0.1, 0.9, 0.5, 0.3],  # target item 2 (0.9): best -> rank 0
        [0.1, 0.9, 0.5, 0.3],  # target item 1 (0.1): worst -> rank 3
        [0.5, 0.5, 0.5, 0.1],  # target item 3, tied with items 1 and 2: ties count in its favour -> rank 0
        [0.2, 0.7, 0.7, 0.9],  # target item 2 (0.7), tied with item 3, below item 4 -> rank 1
    ])
    targets = torch.tensor([3, 2, 1, 3, 2])
    assert H.ranks_of_targets(scores, targets).tolist() == [1, 0, 3, 0, 1]


@pytest.mark.parametrize("name", ["HoloMamba", "SASRec", "GRU4Rec"])
def test_target_ranks_equals_per_user_argsort(name):
    n_items = 40
    torch.manual_seed(0)
    model = H.build_model(name, H.catalog_only(n_items), d_model=16, n_layers=1, d_state=8, max_len=10,
                          eval_batch_size=3, device="cpu")
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, n_items + 1, (10, 10), generator=g)
    inputs[3, :6] = 0
    targets = torch.randint(1, n_items + 1, (10,), generator=g)
    split = H.EvalSplit(inputs, targets, torch.arange(10), torch.full((10,), 10), None)
    ranks = H.rank_targets(model, split)
    assert not model.training
    naive = []
    with torch.no_grad():
        for u in range(len(inputs)):
            scores = model.score_next(H.Batch(inputs[u:u + 1]))[0]
            order = torch.argsort(scores, descending=True, stable=True)
            naive.append(int((order == targets[u] - 1).nonzero()))
    assert ranks.tolist() == naive


def test_mask_seen_excludes_each_users_history_only():
    scores = torch.zeros(3, 6)
    items = torch.tensor([2, 5, 1, 6, 6, 3])  # user 0: {2, 5}; user 1: {1}; user 2: {6, 6, 3}; user 3: none
    offsets = torch.tensor([0, 2, 3, 6, 6])
    H.mask_seen(scores, (items, offsets), 0)
    assert torch.isinf(scores).nonzero().tolist() == [[0, 1], [0, 4], [1, 0], [2, 2], [2, 5]]
    later = torch.zeros(2, 6)
    H.mask_seen(later, (items, offsets), 2)  # a batch starting at user 2
    assert torch.isinf(later).nonzero().tolist() == [[0, 2], [0, 5]]


def test_excluding_seen_items_moves_unseen_targets_up_and_seen_targets_out():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]])
    targets = torch.tensor([3, 1])  # user 0 saw items 1 and 2; user 1 saw item 1 (its target)
    seen = (torch.tensor([1, 2, 1]), torch.tensor([0, 2, 3]))
    assert H.ranks_of_targets(scores.clone(), targets).tolist() == [2, 0]
    masked = H.mask_seen(scores.clone(), seen, 0)
    ranks = H.ranks_of_targets(masked, targets)
    assert ranks[0] == 0 and ranks[1] == 3  # -inf: every item with a finite score is above it
    assert H.full_ranking_metrics(ranks, ks=(1,))["hr@1"] == pytest.approx(0.5, abs=1e-12)


def test_split_seen_items_are_the_history_before_each_target():
    data = H.prepare_dataset("t", __import__("pandas").DataFrame(
        {"user": [1] * 4 + [2] * 3, "item": [10, 11, 12, 13, 11, 12, 10], "time": list(range(7))}), {},
        H.resolve_config({"min_user_count": 1, "min_item_count": 1}, "synthetic"))
    items, offsets = data.eval_split("valid", 5).seen
    assert offsets.tolist() == [0, 2, 3]
    assert items.tolist() == [1, 2, 2]
    assert data.eval_split("valid", 5, exclude_seen=False).seen is None
    items, offsets = data.eval_split("test", 5).seen
    assert offsets.tolist() == [0, 3, 5] and items.tolist() == [1, 2, 3, 2, 3]
