from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from balcony_cli.distill import distillation_losses, hidden_state_losses, naive_distillation_losses, token_kl


def test_token_kl_matches_hand_computation():
    teacher = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    student = torch.tensor([[math.log(0.25), math.log(0.25), math.log(0.5)]])
    # KL(p || q) = 0.5 ln(0.5/0.25) + 0.25 ln(1) + 0.25 ln(0.25/0.5) = 0.25 ln 2
    expected = 0.25 * math.log(2)
    assert token_kl(teacher, student).item() == pytest.approx(expected, abs=1e-6)
    assert token_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_token_kl_temperature_scaling():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    student = torch.tensor([[0.0, 1.0, 0.0]])
    temperature = 2.0
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    expected = (p * (p.log() - q.log())).sum().item() * temperature**2
    assert token_kl(teacher, student, temperature).item() == pytest.approx(expected, rel=1e-6)


def _head_and_states(seed: int = 0, vocab: int = 50, hidden: int = 16):
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False)
    head.requires_grad_(False)
    teacher = torch.randn(2, 7, hidden)
    exits = [torch.randn(2, 7, hidden, requires_grad=True) for _ in range(3)]
    return head, teacher, exits


def test_distillation_loss_equals_hand_computed_kl():
    head, teacher, exits = _head_and_states()
    losses = distillation_losses(head, teacher, exits, chunk_tokens=5)
    for index, hidden in enumerate(exits):
        p = torch.softmax(head(teacher), -1)
        q = torch.softmax(head(hidden), -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean()
        assert losses[index].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 5, 14, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_loss_and_gradients_equal_unchunked(chunk_tokens, temperature):
    head, teacher, exits = _head_and_states()
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    weights = torch.tensor([1.0, 0.5, 2.0])

    chunked = distillation_losses(head, teacher, exits, mask, temperature, chunk_tokens)
    (weights * chunked).sum().backward()
    chunked_grads = [h.grad.clone() for h in exits]
    for h in exits:
        h.grad = None

    reference = naive_distillation_losses(head, teacher, exits, mask, temperature)
    (weights * reference).sum().backward()

    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(chunked_grads, [h.grad for h in exits]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_masked_tokens_do_not_contribute():
    head, teacher, exits = _head_and_states()
    mask = torch.ones(2, 7)
    mask[0, 3:] = 0
    changed = [h.detach().clone() for h in exits]
    for h in changed:
        h[0, 3:] += 10.0
    before = distillation_losses(head, teacher, [h.detach() for h in exits], mask)
    after = distillation_losses(head, teacher, changed, mask)
    torch.testing.assert_close(before, after)


def test_head_with_bias_supported():
    torch.manual_seed(1)
    head = nn.Linear(8, 20)
    head.requires_grad_(False)
    teacher = torch.randn(1, 4, 8)
    exits = [torch.randn(1, 4, 8)]
    torch.testing.assert_close(
        distillation_losses(head, teacher, exits, chunk_tokens=3),
        naive_distillation_losses(head, teacher, exits),
        rtol=1e-5,
        atol=1e-6,
    )


def test_hidden_state_loss_equals_hand_computed_value():
    teacher = torch.zeros(1, 2, 2)
    exit_hidden = torch.tensor([[[1.0, 1.0], [3.0, 1.0]]])
    # Token 1: (1 + 1) / 2 = 1; token 2: (9 + 1) / 2 = 5; mean over tokens = 3.
    assert hidden_state_losses(teacher, [exit_hidden]).tolist() == [3.0]
    # Padding at token 2 leaves token 1 alone.
    assert hidden_state_losses(teacher, [exit_hidden], torch.tensor([[1, 0]])).tolist() == [1.0]
    shifted = hidden_state_losses(teacher + 1.0, [exit_hidden, teacher])
    # Against a teacher of ones: token 1 gives 0, token 2 gives (4 + 0) / 2 = 2; zeros against ones give 1.
    assert shifted.tolist() == [1.0, 1.0]


def test_hidden_state_loss_gradient_reaches_exit_only():
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    exit_hidden = torch.randn(2, 3, 4, requires_grad=True)
    hidden_state_losses(teacher, [exit_hidden]).sum().backward()
    assert teacher.grad is None
    expected = 2 * (exit_hidden - teacher).detach() / exit_hidden.numel()
    torch.testing.assert_close(exit_hidden.grad, expected)


def test_forward_all_adds_weighted_hidden_term():
    from conftest import VOCAB, tiny_model

    from balcony_cli.model import BalconyModel

    model = BalconyModel(tiny_model("llama"), [1, 2])
    input_ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        out = model.forward_all(input_ids, loss_temperature=1.0, hidden_loss_weight=0.5)
        plain = model.forward_all(input_ids, loss_temperature=1.0)
    assert plain.hidden_mse is None
    torch.testing.assert_close(plain.losses, plain.kl)
    for index, k in enumerate([1, 2]):
        mse = (out.exit_hidden[k] - out.full_hidden).pow(2).mean()
        assert out.hidden_mse[index].item() == pytest.approx(mse.item(), rel=1e-5)
        assert out.losses[index].item() == pytest.approx(out.kl[index].item() + 0.5 * mse.item(), rel=1e-5)
