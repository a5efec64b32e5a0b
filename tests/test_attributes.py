"""Attributes that pay: role-filler binding, the attribute objectives, item dropout and the shuffled control."""
import math

import pytest
import torch
import torch.nn.functional as F

import HoloMambaRec as H

D = 64


@pytest.fixture(scope="module")
def synthetic():
    return H.load_dataset("synthetic", attribute_mode="all")


def model_of(data, name="HoloMamba", seed=0, **extra):
    torch.manual_seed(seed)
    keys = {"d_model": D, "n_layers": 1, "d_state": 8, "max_len": 12, "dropout": 0.0, "device": "cpu",
            "binding": "roles", **extra}
    return H.build_model(name, data, **keys)


def toy_catalog():
    """5 items, 7 attribute values in 2 fields: field 1 single-valued, field 2 multi-valued for item 2."""
    ids = torch.tensor([[0, 0, 0], [2, 5, 0], [3, 5, 6], [2, 0, 0], [4, 6, 0], [1, 0, 0]])
    fields = torch.tensor([[0, 0, 0], [1, 2, 0], [1, 2, 2], [1, 0, 0], [1, 2, 0], [1, 0, 0]])
    return H.Catalog(5, 0, 7, ids, fields, 2)


def test_role_filler_item_vector_is_the_formula():
    catalog = toy_catalog()
    model = model_of(catalog)
    with torch.no_grad():
        model.field_gain.copy_(torch.tensor([0.0, 0.7, 1.3]))
        r, a, x = model.roles, model.attr_emb.weight, model.item_emb.weight
        expected = torch.stack([
            torch.zeros(D),
            x[1] + 0.7 * H.bind(r[1], a[2]) + 1.3 * H.bind(r[2], a[5]),
            x[2] + 0.7 * H.bind(r[1], a[3]) + 1.3 * H.bind(r[2], (a[5] + a[6]) / 2),  # a field's values averaged
            x[3] + 0.7 * H.bind(r[1], a[2]),
            x[4] + 0.7 * H.bind(r[1], a[4]) + 1.3 * H.bind(r[2], a[6]),
            x[5] + 0.7 * H.bind(r[1], a[1]),
        ])
        torch.testing.assert_close(model.output_table(), expected, rtol=1e-5, atol=1e-6)
    # roles are unitary: unit-modulus spectra, so unbinding by correlation is exact
    spectrum = torch.fft.rfft(model.roles[1:].double())
    torch.testing.assert_close(spectrum.abs(), torch.ones_like(spectrum.abs()), rtol=1e-5, atol=1e-5)


def test_both_adds_the_papers_item_binding_and_item_only_ignores_attributes():
    catalog = toy_catalog()
    roles, both = model_of(catalog), model_of(catalog, binding="both")
    both.load_state_dict(roles.state_dict(), strict=False)
    ids = torch.arange(6)
    with torch.no_grad():
        x = both.item_emb(ids)
        a = both.attr_emb(catalog.item_attributes).sum(-2) / catalog.item_attributes.gt(0).sum(-1, keepdim=True).clamp(min=1)
        torch.testing.assert_close(both.item_vectors(ids), roles.item_vectors(ids) + both.alpha * H.bind(x, a),
                                   rtol=1e-5, atol=1e-6)
        plain = model_of(catalog, "Mamba-ItemOnly")
        torch.testing.assert_close(plain.item_vectors(ids), plain.item_emb(ids), rtol=0, atol=0)


def test_the_attribute_part_of_a_score_is_the_unbound_state_against_the_attributes():
    """<h, e_j> = <h, x_j> + Σ_f g_f · mean over j's values a of field f of <h ⊛ r_f*, a>: the quantity the
    next-attribute objective trains."""
    catalog = toy_catalog()
    model = model_of(catalog)
    h = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = h @ model.output_table().T
        unbound = H.unbind(h.unsqueeze(1), model.roles.unsqueeze(0), exact=False)  # (3, F + 1, d)
        by_field = unbound @ model.attr_emb.weight.T  # (3, F + 1, V + 1)
        for j in range(1, 6):
            expected = h @ model.item_emb.weight[j]
            for slot in range(3):
                f, v = catalog.attribute_fields[j, slot], catalog.item_attributes[j, slot]
                if v:
                    expected = expected + model.slot_weights[j, slot] * model.field_gain[f] * by_field[:, f, v]
            torch.testing.assert_close(scores[:, j], expected, rtol=1e-4, atol=1e-5)


