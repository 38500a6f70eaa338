"""The decomposition of diff-in-means on spans of SAE decoder directions."""
import numpy as np
import pytest
import torch

from saif_utils.decomposition import best_latents, cosine, project_on_span, span_share, unit_rows


@pytest.fixture
def decoder():
    """A dictionary of 200 random, non-orthogonal directions in 32 dimensions, with uneven row norms."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 32, generator=generator)
    return rows * torch.linspace(0.5, 3.0, 200)[:, None]


def test_span_share_reads_the_squared_norm_inside_a_non_orthogonal_span(decoder):
    basis = unit_rows(decoder[[3, 10]])
    inside = 2.0 * basis[0] - 0.7 * basis[1]
    assert span_share(inside, basis) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(project_on_span(inside, basis), inside, atol=1e-5, rtol=1e-5)
    # Half of the squared norm inside, half orthogonal to both rows.
    orthogonal = torch.linalg.svd(basis, full_matrices=True).Vh[2]
    half = inside / inside.norm() + orthogonal
    assert span_share(half, basis) == pytest.approx(0.5, abs=1e-6)
    assert span_share(orthogonal, basis) == pytest.approx(0.0, abs=1e-9)


def test_best_latents_recover_a_planted_combination(decoder):
    planted = [17, 42, 150]
    direction = (torch.tensor([1.5, -1.0, 0.8])[:, None] * unit_rows(decoder[planted])).sum(0)
    assert sorted(best_latents(direction, decoder, 3).tolist()) == planted
    best_share = span_share(direction, unit_rows(decoder[best_latents(direction, decoder, 2)]))
    rng = np.random.default_rng(0)
    others = [span_share(direction, unit_rows(decoder[rng.choice(200, 2, replace=False)])) for _ in range(50)]
    assert best_share > max(others)
    with pytest.raises(ValueError, match="k=0 must lie in 1 … 200"):
        best_latents(direction, decoder, 0)


def test_cosine():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 3.0])) == pytest.approx(2 ** -0.5)
