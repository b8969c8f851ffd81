"""Muon: Newton-Schulz orthogonalisation and the update it applies."""
import pytest
import torch

import train_gpt as tg


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 64, 32), (512, 1536)])
def test_orthogonalised_update_has_singular_values_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * torch.logspace(-1, 0, shape[-1])  # uneven column scales, like real gradients
    s = torch.linalg.svdvals(tg.newton_schulz(g, 5))
    assert s.min() > 0.6 and s.max() < 1.2


def test_square_matrix_with_spread_spectrum_is_flattened_towards_one():
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(96, 96))
    q2, _ = torch.linalg.qr(torch.randn(96, 96))
    g = q1 @ torch.diag(torch.linspace(0.05, 5.0, 96)) @ q2  # singular values spread over 100x
    s = torch.linalg.svdvals(tg.newton_schulz(g, 5))
    assert s.min() > 0.6 and s.max() < 1.2


def test_batched_orthogonalisation_equals_one_matrix_at_a_time():
    g = torch.randn(4, 32, 48)
    batched = tg.newton_schulz(g, 5)
    single = torch.stack([tg.newton_schulz(m, 5) for m in g])
    assert torch.allclose(batched, single, atol=1e-5)


def test_muon_step_applies_decay_then_the_scaled_orthogonal_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))
    p.grad = torch.randn(64, 32)
    before, grad = p.detach().clone(), p.grad.clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5)
    opt.step()
    nesterov = grad + 0.9 * grad  # first step: buffer = grad
    expected = before * (1 - 0.1 * 0.5) - 0.1 * tg.newton_schulz(nesterov, 5) * (64 / 32) ** 0.5
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def spread_spectrum_matrix(n: int = 96, low: float = 1e-3, high: float = 5.0) -> torch.Tensor:
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(n, n))
    q2, _ = torch.linalg.qr(torch.randn(n, n))
    return q1 @ torch.diag(torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), n)) @ q2


def test_polar_express_lands_closer_to_orthogonal_than_the_classic_triple_in_five_steps():
    g = spread_spectrum_matrix(low=0.05)  # singular values spread over 100x
    error = {v: (torch.linalg.svdvals(tg.newton_schulz(g, 5, v)) - 1).abs().max().item() for v in ("classic", "polar")}
    assert error["polar"] < 0.15 < 0.3 < error["classic"]


def test_polar_express_converges_to_orthogonal_with_more_steps():
    s = torch.linalg.svdvals(tg.newton_schulz(spread_spectrum_matrix(low=0.01), 8, "polar"))
    assert (s - 1).abs().max() < 0.01


def one_muon_update(grad: torch.Tensor, row_norm: bool) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    tg.Muon([p], lr=1.0, momentum=0.9, backend_steps=5, weight_decay=0.0, row_norm=row_norm).step()
    return p.detach().clone()


def test_row_normalised_muon_ignores_how_loud_each_gradient_row_is():
    torch.manual_seed(0)
    grad = torch.randn(48, 32)
    loud_rows = grad * torch.logspace(-2, 2, 48)[:, None]
    assert torch.allclose(one_muon_update(grad, True), one_muon_update(loud_rows, True), atol=1e-5)
    assert not torch.allclose(one_muon_update(grad, False), one_muon_update(loud_rows, False), atol=1e-2)