def test_unbinding_an_item_vector_retrieves_its_attributes_well_above_chance(synthetic):
    """Each synthetic item has one of 15 attributes; at initialisation the id part is noise of the same scale as
    the role filler, yet the role's unbinding of every item's vector, cleaned up against the attribute table,
    names the right attribute far more often than chance (1 / 16)."""
    model = model_of(synthetic)
    with torch.no_grad():
        vectors = model.output_table()[1:]
        fields, attrs = model.attribute_fields[1:, 0], model.item_attributes[1:, 0]
        unbound = H.unbind(vectors, model.roles[fields], exact=False)
        guess = (unbound @ model.attr_emb.weight[1:].T).argmax(-1) + 1
    accuracy = (guess == attrs).double().mean().item()
    assert accuracy > 0.6, accuracy  # chance: 1/16


@pytest.mark.parametrize("weights", [{"attribute_loss": 1.0}, {"agreement_loss": 1.0},
                                     {"attribute_loss": 0.5, "agreement_loss": 0.5}])
def test_attribute_objectives_shape_value_and_gradients(synthetic, weights):
    model = model_of(synthetic, **weights).train()
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(1, synthetic.n_items + 1, (4, 13), generator=g)
    seq[0, :5] = 0
    out = model(H.Batch(seq[:, :-1], seq[:, 1:]))
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
    # the loss is the cross-entropy of each field's unbinding against the target's attributes
    targets = out.targets[out.targets > 0]
    labels = model.item_attributes[targets, 0]
    roles = model.roles[model.attribute_fields[targets, 0]]

    def ce(vectors):
        return F.cross_entropy(H.unbind(vectors, roles, exact=False) @ model.attr_emb.weight.T, labels)

    expected = weights.get("attribute_loss", 0) * ce(out.hidden[out.targets > 0]) + \
        weights.get("agreement_loss", 0) * ce(model.item_vectors(targets))
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-4, atol=1e-5)
    assert out.aux_loss.item() > 0.5 * torch.log(torch.tensor(16.0)).item() * sum(weights.values())  # untrained
    out.aux_loss.backward()
    assert model.attr_emb.weight.grad.abs().sum() > 0
    encoder_grad = model.mixers[0].in_proj.weight.grad
    assert (encoder_grad is not None and encoder_grad.abs().sum() > 0) == ("attribute_loss" in weights)
    if "agreement_loss" in weights:
        assert model.item_emb.weight.grad[targets].abs().sum() > 0
    model.eval()
    assert model(H.Batch(seq[:, :-1], seq[:, 1:])).aux_loss == 0.0  # training only


def test_masked_attribute_context_reads_every_item_but_the_masked_one(synthetic):
    """At a masked position the two-sided context depends on the items before and after it, never on the masked
    item itself, and left padding changes no real position's context."""
    model = model_of(synthetic, masked_attribute_loss=1.0).eval()
    seq = torch.randint(1, synthetic.n_items + 1, (2, 10), generator=torch.Generator().manual_seed(4))
    masked = torch.zeros_like(seq, dtype=torch.bool)
    masked[:, 5] = True
    with torch.no_grad():
        context = model.masked_context(seq, masked)
        other = seq.clone()
        other[:, 5] = seq[:, 5] % synthetic.n_items + 1
        torch.testing.assert_close(model.masked_context(other, masked), context, rtol=0, atol=0)
        for position in (2, 8):  # an item before, then an item after the masked one
            other = seq.clone()
            other[:, position] = seq[:, position] % synthetic.n_items + 1
            assert (model.masked_context(other, masked)[:, 5] - context[:, 5]).abs().max() > 1e-4
        padded = torch.cat([torch.zeros(2, 3, dtype=seq.dtype), seq], 1)
        padded_mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), masked], 1)
        torch.testing.assert_close(model.masked_context(padded, padded_mask)[:, 3:], context, rtol=1e-4, atol=1e-5)


