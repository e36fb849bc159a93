"""The handlers of the diffusers modules the converter supports, one registration per module type.

Supporting a new block is one :func:`~.registry.register_block` call here: its role, the activation call
sites it holds (with the layer each feeds and, where private, the layer it reads), the convolutions that
read the residual stream, and what it refuses. See :mod:`~spiking_diffusers.converter.registry`.
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU, GELU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D, FirDownsample2D
from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets import unet_2d_blocks as blocks
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.upsampling import FirUpsample2D, Upsample2D
from torch import nn

from .encoded_attention import AttentionCore, CrossAttentionCore
from .gated import GatedGELU, GateProduct, ProjectedGELU
from .registry import SiteSpec, UnsupportedModuleError, register_block


def channel_view(values: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` (one, or one per channel) shaped to broadcast against ``weight`` on ``dim``."""
    shape = [1] * weight.dim()
    shape[dim] = -1
    return values.reshape(shape) if values.numel() > 1 else values.reshape(())


# --- the root model -------------------------------------------------------------------------------------

OUTPUT_SITE = "conv_act"
"""The output activation: the unit in front of ``conv_out``, whose precision the first denoising steps need
(``output_precision``: docs/calibration.md, "The output activation")."""


def _unet_sites(unet: UNet2DModel | UNet2DConditionModel) -> list[SiteSpec]:
    if unet.conv_act is None:  # a conditional UNet built with norm_num_groups=None has no output norm
        return []
    return [SiteSpec(OUTPUT_SITE, "conv_act", "conv_out", "conv_norm_out", "spatial")]


def _conditional_unet_check(name: str, unet: UNet2DConditionModel) -> None:
    extras = {
        "addition_embed_type": unet.config.addition_embed_type,  # SDXL's text/time embeddings
        "encoder_hid_dim_type": unet.config.encoder_hid_dim_type,  # IP-adapter / image projections
        "time_embedding_act_fn": unet.config.time_embedding_act_fn,  # a second time-embedding activation
        "class_embeddings_concat": unet.config.class_embeddings_concat or None,
    }
    used = {key: value for key, value in extras.items() if value is not None}
    if used:
        raise UnsupportedModuleError(
            f"UNet2DConditionModel with {', '.join(f'{k}={v!r}' for k, v in used.items())} is not supported by the "
            "spiking converter (Stable Diffusion 1.x/2.x-style UNets, with or without class embeddings, are)."
        )


register_block(UNet2DModel, "model", sites=_unet_sites)
register_block(UNet2DConditionModel, "model", sites=_unet_sites, check=_conditional_unet_check)


# --- ResNet blocks and the time embedding ---------------------------------------------------------------


def _resnet_sites(block: ResnetBlock2D) -> list[SiteSpec]:
    # An up/down ResNet block resamples act1's output before conv1 reads it.
    resample = "upsample" if block.upsample is not None else "downsample" if block.downsample is not None else None
    sites = [SiteSpec("act1", "nonlinearity", "conv1", "norm1", "spatial", resample)]
    if block.time_emb_proj is not None and not block.skip_time_act:
        sites.append(SiteSpec("temb_act", "nonlinearity", "time_emb_proj", None, "temb"))
    # With "scale_shift" the time embedding modulates norm2's output, so act2's input is not norm2's alone.
    act2_source = "norm2" if block.time_embedding_norm == "default" else None
    sites.append(SiteSpec("act2", "nonlinearity", "conv2", act2_source, "spatial"))
    return sites


def _resnet_encoded_inputs(block: ResnetBlock2D) -> list[str]:
    return ["conv_shortcut"] if isinstance(block.conv_shortcut, nn.Conv2d) else []


register_block(ResnetBlock2D, "block", sites=_resnet_sites, encoded_inputs=_resnet_encoded_inputs)


def _timestep_embedding_sites(block: TimestepEmbedding) -> list[SiteSpec]:
    return [SiteSpec("act", "act", "linear_2", "linear_1", "temb")]


register_block(TimestepEmbedding, "block", sites=_timestep_embedding_sites)


# --- down, mid and up blocks of UNet2DModel -------------------------------------------------------------


def _skip_up_sites(block: nn.Module) -> list[SiteSpec]:
    if getattr(block, "act", None) is None:
        return []
    return [SiteSpec("act", "act", "skip_conv", "skip_norm", "spatial")]


for _block in (
    blocks.UNetMidBlock2D,
    blocks.DownBlock2D,
    blocks.ResnetDownsampleBlock2D,
    blocks.AttnDownBlock2D,
    blocks.SkipDownBlock2D,
    blocks.AttnSkipDownBlock2D,
    blocks.UpBlock2D,
    blocks.ResnetUpsampleBlock2D,
    blocks.AttnUpBlock2D,
):
    register_block(_block, "block")
register_block(blocks.SkipUpBlock2D, "block", sites=_skip_up_sites)
register_block(blocks.AttnSkipUpBlock2D, "block", sites=_skip_up_sites)


# --- the transformer blocks of UNet2DConditionModel (cross-attention) -----------------------------------


def _transformer_check(name: str, model: Transformer2DModel) -> None:
    if not model.is_input_continuous:
        raise UnsupportedModuleError(
            f"Transformer2DModel `{name}` takes patched or vectorized inputs; only continuous (feature-map) inputs "
            "are supported."
        )


