"""Dead-concept revival on a concept stage whose pixels are known by construction."""
import torch

from ivpt.engine.health import ALIVE_SHARE
from ivpt.engine.revive import dead_prototypes, revive_dead_concepts
from ivpt.models.prototypes import ConceptStage

D, GRID = 16, (6, 6)


def _features(seed: int = 0) -> torch.Tensor:
    """(4, 36, D) features in three tight clusters around ±4·e_0 and 4·e_1 (each a third of the pixels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(3, D)
    centres[0, 0], centres[1, 0], centres[2, 1] = 4.0, -4.0, 4.0
    which = torch.arange(36) % 3
    return centres[which].expand(4, -1, -1) + 0.3 * torch.randn(4, 36, D, generator=g)


def _wins(stage: ConceptStage, feats: torch.Tensor) -> list[float]:
    maps = stage.maps(feats, GRID)
    return torch.bincount(maps.argmax(1).flatten(), minlength=stage.num_prototypes).float().tolist()


def _stage() -> ConceptStage:
    """Four prototypes: two on clusters 0 and 2, one far from every feature (dead), background on cluster 1."""
    stage = ConceptStage(4, D, GRID, init_std=0.05)
    with torch.no_grad():
        stage.prototypes.zero_()
        stage.prototypes[0, 0] = 4.0
        stage.prototypes[1, 1] = 4.0
        stage.prototypes[2, 2] = 40.0  # dead: no feature is anywhere near
        stage.prototypes[3, 0] = -4.0
    return stage


def test_dead_prototypes_follow_the_alive_share():
    assert dead_prototypes([50, 0, 49.9, 10]) == [1]
    assert ALIVE_SHARE == 0.01
    assert dead_prototypes([100, 2, 98, 0]) == []  # exactly 1 % of 200 pixels: alive
    assert dead_prototypes([100, 1.99, 98, 0]) == [1]
    assert dead_prototypes([0, 0, 0]) == []  # nothing counted: nothing to judge


def test_a_dead_prototype_splits_the_largest_region_and_wins_pixels_again():
    feats = _features()
    stage = _stage()
    wins = _wins(stage, feats)
    assert wins[2] == 0 and dead_prototypes(wins) == [2]
    opt = torch.optim.Adam(stage.parameters(), lr=1e-3)
    stage.prototypes.grad = torch.randn_like(stage.prototypes)
    stage.spatial_bias.grad = torch.randn_like(stage.spatial_bias)
    opt.step()
    donor = max(range(4), key=lambda j: wins[j])
    before = stage.prototypes.detach().clone()
    revived = revive_dead_concepts([stage], [wins], opt, noise_std=0.05, generator=torch.Generator().manual_seed(3))
    assert revived == [(0, 2, donor)]
    # The copy sits within the noise of its donor; the other prototypes did not move.
    assert torch.linalg.vector_norm(stage.prototypes[2] - before[donor]) < 0.05 * D ** 0.5 * 3
    assert torch.equal(stage.prototypes[[0, 1, 3]], before[[0, 1, 3]])
    assert torch.equal(stage.spatial_bias[2], stage.spatial_bias[donor])
    for key in ("exp_avg", "exp_avg_sq"):
        state = opt.state[stage.prototypes][key]
        assert torch.equal(state[2], state[donor])
    # The donor's pixels are now shared between the two, and nobody is dead.
    after = _wins(stage, feats)
    assert after[2] > ALIVE_SHARE * sum(after) and after[donor] > 0 and dead_prototypes(after) == []
    assert after[2] + after[donor] == wins[donor]


def test_revival_is_deterministic_and_splits_a_split_donor_only_once_more_than_needed():
    feats = _features()
    stages = []
    for _ in range(2):
        stage = ConceptStage(5, D, GRID)
        with torch.no_grad():
            stage.prototypes.zero_()
            stage.prototypes[0, 0] = 4.0
            stage.prototypes[1, 2] = 40.0  # dead
            stage.prototypes[2, 3] = 40.0  # dead
            stage.prototypes[3, 1] = 4.0
            stage.prototypes[4, 0] = -4.0
        stages.append(stage)
    wins = _wins(stages[0], feats)
    runs = [revive_dead_concepts([s], [wins], None, noise_std=0.05, generator=torch.Generator().manual_seed(7))
            for s in stages]
    assert runs[0] == runs[1] and torch.equal(stages[0].prototypes, stages[1].prototypes)
    # Three regions of equal size: the two dead prototypes take two different donors.
    donors = [d for _, _, d in runs[0]]
    assert len(set(donors)) == 2
    assert dead_prototypes(_wins(stages[0], feats)) == []