def masked_objective_and_context(plain, model, objective):
    """Checks that model (with a masked objective) shares every weight of plain at initialisation and adds only the
    masked pass's; then, in training, objective(seq) on a batch with left padding, and, from the same random
    draws, the masked positions (mask_prob 0.3) and the two-sided context there: (loss, seq, masked, context)."""
    shared = plain.state_dict()
    assert all(torch.equal(shared[k], v) for k, v in model.state_dict().items() if k in shared)
    assert {k.split(".")[0] for k in model.state_dict()} - {k.split(".")[0] for k in shared} == \
        {"mask_vector", "backward_mixers", "backward_norms"}
    model.train()
    seq = torch.randint(1, model.catalog.n_items + 1, (4, 13), generator=torch.Generator().manual_seed(2))
    seq[0, :5] = 0
    torch.manual_seed(7)
    loss = objective(seq)
    torch.manual_seed(7)
    masked = seq.gt(0) & (torch.rand(seq.shape) < 0.3)
    assert 0 < masked.sum() < seq.gt(0).sum() and not masked[0, :5].any()
    return loss, seq, masked, model.masked_context(seq, masked)[masked]


def test_masked_attribute_loss_value_gradients_and_initial_weights(synthetic):
    """The loss is the cross-entropy of each role's unbinding of the context at the masked positions against
    the masked items' attributes; it trains the backward encoder, the mask vector, the attribute table and the
    causal encoder; every weight the model shares with the preset's starts as it does there."""
    plain, model = model_of(synthetic), model_of(synthetic, masked_attribute_loss=1.0, mask_prob=0.3)
    loss, seq, masked, context = masked_objective_and_context(plain, model, model.masked_attribute_prediction)
    items = seq[masked]
    unbound = H.unbind(context, model.roles[model.attribute_fields[items, 0]], exact=False)
    expected = F.cross_entropy(unbound @ model.attr_emb.weight.T, model.item_attributes[items, 0])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    loss.backward()
    for param in (model.mask_vector, model.backward_mixers[0].in_proj.weight, model.attr_emb.weight,
                  model.mixers[0].in_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    out = model(H.Batch(seq[:, :-1], seq[:, 1:]))  # the forward adds it as the model's auxiliary loss
    assert out.aux_loss.dim() == 0 and out.aux_loss > 0
    assert model.has_attribute_objectives and model.eval()(H.Batch(seq[:, :-1], seq[:, 1:])).aux_loss == 0.0
    with pytest.raises(H.ConfigError, match="--masked_attribute_loss=1.0: needs --binding=roles or both"):
        H.config("synthetic", masked_attribute_loss=1.0)


def test_attribute_losses_need_roles():
    with pytest.raises(H.ConfigError, match="--attribute_loss=1.0: needs --binding=roles or both"):
        H.config("synthetic", attribute_loss=1.0)


def test_item_dropout_zeroes_the_id_part_in_training_only(synthetic):
    model = model_of(synthetic, item_dropout=0.5).train()
    ids = torch.arange(1, synthetic.n_items + 1).repeat(4)
    torch.manual_seed(3)
    with torch.no_grad():
        dropped = model.item_vectors(ids, 0.5)
        fillers = model.role_fillers(ids)
        full = model.item_vectors(ids)
    is_filler = torch.isclose(dropped, fillers, atol=1e-7).all(-1)
    is_full = torch.isclose(dropped, full, atol=1e-7).all(-1)
    assert (is_filler | is_full).all() and 0.4 < is_filler.double().mean().item() < 0.6
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(ids), model.emb_norm(full), rtol=0, atol=0)


def test_shuffled_control_keeps_attribute_frequencies_and_breaks_the_link(synthetic):
    holo, shuffled = model_of(synthetic), model_of(synthetic, "HoloMamba-Shuffled")
    a, b = holo.item_attributes, shuffled.item_attributes
    assert torch.equal(b[0], a[0])  # padding stays padding
    assert sorted(map(tuple, a[1:].tolist())) == sorted(map(tuple, b[1:].tolist()))  # same rows, same frequencies
    assert torch.equal(torch.bincount(a.flatten()), torch.bincount(b.flatten()))
    assert (a[1:] != b[1:]).any(-1).double().mean() > 0.8  # most items read another item's attributes
    # the same seed gives the same weights: only the attribute assignment differs
    assert all(torch.equal(p, q) for p, q in zip(holo.parameters(), shuffled.parameters()))
    # and the checkpoint keeps the real catalog, so a reloaded control is shuffled exactly once
    assert torch.equal(shuffled.catalog.item_attributes, synthetic.item_attributes)


