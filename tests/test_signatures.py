"""Signature spaces: exact padding, the Cauchy L1 sketch, the sign sketch for dot products."""

import numpy as np
import pytest
import torch

from tree_service import InvalidSignature, Projector, SignatureSpace

pytestmark = pytest.mark.unit


def test_exact_padding_keeps_l1_and_refuses_too_wide_modules():
    space = SignatureSpace(2, 8)
    proj = Projector(space)
    a, b = torch.randn(5), torch.randn(5)
    pa_, pb = proj.project_module(a), proj.project_module(b)
    assert pa_.shape == (8,) and torch.allclose(space.distance(pa_, pb), (a - b).abs().sum())
    with pytest.raises(InvalidSignature, match="width is 8"):
        proj.project_module(torch.randn(9))


def test_cauchy_median_estimates_l1_distance():
    space = SignatureSpace(1, 1024, projection="cauchy", seed=3)
    proj = Projector(space)
    g = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(20):
        a, b = torch.randn(3000, generator=g), torch.randn(3000, generator=g)
        est = float(space.distance(proj.project_module(a), proj.project_module(b)))
        errors.append(abs(est / float((a - b).abs().sum()) - 1))
    assert np.median(errors) < 0.06 and max(errors) < 0.2, errors  # ~1.57/sqrt(D) = 5% expected


def test_projection_is_a_function_of_seed_and_size_only():
    space = SignatureSpace(1, 64, projection="cauchy", seed=7)
    v = torch.randn(500)
    assert torch.equal(Projector(space).project_module(v), Projector(space).project_module(v))
    other = SignatureSpace(1, 64, projection="cauchy", seed=8)
    assert not torch.equal(Projector(space).project_module(v), Projector(other).project_module(v))


def sketched_agreement(n_tasks=40, size=2048, width=256, noise=0.5, trials=60, seed=0) -> float:
    """How often the nearest task by sketched distance equals the nearest by exact L1."""
    g = torch.Generator().manual_seed(seed)
    space = SignatureSpace(1, width, projection="cauchy", seed=seed)
    proj = Projector(space)
    tasks = torch.randn(n_tasks, size, generator=g)
    sketched = torch.stack([proj.project_module(t) for t in tasks])
    agree = 0
    for _ in range(trials):
        q = tasks[torch.randint(n_tasks, (1,), generator=g)] .squeeze(0) + noise * torch.randn(size, generator=g)
        exact = int((tasks - q).abs().sum(1).argmin())
        approx = int(space.distance(sketched, proj.project_module(q)).argmin())
        agree += exact == approx
    return agree / trials


def test_sketched_selection_matches_exact_selection():
    assert sketched_agreement() >= 0.95


def test_sign_sketch_preserves_dot_products_for_the_dot_metric():
    space = SignatureSpace(1, 2048, projection="sign", metric="dot", seed=1)
    proj = Projector(space)
    a = torch.randn(1000)
    b = a + 0.5 * torch.randn(1000)
    est = -float(space.distance(proj.project_module(a), proj.project_module(b)))
    assert abs(est / float(a @ b) - 1) < 0.15


@pytest.mark.parametrize("metric, projection", [("l1", "sign"), ("dot", "cauchy")])
def test_sketches_that_break_the_metric_are_refused(metric, projection):
    with pytest.raises(InvalidSignature, match="does not preserve"):
        SignatureSpace(2, 8, projection=projection, metric=metric)
