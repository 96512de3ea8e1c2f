"""GPTForSequenceClassification: a GPT body with a head on the last real token."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gptkern.models.config import GPTConfig
from gptkern.models.gpt import GPT, GPTBody, gpt2_init_
from gptkern.ops._checks import is_int


class GPTForSequenceClassification(nn.Module):
    """Sequence classification (or regression with ``num_labels=1``) on a :class:`GPTBody`.

    The hidden state of each sequence's last non-pad token goes through ``score``, a bias-free
    linear layer to ``num_labels``. Padding is found from ``attention_mask``, else from
    ``pad_token_id``; with neither, the last position is used.
    """

    def __init__(self, config: GPTConfig, num_labels: int, pad_token_id: Optional[int] = None):
        super().__init__()
        if not is_int(num_labels) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        self.config, self.num_labels, self.pad_token_id = config, int(num_labels), pad_token_id
        self.transformer = GPTBody(config)
        self.score = nn.Linear(config.n_embd, num_labels, bias=False)
        gpt2_init_(self, config.n_layer, config.init_std)

    @classmethod
    def from_gpt(cls, gpt: GPT, num_labels: int, pad_token_id: Optional[int] = None) -> "GPTForSequenceClassification":
        """A classifier whose body starts from a pretrained GPT's weights (copied), on the GPT's device
        and in its dtype; the head is new."""
        weight = next(gpt.parameters())
        model = cls(gpt.config, num_labels, pad_token_id).to(device=weight.device, dtype=weight.dtype)
        model.load_gpt_state_dict(gpt.state_dict())
        return model

    def load_gpt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the ``transformer.*`` weights of a GPT checkpoint (its ``lm_head`` is not used);
        a missing or unexpected body key raises an error listing them."""
        body = {k[len("transformer."):]: v for k, v in state_dict.items() if k.startswith("transformer.")}
        result = self.transformer.load_state_dict(body, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"GPT checkpoint does not match the classifier body: missing keys "
                             f"{sorted(result.missing_keys)}, unexpected keys {sorted(result.unexpected_keys)}")

    def last_token_index(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B,) position of each sequence's last real token (left or right padding)."""
        real = attention_mask.bool() if attention_mask is not None else (
            idx != self.pad_token_id if self.pad_token_id is not None else None)
        if real is None:
            return torch.full((idx.shape[0],), idx.shape[1] - 1, device=idx.device, dtype=torch.long)
        positions = torch.arange(idx.shape[1], device=idx.device)
        return (positions * real).argmax(-1)  # a sequence with no real token pools position 0

    def forward(self, idx: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx (B, L); labels (B,) class ids (or floats with num_labels=1). Returns
        (logits (B, num_labels), loss or None): cross-entropy, or mean squared error for one label."""
        hidden = self.transformer(idx, attention_mask)  # (B, L, C)
        last = self.last_token_index(idx, attention_mask)
        pooled = hidden[torch.arange(idx.shape[0], device=idx.device), last]  # (B, C)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.float().view(-1), labels.float().view(-1))  # labels (B,) or (B, 1)
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return logits, loss