def test_attribute_pretraining_trains_only_the_attribute_objectives_and_skips_validation(synthetic):
    """With the next-item weight at 0 the loss is the auxiliary loss alone; fit's history starts after the
    pre-training epochs (no validation while they run)."""
    model = model_of(synthetic, attribute_loss=0.5).train()
    seq = torch.randint(1, synthetic.n_items + 1, (4, 13), generator=torch.Generator().manual_seed(3))
    out = model(H.Batch(seq[:, :-1], seq[:, 1:]))
    loss = H.next_item_loss(out, model.output_table(), model.config, item_weight=0.0)
    assert torch.equal(loss, out.aux_loss) and out.aux_loss.item() > 0
    result = H.fit(model, synthetic, epochs=3, pretrain_epochs=2, eval_every=1, patience=5)
    assert [h["epoch"] for h in result.history] == [3]
    with pytest.raises(H.ConfigError, match="pretrain_epochs"):
        H.config("synthetic", pretrain_epochs=2)


def explicit_neighbour_distribution(attrs, n_items):
    """q[t, j] of attribute smoothing built by counting: for each attribute v > 1 of item t, mass 1 / (number of
    t's attributes) spread equally over the items that carry v; the item itself where it has no attribute."""
    q = torch.zeros(n_items + 1, n_items + 1, dtype=torch.float64)
    for t in range(1, n_items + 1):
        values = [v for v in attrs[t].tolist() if v > 1]
        if not values:
            q[t, t] = 1.0
        for v in values:
            carriers = [j for j in range(1, n_items + 1) if v in attrs[j].tolist()]
            for j in carriers:
                q[t, j] += 1.0 / len(values) / len(carriers)
    return q


@pytest.mark.parametrize("uniform", [0.0, 0.1])
def test_attribute_smoothing_is_the_cross_entropy_of_the_smoothed_target(synthetic, uniform):
    """The closed form (lse - z_t) + ε (z_t - h · c_t) equals the cross-entropy against the soft target
    (1 - ε_u - ε) δ_t + ε_u / n + ε q_t, q_t built by counting the items that share t's attributes."""
    eps = 0.3
    model = model_of(synthetic).double()
    table = model.output_table().detach()
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 7, D, generator=g, dtype=torch.float64)
    targets = torch.randint(1, synthetic.n_items + 1, (3, 7), generator=g)
    targets[0, :2] = 0  # padding carries no loss
    cfg = H.config("synthetic", label_smoothing=uniform, attribute_smoothing=eps, device="cpu", ce_kernel="torch")
    loss = H.next_item_loss(H.Output(hidden, targets), table, cfg, neighbours=model.attribute_neighbours(table))

    n = synthetic.n_items
    q = explicit_neighbour_distribution(model.item_attributes, n)[:, 1:]
    keep = targets.flatten() > 0
    t = targets.flatten()[keep]
    soft = (1 - uniform - eps) * F.one_hot(t - 1, n).double() + uniform / n + eps * q[t]
    assert torch.allclose(soft.sum(-1), torch.ones(len(t), dtype=torch.float64))
    log_p = torch.log_softmax(hidden.flatten(0, 1)[keep] @ table[1:].T, -1)
    expected = -(soft * log_p).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # the loss's softmax runs in fp32


def test_attribute_smoothing_follows_the_attributes_the_model_reads(synthetic):
    """The shuffled control smooths toward its shuffled attributes' neighbours; the item-only ablation reads no
    attributes, so its loss is left alone; gradients reach the neighbours' vectors."""
    holo, shuffled = model_of(synthetic), model_of(synthetic, "HoloMamba-Shuffled")
    table = holo.output_table().detach()
    assert not torch.allclose(holo.attribute_neighbours(table), shuffled.attribute_neighbours(table))
    assert model_of(synthetic, "Mamba-ItemOnly", binding="item").attribute_neighbours(table) is None
    cfg = H.config("synthetic", attribute_smoothing=0.2, device="cpu", ce_kernel="torch")
    table = holo.output_table()
    hidden = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    H.next_item_loss(H.Output(hidden, targets), table, cfg, neighbours=holo.attribute_neighbours(table)).backward()
    carriers = (holo.item_attributes.unsqueeze(1) == holo.item_attributes[3][holo.item_attributes[3] > 1]
                .view(1, -1, 1)).any(-1).any(-1)
    others = carriers.nonzero().flatten()
    others = others[~torch.isin(others, targets.flatten())]
    assert len(others) > 0 and holo.item_emb.weight.grad[others].abs().sum() > 0


def test_attribute_smoothing_leaves_room_for_the_target():
    with pytest.raises(H.ConfigError, match="label_smoothing \\+ attribute_smoothing must stay below 1"):
        H.config("synthetic", label_smoothing=0.5, attribute_smoothing=0.5)


