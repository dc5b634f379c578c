"""Self-distillation loss: forward KL(full || exit) per token, computed in chunks of tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Return KL(teacher || student) for each row of (tokens, vocab) logits, in nats.

    Both distributions are softened by `temperature`, and the result is scaled by temperature**2 so
    that gradient magnitudes do not shrink as the temperature grows (Hinton et al., 2015).
    """
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return kl * temperature**2


class _ChunkedDistillation(torch.autograd.Function):
    """Per-exit mean KL whose gradient is computed chunk by chunk during the forward pass.

    Autograd would keep every chunk's (tokens, vocab) logits of every exit alive until backward.
    Here each chunk's logits are freed as soon as its gradient with respect to the exit hidden state
    is known, so the peak memory is one chunk's logits, whatever the sequence length and exit count.
    The gradient is the closed form of the KL: with q = softmax(z / T) and p the teacher's,
    d(T**2 * KL)/dz = T * (q - p), and the head is linear, so d/dh = that @ W.
    """

    @staticmethod
    def forward(ctx, head, teacher_hidden, token_weights, chunk_tokens, temperature, *exit_hidden):
        # teacher_hidden and each exit_hidden: (tokens, hidden); token_weights: (tokens,), summing to 1.
        weight, bias = head.weight, head.bias
        losses = torch.zeros(len(exit_hidden), dtype=torch.float32, device=teacher_hidden.device)
        grads = [torch.empty_like(h) for h in exit_hidden]
        for start in range(0, teacher_hidden.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            weights = token_weights[start:stop].float()  # (chunk,)
            teacher_log_probs = F.log_softmax(
                F.linear(teacher_hidden[start:stop], weight, bias).float() / temperature, dim=-1
            )  # (chunk, vocab)
            teacher_probs = teacher_log_probs.exp()
            teacher_neg_entropy = (teacher_probs * teacher_log_probs).sum(dim=-1)  # (chunk,)
            del teacher_log_probs
            for index, hidden in enumerate(exit_hidden):
                chunk = hidden[start:stop]
                student_log_probs = F.log_softmax(F.linear(chunk, weight, bias).float() / temperature, dim=-1)
                kl = teacher_neg_entropy - (teacher_probs * student_log_probs).sum(dim=-1)  # (chunk,)
                losses[index] += (kl * weights).sum() * temperature**2
                logit_grad = student_log_probs.exp_().sub_(teacher_probs).mul_((weights * temperature)[:, None])
                grads[index][start:stop] = (logit_grad.to(weight.dtype) @ weight).to(chunk.dtype)
                del student_log_probs, logit_grad
        ctx.save_for_backward(*grads)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grads = ctx.saved_tensors
        exit_grads = [grad * grad_losses[index].to(grad.dtype) for index, grad in enumerate(grads)]
        return (None, None, None, None, None, *exit_grads)


def distillation_losses(
    head: nn.Module,
    teacher_hidden: torch.Tensor,
    exit_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Return each exit's mean token KL(full || exit), shape (num_exits,), differentiable in the exits.

    `teacher_hidden` and `exit_hidden` are (batch, sequence, hidden) states before the shared `head`,
    which must be an nn.Linear (every supported architecture's LM head is). Padding positions
    (attention_mask == 0) are left out of the mean.
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the chunked distillation loss needs an nn.Linear LM head, got {type(head).__name__}")
    hidden_size = teacher_hidden.shape[-1]
    teacher_flat = teacher_hidden.detach().reshape(-1, hidden_size)
    exits_flat = [h.reshape(-1, hidden_size) for h in exit_hidden]
    if attention_mask is None:
        weights = torch.full((teacher_flat.shape[0],), 1.0 / teacher_flat.shape[0], device=teacher_flat.device)
    else:
        mask = attention_mask.reshape(-1).float()
        weights = mask / mask.sum().clamp_min(1.0)
    return _ChunkedDistillation.apply(head, teacher_flat, weights, chunk_tokens, temperature, *exits_flat)


def hidden_state_losses(
    teacher_hidden: torch.Tensor,
    exit_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return each exit's mean squared error against the teacher's hidden state, shape (num_exits,).

    The squared difference is averaged over the hidden dimension and then over tokens, leaving out
    padding positions (attention_mask == 0). Both states are the ones the shared LM head reads: after
    the exit norm and after the base's final norm. Computed in fp32, also under bf16 autocast.
    """
    teacher = teacher_hidden.detach().float()
    if attention_mask is None:
        weights = torch.full(teacher.shape[:-1], 1.0 / teacher.shape[:-1].numel(), device=teacher.device)
    else:
        mask = attention_mask.float()
        weights = mask / mask.sum().clamp_min(1.0)
    losses = []
    for hidden in exit_hidden:
        token_mse = (hidden.float() - teacher).pow(2).mean(dim=-1)  # (batch, sequence)
        losses.append((token_mse * weights).sum())
    return torch.stack(losses)


def naive_distillation_losses(
    head: nn.Module,
    teacher_hidden: torch.Tensor,
    exit_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Compute the same losses as `distillation_losses`, letting autograd hold every exit's full logits.

    This is the reference for tests and the memory benchmark; training uses the chunked version.
    """
    with torch.no_grad():
        teacher_logits = head(teacher_hidden)
    losses = []
    for hidden in exit_hidden:
        kl = token_kl(teacher_logits, head(hidden), temperature)  # (batch, sequence)
        if attention_mask is None:
            losses.append(kl.mean())
        else:
            mask = attention_mask.float()
            losses.append((kl * mask).sum() / mask.sum().clamp_min(1.0))
    return torch.stack(losses)
