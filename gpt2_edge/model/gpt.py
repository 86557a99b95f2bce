"""Reference GPT-2 in PyTorch, read top to bottom in forward order.

Module names equal the Hugging Face GPT-2 keys (``transformer.h.{i}.attn.c_attn``...), so a
checkpoint loads key for key. ``forward`` speaks the ONNX contract directly: it takes
``input_ids, attention_mask, position_ids, past_key_values`` and returns logits plus the
present key/value of every layer as ``[batch, n_head, total_len, head_size]`` tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Gpt2EdgeError
from .config import GPTConfig

KV = tuple[torch.Tensor, torch.Tensor]
# Score of a masked key. Finite, so a fully masked row (a pad query) softmaxes to uniform rather
# than NaN; and fp16's lowest value, so an fp16 export still holds it (fp32's finfo.min becomes
# -inf in fp16, and the NaN rows it makes leak into real rows through 0 * NaN in att @ v).
MASK_VALUE = -65504.0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past[1], v], dim=2)  # (B, nh, P+T, hs)
        if mask is None:
            # Training / plain full sequences: the fused kernel with its own causal mask.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.attn_dropout.p if self.training else 0.0
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))  # (B, nh, T, P+T)
            att = att.masked_fill(~mask, MASK_VALUE)
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation ("gelu_new"), not the erf GELU.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), mask, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Position ids of the last ``seq_len`` tokens: each real token counts the real ones before it.

    Left padding then gives real tokens the positions they would have unpadded (pads get 0).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, -seq_len:]


class GPT(nn.Module):
    """GPT-2 language model with the LM head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list[KV] | tuple[KV, ...] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits ``(B, T, vocab)`` and the present ``(key, value)`` of every layer.

        ``attention_mask`` covers past + new tokens ``(B, P+T)`` (1 = real, 0 = pad).
        Without ``position_ids`` they are derived from the mask (or run P..P+T-1).
        """
        B, T = input_ids.shape
        P = 0 if not past_key_values else past_key_values[0][0].shape[2]
        if P + T > self.config.n_positions:
            raise Gpt2EdgeError(f"{P + T} tokens exceed the model's context of {self.config.n_positions}")
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(P, P + T, device=device).unsqueeze(0).expand(B, T)

        mask = None
        if attention_mask is not None or P > 0:
            # query i (absolute P+i) sees key j when j <= P+i and key j is not padding
            q_pos = torch.arange(T, device=device).unsqueeze(1) + P  # (T, 1)
            k_pos = torch.arange(P + T, device=device).unsqueeze(0)  # (1, P+T)
            mask = (k_pos <= q_pos).view(1, 1, T, P + T)  # (1, 1, T, P+T)
            if attention_mask is not None:
                mask = mask & attention_mask.bool().view(B, 1, 1, P + T)  # (B, 1, T, P+T)

        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        presents: list[KV] = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, mask, None if not past_key_values else past_key_values[i])
            presents.append(present)
        x = self.transformer.ln_f(x)
        logits = F.linear(x, self.transformer.wte.weight)  # tied LM head
        return logits, presents