def test_frequency_mixing_starts_as_the_model_without_it_and_weighs_each_popularity_bucket(synthetic):
    """Buckets are floor(log2(1 + training count)), the last open-ended; with every weight at 1 the item vectors are
    those of the model without mixing; a bucket's weights change that bucket's items only, each its own part."""
    plain, mixed = model_of(synthetic), model_of(synthetic, frequency_mixing=4)
    counts = synthetic.item_counts.tolist()
    assert mixed.popularity_bucket.tolist() == [min(int(math.log2(1 + c)), 3) for c in counts]
    assert len(set(mixed.popularity_bucket[1:].tolist())) > 1  # the synthetic items span several buckets
    ids = torch.arange(1, synthetic.n_items + 1)
    with torch.no_grad():
        torch.testing.assert_close(mixed.item_vectors(ids), plain.item_vectors(ids), rtol=0, atol=0)
        mixed.attribute_mix[2] = 0.0
        mixed.item_mix[1] = 0.5
        vectors, bucket = mixed.item_vectors(ids), mixed.popularity_bucket[ids]
        x, fillers = plain.item_emb(ids), plain.role_fillers(ids)
        torch.testing.assert_close(vectors[bucket == 2], x[bucket == 2])  # roles binding: e = x + fillers
        torch.testing.assert_close(vectors[bucket == 1], 0.5 * x[bucket == 1] + fillers[bucket == 1])
        others = (bucket != 1) & (bucket != 2)
        torch.testing.assert_close(vectors[others], plain.item_vectors(ids)[others], rtol=0, atol=0)
    mixed.item_vectors(ids).sum().backward()
    assert mixed.item_mix.grad.abs().sum() > 0 and mixed.attribute_mix.grad.abs().sum() > 0
    with pytest.raises(H.ConfigError, match="--frequency_mixing=4: needs --binding=roles or both"):
        H.config("synthetic", frequency_mixing=4)


def test_a_frequency_mixed_model_saves_and_loads_with_its_buckets(synthetic, tmp_path):
    model = model_of(synthetic, frequency_mixing=6)
    with torch.no_grad():
        model.attribute_mix[3] = 2.0
    H.save(model, tmp_path / "m.pt")
    loaded = H.load(tmp_path / "m.pt")
    assert torch.equal(loaded.popularity_bucket, model.popularity_bucket)
    ids = torch.arange(1, synthetic.n_items + 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.item_vectors(ids), model.item_vectors(ids), rtol=0, atol=0)


def test_the_two_masked_objectives_share_one_draw_and_one_pass(synthetic, monkeypatch):
    """With masked_attribute_loss and cloze_loss both set, a training forward masks once and runs the two-sided
    pass once; its auxiliary loss is each weighted objective on that one draw (to 1e-6)."""
    model = model_of(synthetic, masked_attribute_loss=0.3, cloze_loss=0.5).train()
    seq = torch.randint(1, synthetic.n_items + 1, (4, 13), generator=torch.Generator().manual_seed(2))
    passes, real = [], model.masked_context
    monkeypatch.setattr(model, "masked_context", lambda *args: passes.append(1) or real(*args))
    torch.manual_seed(7)
    aux = model(H.Batch(seq[:, :-1], seq[:, 1:])).aux_loss
    assert len(passes) == 1
    torch.manual_seed(7)
    drawn = model.masked_pass(seq[:, :-1])
    expected = 0.3 * model.masked_attribute_prediction(seq[:, :-1], drawn) + model.cloze_objective(seq[:, :-1], drawn)
    torch.testing.assert_close(aux, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["HoloMamba", "Mamba-ItemOnly"])
