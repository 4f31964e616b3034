"""Distillation from the FP32 model: the quantized student matches the teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch
    (Hinton et al. 2015; the ``T^2`` keeps gradient sizes independent of ``T``).

    Args:
        student_logits, teacher_logits: ``(batch, classes)``, or ``(..., classes)`` such as a
            causal LM's ``(batch, tokens, vocab)``: then averaged over every position, so the
            loss per token does not grow with the sequence length; the teacher is detached.
        temperature: softening temperature, > 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = temperature
    if student_logits.dim() > 2:  # one row per position
        student_logits, teacher_logits = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * (t * t)
