"""Log-probabilities of answer tokens without the full-vocabulary logits.

A causal LM's forward returns logits for every position: rows x length x vocabulary values (4 rows of
1,000 tokens over Qwen's 152k vocabulary: 608M values, 1.2 GB in bf16), which a preference loss then
reduces to one number per row, and its backward needs as much again. Here the model's backbone (the
model without its LM head) gives the last hidden states; the LM head is applied to the answer positions
only, a chunk of tokens at a time, and each chunk is recomputed in the backward pass (activation
checkpointing), so at most one chunk's logits exist at any time. The same idea as Liger's fused linear
DPO loss, in plain torch (CPU and GPU).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

LOGITS_PER_CHUNK = 2**23  # values in one chunk's logits: 32 MiB in fp32
# Config attributes of models whose logits are not just the LM head's output (soft-capped or scaled).
LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def logit_modifiers(config) -> list[str]:
    """The attributes of ``config`` (or its text config) that change the logits after the LM head."""
    configs = [config, getattr(config, "text_config", None)]
    return [name for name in LOGIT_MODIFIERS for item in configs if getattr(item, name, None) not in (None, 1, 1.0)]


def chunk_tokens(vocab_size: int) -> int:
    """Answer tokens per chunk: LOGITS_PER_CHUNK logits (170 tokens for a 49k vocabulary, 55 for 152k)."""
    return max(16, LOGITS_PER_CHUNK // vocab_size)


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A causal LM's backbone (its ``base_model``: the decoder that gives the last hidden states) and its LM
    head; through a PEFT wrapper, the adapted modules (use_adapter / disable_adapter still switch them)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model, causal_lm.get_output_embeddings()


def answer_logps(backbone, head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 answer_mask: torch.Tensor) -> torch.Tensor:
    """For each row, the sum of log p(token | the tokens before it) over the tokens where ``answer_mask``
    is 1 (float32, one value per row), from ``backbone_and_head(model)``. Call it under the autocast the
    model trains in (the backbone and head are called directly, not through the model's forward)."""
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1]  # position i predicts token i + 1
    rows, columns = answer_mask[:, 1:].nonzero(as_tuple=True)
    hidden, targets = hidden[rows, columns], input_ids[:, 1:][rows, columns]
    size = chunk_tokens(head.weight.shape[0])
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    pieces = [checkpoint(_token_logps, head, hidden[start:start + size], targets[start:start + size],
                         use_reentrant=False) if recompute else
              _token_logps(head, hidden[start:start + size], targets[start:start + size])
              for start in range(0, len(targets), size)]
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return token_logps.new_zeros(len(input_ids)).index_add(0, rows, token_logps)