def test_cloze_loss_value_gradients_and_initial_weights(synthetic, name):
    """Masked-item (Cloze) prediction: the cross-entropy of each masked item under the full softmax of the
    two-sided context against the output table, averaged over the masked positions; it trains the backward encoder,
    the mask vector and the causal encoder, also without attributes; the shared weights start as without it."""
    cfg = H.config("synthetic", d_model=16, n_layers=1, max_len=12, device="cpu", scan_backend="reference")
    torch.manual_seed(0)
    plain = H.build_model(name, synthetic, cfg)
    torch.manual_seed(0)
    model = H.build_model(name, synthetic, cfg.replace(cloze_loss=0.5, mask_prob=0.3))
    loss, seq, masked, context = masked_objective_and_context(plain, model, model.cloze_objective)
    expected = 0.5 * F.cross_entropy(context @ model.output_table()[1:].T, seq[masked] - 1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    loss.backward()
    for param in (model.mask_vector, model.backward_mixers[0].in_proj.weight, model.mixers[0].in_proj.weight,
                  model.item_emb.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.cloze_objective(torch.zeros_like(seq)) == 0  # nothing to mask: no loss, no NaN
    out = model(H.Batch(seq[:, :-1], seq[:, 1:]))  # the forward adds it to the model's auxiliary loss
    assert out.aux_loss.dim() == 0 and out.aux_loss > 0
    assert model.eval()(H.Batch(seq[:, :-1], seq[:, 1:])).aux_loss == 0.0
    with pytest.raises(H.ConfigError, match="--cloze_loss=0.5: cannot be combined with memory_slots"):
        H.config("synthetic", cloze_loss=0.5, memory_slots=8, memory_len=10)


def test_overlap_neighbours_of_a_hand_built_table():
    """attribute_neighbours=K: the K items sharing the most tokens (0 padding and 1 'no attribute' never count),
    equal counts ordered by training popularity, weights the shared counts normalised to sum 1, none for an item
    that shares nothing."""
    attrs = torch.tensor([[0, 0, 0], [2, 3, 0], [2, 3, 4], [2, 5, 0], [1, 0, 0], [6, 0, 0], [3, 4, 0]])
    counts = torch.tensor([0, 5, 1, 9, 3, 2, 7])
    ids, weights = H.attribute_overlap_neighbours(attrs, 3, counts)
    assert ids[1].tolist() == [2, 3, 6] and weights[1].tolist() == [0.5, 0.25, 0.25]  # 2 shared, then 1 and 1 (9 > 7)
    assert ids[2].tolist()[:2] == [6, 1] and torch.allclose(weights[2], torch.tensor([0.4, 0.4, 0.2]))  # 7 > 5
    assert ids[3].tolist()[:2] == [1, 2] and weights[3].tolist() == [0.5, 0.5, 0.0]
    assert ids[6].tolist()[:2] == [2, 1] and torch.allclose(weights[6], torch.tensor([2 / 3, 1 / 3, 0.0]))
    for row in (0, 4, 5):  # padding, 'no attribute', a token nobody else has
        assert weights[row].sum() == 0


def test_overlap_neighbour_smoothing_is_the_cross_entropy_of_the_smoothed_target(synthetic):
    """With attribute_neighbours=K the soft target's attribute part is q_t = the overlap weights on t's K
    neighbours (t itself where it shares nothing): the closed form against the cross-entropy built from it; the
    shuffled control's neighbours are those of its shuffled table."""
    eps, k = 0.3, 6
    model = model_of(synthetic, attribute_neighbours=k).double()
    table = model.output_table().detach()
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 7, D, generator=g, dtype=torch.float64)
    targets = torch.randint(1, synthetic.n_items + 1, (3, 7), generator=g)
    cfg = H.config("synthetic", label_smoothing=0.1, attribute_smoothing=eps, device="cpu", ce_kernel="torch")
    loss = H.next_item_loss(H.Output(hidden, targets), table, cfg, neighbours=model.attribute_neighbours(table))

    n = synthetic.n_items
    ids, weights = H.attribute_overlap_neighbours(model.item_attributes, k, synthetic.item_counts)
    q = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for t in range(1, n + 1):
        for j, w in zip(ids[t].tolist(), weights[t].tolist()):
            q[t, j] += w
        if weights[t].sum() == 0:
            q[t, t] = 1.0
    t = targets.flatten()
    soft = (0.9 - eps) * F.one_hot(t - 1, n).double() + 0.1 / n + eps * q[t, 1:]
    assert torch.allclose(soft.sum(-1), torch.ones(len(t), dtype=torch.float64))
    expected = -(soft * torch.log_softmax(hidden.flatten(0, 1) @ table[1:].T, -1)).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # the loss's softmax runs in fp32

    shuffled = model_of(synthetic, "HoloMamba-Shuffled", attribute_neighbours=k)
    ids, weights = H.attribute_overlap_neighbours(shuffled.item_attributes, k, synthetic.item_counts)
    assert torch.equal(shuffled.neighbour_ids, ids) and torch.equal(shuffled.neighbour_weights, weights)
    assert not torch.equal(shuffled.neighbour_ids, model.neighbour_ids)
