"""The distillation losses: pure tensor functions, no state.

Conventions (shared by every function here): logits are [B, T, V], hidden
states [B, T, D], `mask` is [B, T] with 1 for real tokens. Softmaxes run in
fp32 whatever the model dtype. Each term is a mean over unmasked tokens, so
padding never changes a loss, and a batch with no unmasked token gives 0.
Nothing here reads a configuration or talks to other processes: the weights
come as a `LossWeights`, and a normaliser that must cover the whole global
batch is reduced by the `reduce` function the caller passes (step.py passes
the average over processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..tasks.stats import slices


@dataclass(frozen=True)
class LossWeights:
    """The paper's loss weights and the MSE's scale (config.HealConfig's fields of the same names)."""

    w_kl: float = 1.0
    w_mse: float = 1.0
    w_final: float = 1.0
    mse_scale: str = "channel"

    @classmethod
    def of(cls, config) -> "LossWeights":
        return cls(config.w_kl, config.w_mse, config.w_final, config.mse_scale)


def _unreduced(statistic: torch.Tensor) -> torch.Tensor:
    return statistic


def _masked_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) per token over the full vocabulary, times t^2 (Hinton's scaling,
    so gradients keep their size across temperatures; at t = 1 it is the plain KL)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return _masked_token_mean(per_token, mask) * temperature ** 2


def head_kl_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, student_head: torch.nn.Module,
                 teacher_head: torch.nn.Module, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`kl_loss` from the states entering the two LM heads (plain linear ones), never holding more
    than a slice of logits (tasks.stats.slices, 16 MiB): each slice's logits, softmaxes and
    gradient are made and dropped in turn, and backward only scales the gradients kept. A whole
    micro-batch's logits, their two log-softmaxes and their gradient are each [B, T, V] (SmolLM2:
    100 MB a tensor; Gemma-3: 540 MB); here the largest temporaries are [slice, V]. The same
    products through the head as autograd's, so no more arithmetic."""
    bias, teacher_bias = getattr(student_head, "bias", None), getattr(teacher_head, "bias", None)
    return _HeadKL.apply(student_h, teacher_h.detach(), student_head.weight, bias, teacher_head.weight.detach(),
                         None if teacher_bias is None else teacher_bias.detach(), mask, temperature)


# Logits per slice of `head_kl_loss`: 32 MiB (SmolLM2: 170 tokens). Its fewer, larger products through
# the head outweigh the slices' falling out of cache: a healing micro-batch's KL took 0.77 s against
# 0.88 s at the evaluation's 16 MiB (bench/bench_head_kl.py, 2026-12-05).
HEAD_KL_ELEMENTS = 1 << 23


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, -1)


class _HeadKL(torch.autograd.Function):
    """KL(p_teacher || p_student) * t^2, masked mean over tokens, with its gradients for the
    student's head input, weight and bias computed slice by slice in the forward pass."""

    @staticmethod
    def forward(ctx, h, teacher_h, weight, bias, teacher_weight, teacher_bias, mask, temperature):
        rows, teacher_rows = h.reshape(-1, h.shape[-1]), teacher_h.reshape(-1, h.shape[-1])
        keep = mask.reshape(-1).to(torch.float32)
        count = keep.sum().clamp_min(1.0)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        want_b = bias is not None and ctx.needs_input_grad[3]
        grad_h = torch.zeros(rows.shape, dtype=torch.float32, device=h.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if want_b else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        with torch.autocast(h.device.type, enabled=False):   # float32 logits and softmaxes, as kl_loss
            for part in slices(rows.shape[0], weight.shape[0], HEAD_KL_ELEMENTS):
                x = rows[part].to(weight.dtype)
                student = _log_softmax(F.linear(x, weight, bias), temperature)
                teacher = _log_softmax(F.linear(teacher_rows[part].to(teacher_weight.dtype), teacher_weight,
                                                teacher_bias), temperature)
                p_teacher = teacher.exp()
                # in place from here: each [slice, V] temporary is made once (SmolLM2: 33 MB)
                total += (teacher.sub_(student).mul_(p_teacher).sum(-1) * keep[part]).sum()
                del teacher
                if want_h or want_w or want_b:
                    # d(loss)/d(logits) at a kept token: (p_student - p_teacher) * t / count
                    grad = student.exp_().sub_(p_teacher).mul_((keep[part] * (temperature / count)).unsqueeze(-1))
                    if want_h:
                        grad_h[part] = grad @ weight.float()
                    if want_w:
                        grad_w += grad.t() @ x.float()
                    if want_b:
                        grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.shape, ctx.dtypes = h.shape, (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (total / count).to(torch.float32) * temperature ** 2

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_out).reshape(ctx.shape).to(h_dtype), None,
                None if grad_w is None else (grad_w * grad_out).to(w_dtype),
                None if grad_b is None else (grad_b * grad_out).to(b_dtype), None, None, None, None)