def _transformer_block_check(name: str, block: BasicTransformerBlock) -> None:
    if block.norm_type != "layer_norm" or block.pos_embed is not None:
        raise UnsupportedModuleError(
            f"BasicTransformerBlock `{name}` uses norm_type={block.norm_type!r}"
            f"{' and positional embeddings' if block.pos_embed is not None else ''}; only plain LayerNorm blocks "
            "without positional embeddings are supported."
        )


for _block in (
    blocks.CrossAttnDownBlock2D,
    blocks.CrossAttnUpBlock2D,
    blocks.UNetMidBlock2DCrossAttn,
):
    register_block(_block, "block")
# The feed-forward's output layer reads GEGLU's gate product (real values); with residual spikes it gets an encoder.
register_block(FeedForward, "block", encoded_inputs=lambda ff: ["net.2"] if isinstance(ff.net[2], nn.Linear) else [])
register_block(
    Transformer2DModel, "block", check=_transformer_check, encoded_inputs=lambda model: ["proj_in", "proj_out"]
)
register_block(BasicTransformerBlock, "block", check=_transformer_block_check)


def _gated_sites(block: GatedGELU) -> list[SiteSpec]:
    # The gate feeds the product with the value half, not a weight layer: no consumer, so its width is given.
    return [SiteSpec("act", "act", None, None, "tokens", width=block.proj.out_features // 2)]


def _projected_sites(block: ProjectedGELU) -> list[SiteSpec]:
    # Its consumer, the feed-forward's output linear, lies outside this module; none is named.
    return [SiteSpec("act", "act", None, "proj", "tokens", width=block.proj.out_features)]


register_block(GEGLU, "block", replace=lambda geglu: GatedGELU(geglu.proj))
register_block(GELU, "block", replace=lambda gelu: ProjectedGELU(gelu.proj, gelu.approximate))
# Their input projection reads the block's LayerNorm output (real values): an encoder with residual spikes.
register_block(GatedGELU, "block", sites=_gated_sites, encoded_inputs=lambda block: ["proj"])
register_block(ProjectedGELU, "block", sites=_projected_sites, encoded_inputs=lambda block: ["proj"])


# --- resampling -----------------------------------------------------------------------------------------


def _downsample_encoded_inputs(block: Downsample2D) -> list[str]:
    return ["conv"] if isinstance(block.conv, nn.Conv2d) else []  # an AvgPool2d without use_conv


def _upsample_encoded_inputs(block: Upsample2D) -> list[str]:
    # The convolution after nearest interpolation; Upsample2D calls it `conv` or `Conv2d_0` by its `name`.
    if block.use_conv_transpose or not block.use_conv:
        return []
    return ["conv" if block.name == "conv" else "Conv2d_0"]


register_block(Downsample2D, "linear", encoded_inputs=_downsample_encoded_inputs)
register_block(Upsample2D, "linear", encoded_inputs=_upsample_encoded_inputs)
for _layer in (FirDownsample2D, FirUpsample2D):
    register_block(_layer, "linear")


# --- layers linear per sample (embeddings act on the analog timestep) ------------------------------------


def _linear_absorb(layer: nn.Linear, lam: torch.Tensor) -> bool:
    layer.weight.div_(channel_view(lam, layer.weight, 0))
    if layer.bias is not None:
        layer.bias.div_(lam.expand_as(layer.bias))
    return True


register_block(nn.Linear, "linear", absorb_threshold=_linear_absorb)
for _layer in (
    nn.Conv2d,
    nn.Dropout,
    nn.AvgPool2d,
    nn.Upsample,
    nn.Identity,
    nn.Embedding,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Sequential,
    Timesteps,
    GaussianFourierProjection,
):
    register_block(_layer, "linear")


# --- ops that are not linear in spikes: real-valued, compensated over time -------------------------------


def _group_norm_absorb(norm: nn.GroupNorm, lam: torch.Tensor) -> bool:
    if not norm.affine:
        return False
    norm.weight.div_(lam.expand(norm.num_channels))
    norm.bias.div_(lam.expand(norm.num_channels))
    return True


def _layer_norm_absorb(norm: nn.LayerNorm, lam: torch.Tensor) -> bool:
    if norm.weight is None or norm.bias is None:
        return False
    norm.weight.div_(lam.expand_as(norm.weight))
    norm.bias.div_(lam.expand_as(norm.bias))
    return True


def _attention_check(name: str, attn: Attention) -> None:
    if attn.spatial_norm is not None or attn.added_kv_proj_dim is not None:
        raise UnsupportedModuleError(
            f"Attention `{name}` uses a spatial norm or added key/value projections, which the converter does not "
            "support."
        )


register_block(nn.GroupNorm, "nonlinear", absorb_threshold=_group_norm_absorb)
register_block(nn.LayerNorm, "nonlinear", absorb_threshold=_layer_norm_absorb)
# Cross-attention's keys and values come from encoder_hidden_states, constant over simulation time: the
# compensated op sees them as they are, with the running mean of its spiking input as the query side.
register_block(Attention, "nonlinear", check=_attention_check)
register_block(AttentionCore, "nonlinear")
register_block(CrossAttentionCore, "nonlinear")
register_block(GateProduct, "nonlinear")


# --- activations: each call becomes a QCFS unit, then an IF neuron ---------------------------------------

for _activation in (nn.SiLU, nn.GELU, nn.Mish, nn.ReLU):
    register_block(_activation, "activation")
