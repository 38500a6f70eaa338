"""Next-token log-probabilities from final hidden states, the LM head run on a bounded number of positions at a time.

This module imports only torch: on NDIF the functions run inside the trace on the server, shipped by value with it
(`models.remote_model` registers this module), so memory never holds a [batch, seq, vocab] tensor there or here.
"""
from __future__ import annotations

import torch

from .architectures import lm_head

LOGIT_CHUNK = 256
"""Positions whose full-vocabulary logits exist at once when scoring tokens: ≈ 50 MB for SmolLM2's 49k vocabulary and
260 MB for Gemma-2's 256k, however many rows and positions a batch holds."""


def vocab_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token log-probabilities [N, vocab] from final-norm hidden states [N, d]: the LM head, then the final
    logit soft-cap of models that have one (Gemma-2), then log-softmax. Works inside a trace and on a plain HF model;
    callers pass at most `LOGIT_CHUNK` rows at a time."""
    logits = lm_head(model)(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(-1)


def scored_token_logprob(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """log p(target) at each row of the final-norm hidden states `hidden` [N, d], `chunk` positions at a time, so that
    no [N, vocab] tensor is ever built."""
    return torch.cat([vocab_logprobs(model, hidden[start:start + chunk]).gather(-1, targets[start:start + chunk, None])[:, 0]
                      for start in range(0, hidden.shape[0], chunk)])


def coarse_kl(model, hidden: torch.Tensor, teacher_idx: torch.Tensor, teacher_logp: torch.Tensor,
              chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """KL(teacher ‖ model) at each row of the final-norm hidden states `hidden` [N, d], the teacher given by its top
    tokens `teacher_idx` [N, K] and their log-probabilities `teacher_logp` [N, K]: both distributions are coarsened
    to those K tokens plus one bucket for the rest of the vocabulary (a lower bound on the full KL, tight when the
    teacher's mass sits in its top K), `chunk` positions at a time."""
    return torch.cat([_chunk_kl(vocab_logprobs(model, hidden[start:start + chunk]), teacher_idx[start:start + chunk],
                                teacher_logp[start:start + chunk]) for start in range(0, hidden.shape[0], chunk)])


def coarse_kl_and_logprob(model, hidden: torch.Tensor, teacher_idx: torch.Tensor, teacher_logp: torch.Tensor,
                          targets: torch.Tensor, chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`coarse_kl` and `scored_token_logprob` of `targets` at each row, from one LM-head pass: the same numbers as the
    two functions give apart, at the cost of one."""
    kl, logprob = [], []
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logp = vocab_logprobs(model, hidden[rows])
        kl.append(_chunk_kl(logp, teacher_idx[rows], teacher_logp[rows]))
        logprob.append(logp.gather(-1, targets[rows, None])[:, 0])
    return torch.cat(kl), torch.cat(logprob)


def _chunk_kl(logp: torch.Tensor, teacher_idx: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Coarse KL(teacher ‖ model) per row from the model's full log-probabilities `logp` [n, vocab]."""
    student = logp.gather(-1, teacher_idx)
    rest_teacher = (1 - teacher_logp.exp().sum(-1)).clamp_min(1e-12)
    rest_student = (1 - student.exp().sum(-1)).clamp_min(1e-12)
    return ((teacher_logp.exp() * (teacher_logp - student)).sum(-1)
            + rest_teacher * (rest_teacher.log() - rest_student.log()))
