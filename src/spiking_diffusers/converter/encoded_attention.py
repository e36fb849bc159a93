"""Attention whose projections are fed spikes, for residual spikes.

By default an ``Attention`` module runs as one compensated op on the running mean of its input, so its
four projections (``to_q``, ``to_k``, ``to_v``, ``to_out``) multiply real-valued means at every time step.
Encoding the module's input would not change that. What does is splitting it at its linear layers:

    x -> GroupNorm -> encoder -> to_q, to_k, to_v -> AttentionCore -> encoder -> to_out -> + x

The projections are linear, so they can read each step's spikes and still add up to the projection of
the mean; only the GroupNorm and the core ``softmax(q k^T / sqrt(d)) v`` are not linear, and those run
compensated (each as its own ``TemporalOp``; the core on the running means of q, k and v, packed into one
tensor). The encoders read token-major ``(B, N, C)`` tensors (``channels_last``). In the QCFS network
the same processor runs with signed QCFS encoders; with ``as_ann()`` it computes diffusers'
``AttnProcessor2_0`` (to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .encoders import SignedQCFS


class AttentionCore(nn.Module):
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` on ``q, k, v`` packed along the last dim: ``(B, N, 3 * D)``
    in, ``(B, N, D)`` out. One tensor in, so that a ``TemporalOp`` compensates all three together."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, inner = qkv.shape[0], qkv.shape[-1] // 3
        query, key, value = (
            part.reshape(batch, -1, self.heads, inner // self.heads).transpose(1, 2) for part in qkv.chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, inner)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class CrossAttentionCore(nn.Module):
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` with keys and values of their own length (cross-attention):
    ``q`` ``(B, N, D)``, ``k`` and ``v`` ``(B, M, D)``. The spiking network compensates it on the running mean
    of ``q``; ``k`` and ``v`` come from ``encoder_hidden_states``, constant over simulation time."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, inner = query.shape[0], query.shape[-1]
        query, key, value = (
            part.reshape(batch, -1, self.heads, inner // self.heads).transpose(1, 2) for part in (query, key, value)
        )
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, inner)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class EncodedAttnProcessor:
    """The attention processor of an encoded ``Attention``: self-attention on 4-d feature maps (the
    unconditional UNets' attention blocks), and self- or cross-attention on token-major ``(B, N, C)`` inputs
    (a transformer block's ``attn1`` / ``attn2``; a cross-attention's keys and values read
    ``encoder_hidden_states`` as they are: constant over simulation time, not spikes)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.norm_cross is not None:
            raise ValueError("Spike-encoded attention supports attention without a mask or a cross norm only.")
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden = hidden_states.view(batch, channels, height * width)
            if attn.group_norm is not None:
                hidden = attn.group_norm(hidden)
            hidden = hidden.transpose(1, 2)
        else:
            hidden = hidden_states
        spikes = attn.input_encoder(hidden)
        if attn.is_cross_attention:
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden  # diffusers' rule: without a context it attends to itself
            context = encoder_hidden_states.to(spikes.dtype)
            core = attn.core(attn.to_q(spikes), attn.to_k(context), attn.to_v(context))
        else:
            if encoder_hidden_states is not None:
                raise ValueError("This self-attention got encoder_hidden_states.")
            core = attn.core(torch.cat([attn.to_q(spikes), attn.to_k(spikes), attn.to_v(spikes)], dim=-1))
        out = attn.to_out[1](attn.to_out[0](attn.output_encoder(core)))
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def encode_attention(attn: Attention, levels: int, phi: float, per_channel: bool) -> None:
    """Give ``attn`` signed QCFS encoders before its projections of real values (``to_q/to_k/to_v``; for
    cross-attention ``to_q`` only) and before ``to_out``, and the split processor."""
    attn.input_encoder = SignedQCFS(attn.to_q.in_features, levels, phi, per_channel, channels_last=True)
    attn.output_encoder = SignedQCFS(attn.to_out[0].in_features, levels, phi, per_channel, channels_last=True)
    attn.core = CrossAttentionCore(attn.heads) if attn.is_cross_attention else AttentionCore(attn.heads)
    attn.set_processor(EncodedAttnProcessor())


def is_encoded(module: nn.Module) -> bool:
    """Whether ``module`` is an ``Attention`` split at its projections by :func:`encode_attention`."""
    return isinstance(module, Attention) and isinstance(module.processor, EncodedAttnProcessor)


@torch.no_grad()
def fold_attention_thresholds(attn: Attention) -> None:
    """The unit-threshold form for an encoded attention's (neuron) encoders: lambda into the input columns
    of the projections each feeds, 1 / lambda into its input gain, threshold 1."""
    readers = (attn.to_q,) if attn.is_cross_attention else (attn.to_q, attn.to_k, attn.to_v)
    for encoder, layers in (
        (attn.input_encoder, readers),
        (attn.output_encoder, (attn.to_out[0],)),
    ):
        lam = encoder.threshold.detach().clone()
        for layer in layers:
            layer.weight.mul_(lam if lam.numel() > 1 else lam.reshape(()))
        encoder.input_gain.div_(lam)
        encoder.threshold.fill_(1.0)