def topk_kl_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 teacher_logsumexp: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) from a teacher stored as its top-k logits [B, T, k] (indices
    alike) and its full-vocabulary log-sum-exp [B, T]; the tail beyond top-k is dropped, so this
    equals `kl_loss` exactly when k is the vocabulary size."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices)
    if temperature == 1.0:
        teacher = teacher_values.float() - teacher_logsumexp.float().unsqueeze(-1)
    else:  # the stored log-sum-exp is at t = 1; renormalise over the top-k at this temperature
        teacher = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return _masked_token_mean(per_token, mask) * temperature ** 2


def mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
             scale: str = "raw", reduce: Callable[[torch.Tensor], torch.Tensor] = _unreduced) -> torch.Tensor:
    """Mean squared error over hidden dimensions, averaged over unmasked tokens.

    - raw: as it is; its size depends on the model's hidden-state scale (SmolLM2's is 2-3 where
      its KL is 0.1).
    - relative: divided by the teacher state's mean square over the same tokens, so a student that
      outputs zeros scores 1, whatever the model. A few massive-activation channels (hundreds of
      times the rest, as Qwen, Gemma and Llama models carry) still dominate both sides.
    - channel: each channel's error divided by that channel's own mean square, then averaged over
      channels, so every channel counts alike and a student that outputs zeros again scores 1.

    `reduce` turns this batch's teacher power into the global batch's (relative and channel)."""
    teacher = teacher_hidden.float()
    squared = (student_hidden.float() - teacher).pow(2)
    if scale == "channel":
        weights = mask.to(torch.float32).unsqueeze(-1)
        count = weights.sum().clamp_min(1.0)
        error = (squared * weights).sum((0, 1)) / count
        power = reduce((teacher.pow(2) * weights).sum((0, 1)) / count)
        # a channel the teacher leaves near zero is measured against a thousandth of the median
        # channel's power (the median: massive channels would lift a mean far above the rest)
        return (error / torch.maximum(power, 1e-3 * power.median() + 1e-12)).mean()
    error = _masked_token_mean(squared.mean(-1), mask)
    if scale == "raw":
        return error
    return error / reduce(_masked_token_mean(teacher.pow(2).mean(-1), mask)).clamp_min(1e-12)


def joint_loss(kl: torch.Tensor, student_hidden: list, teacher_hidden: list, student_final, teacher_final, mask,
               weights: LossWeights, reduce: Callable[[torch.Tensor], torch.Tensor] = _unreduced
               ) -> dict[str, torch.Tensor]:
    """The paper's loss: w_kl * KL + w_mse * sum of mapped-layer MSEs + w_final * final-state MSE,
    with the weights and the MSE's scale (`mse_scale`) of `weights`; `reduce` as in `mse_loss`.

    `kl` comes from `kl_loss` (teacher logits at hand) or `topk_kl_loss` (teacher cached);
    `student_hidden[j]` is compared with `teacher_hidden[j]` (the caller maps layers).
    Returns every term and their weighted sum under "loss"."""
    zero = kl.new_zeros(())
    scale = weights.mse_scale
    mse = sum((mse_loss(s, t, mask, scale, reduce) for s, t in zip(student_hidden, teacher_hidden)), zero)
    final = mse_loss(student_final, teacher_final, mask, scale, reduce) if weights.w_final else zero
    loss = weights.w_kl * kl + weights.w_mse * mse + weights.w_final * final
    return {"loss": loss, "kl": kl, "mse": mse, "final_mse": final}
