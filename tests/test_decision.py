"""How much the parts decide (parts_only_top1, parts_agree, part_share) on heads whose answers are known by
construction, against a float64 loop, and on a real concept model with and without its global part."""
import numpy as np
import pytest
import torch

from ivpt.metrics.decision import DecisionMeter, margin_share, part_evidence


def _head(part_logits: torch.Tensor, global_logits: torch.Tensor, share: float):
    """logits of a head with N parts and global share s: (1 - s)/N · Σ parts + s · global."""
    n = part_logits.shape[1]
    w_part, w_global = (1 - share) / n, share
    return w_part * part_logits.sum(dim=1) + w_global * global_logits, w_part, w_global


def test_constructed_head_scores_by_hand():
    # Two parts, three classes, share 0.5: w_part = 0.25, w_global = 0.5.
    parts = torch.tensor([
        [[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]],  # parts say class 0 (P = [2, 0, 0])
        [[0.0, 4.0, 0.0], [0.0, 4.0, 0.0]],  # parts say class 1 (P = [0, 2, 0])
        [[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]],  # parts say class 2 (P = [0, 0, 1])
    ])
    glob = torch.tensor([
        [0.0, 2.0, 0.0],  # G = [0, 1, 0]: logits [2, 1, 0], margin 1, parts supply 2 - 0 = 2 → clipped to 1
        [0.0, 2.0, 0.0],  # G = [0, 1, 0]: logits [0, 3, 0], margin 3 over class 0 (tie with 2 → first), P 2 - 0 → 2/3
        [8.0, 0.0, 0.0],  # G = [4, 0, 0]: logits [4, 0, 1], full says 0, parts say 2; margin 3, P[0]-P[2] = -1 → 0
    ])
    labels = torch.tensor([0, 1, 2])
    logits, w_part, w_global = _head(parts, glob, 0.5)
    assert w_part == 0.25 and w_global == 0.5
    meter = DecisionMeter()
    meter.update(logits, parts, labels, w_part=w_part, w_global=w_global)
    out = meter.compute()
    assert out["parts_only_top1"] == pytest.approx(100.0)  # parts right on all three
    assert out["parts_agree"] == pytest.approx(200.0 / 3)  # the third image's full prediction is class 0
    assert out["part_share"] == pytest.approx((1.0 + 2.0 / 3 + 0.0) / 3)


def test_global_off_is_all_parts():
    g = torch.Generator().manual_seed(0)
    parts = torch.randn(50, 4, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    logits = parts.mean(dim=1)
    meter = DecisionMeter()
    meter.update(logits, parts, labels, w_part=0.25, w_global=0.0)
    out = meter.compute()
    full_top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    assert out == {"parts_only_top1": pytest.approx(full_top1), "parts_agree": 100.0, "part_share": 1.0}


def test_global_only_parts_constant_supply_nothing():
    # Every part scores every class alike: the parts can break no tie, the global token decides everything.
    g = torch.Generator().manual_seed(1)
    parts = torch.ones(20, 3, 5)
    glob = torch.randn(20, 5, generator=g)
    logits, w_part, w_global = _head(parts, glob, 0.5)
    meter = DecisionMeter()
    meter.update(logits, parts, torch.zeros(20, dtype=torch.long), w_part=w_part, w_global=w_global)
    assert meter.compute()["part_share"] == 0.0


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_matches_float64_loop_and_is_batch_and_shard_invariant(share):
    g = torch.Generator().manual_seed(2)
    parts = torch.randn(97, 5, 11, generator=g)
    glob = 3 * torch.randn(97, 11, generator=g)
    labels = torch.randint(0, 11, (97,), generator=g)
    logits, w_part, w_global = _head(parts, glob, share)
    # float64 reference, image by image
    P, L = w_part * parts.double().sum(1).numpy(), logits.double().numpy()
    hits = agree = 0
    shares = []
    for i in range(97):
        order = np.argsort(-L[i], kind="stable")
        c1, c2 = order[0], order[1]
        pp = int(np.argmax(parts[i].double().sum(0).numpy()))
        hits += pp == int(labels[i])
        agree += pp == int(np.argmax(L[i]))
        shares.append(min(1.0, max(0.0, (P[i, c1] - P[i, c2]) / (L[i, c1] - L[i, c2]))))
    whole = DecisionMeter()
    whole.update(logits, parts, labels, w_part=w_part, w_global=w_global)
    expected = {"parts_only_top1": 100.0 * hits / 97, "parts_agree": 100.0 * agree / 97,
                "part_share": float(np.mean(shares))}
    assert whole.compute() == pytest.approx(expected, rel=1e-6)
    # Shards merged (as processes would be summed) and padded rows excluded give the same numbers.
    a, b = DecisionMeter(), DecisionMeter()
    a.update(logits[:40], parts[:40], labels[:40], w_part=w_part, w_global=w_global)
    pad = torch.cat([logits[40:], logits[:3]]), torch.cat([parts[40:], parts[:3]]), torch.cat([labels[40:], labels[:3]])
    valid = torch.arange(60) < 57
    b.update(*pad, w_part=w_part, w_global=w_global, valid=valid)
    assert a.merge(b).compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_ties_have_no_margin_and_empty_meter_has_no_scores():
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    share, has_margin = margin_share(logits, logits)
    assert not bool(has_margin[0]) and float(share[0]) == 0.0
    meter = DecisionMeter()
    assert meter.compute() == {} and set(meter.no_data()) == {"parts_only_top1", "parts_agree", "part_share"}
    meter.update(logits, torch.ones(1, 2, 3), torch.tensor([0]), w_part=0.25, w_global=0.5)
    assert "part_share" not in meter.compute() and "part_share" in meter.no_data()


def test_part_evidence_is_the_logits_without_a_global_term():
    parts = torch.randn(4, 3, 6)
    logits = parts.mean(1)
    assert part_evidence(logits, parts, 1 / 3, 0.0) is logits
    assert torch.allclose(part_evidence(logits, parts, 0.25, 0.25), 0.25 * parts.sum(1))
