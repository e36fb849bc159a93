"""``SpikingDiffusionPipeline``: image sampling with a spiking (or plain) UNet and any scheduler.

It differs from diffusers' ``DDPMPipeline`` in what a spiking UNet and the full range of schedulers need:

- ``init_noise_sigma`` and ``scale_model_input`` are applied, so Euler-type schedulers work;
- ``eta`` and ``generator`` reach ``scheduler.step`` only where its signature takes them;
- ``threshold_scale`` (threshold guidance) and ``snn_timesteps`` are set per call, and the previous
  thresholds are restored afterwards; ``snn_timesteps`` may be a T schedule, one T per denoising step
  (:mod:`~spiking_diffusers.pipelines.t_schedule`), and each UNet call gets its step's T;
- a list of generators, one per image, makes every image independent of how a run is split in batches;
- a sample that ends non-finite (NaN or Inf) raises :class:`~spiking_diffusers.errors.NonFiniteError`
  instead of becoming an image.

Each denoising step is one ``SpikingUNet2DModel.forward``, which begins a fresh simulation (every neuron
and compensated op is reset), so no spiking state leaks from one denoising step to the next.

A plain ``UNet2DModel`` or a ``QCFSUNet2DModel`` works too, so one pipeline compares ANN and SNN from the
same noise; they have no spiking thresholds or simulation time, and a ``threshold_scale`` other than 1 or
an ``snn_timesteps`` is rejected with a ``ValueError`` rather than silently ignored.

Conditional UNets: a class-conditional ``UNet2DModel`` takes ``class_labels``; a cross-attention
``UNet2DConditionModel`` (original, QCFS or spiking) takes ``encoder_hidden_states``, or ``class_labels``
when the pipeline holds :class:`~.label_tokens.LabelTokens` (one learned token per label and a null token),
and then ``guidance_scale`` (classifier-free guidance against the null token).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import ClassVar

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..converter.building import spatial_size
from ..converter.models import QCFSUNet2DModel, SpikingUNet2DModel
from ..errors import check_finite
from ..label_tokens import LabelTokens
from ..validation import check_int, renamed
from .schedulers import check_steps
from .t_schedule import TSchedule
from .threshold_guidance import ThresholdScale, is_identity, scaled_thresholds

OUTPUT_TYPES = ("pil", "np", "pt")


def step_accepts(scheduler: SchedulerMixin, argument: str) -> bool:
    """Whether ``scheduler.step`` takes ``argument`` (``"eta"``, ``"generator"``)."""
    return argument in inspect.signature(scheduler.step).parameters


class SpikingDiffusionPipeline(DiffusionPipeline):
    """Image generation with a ``SpikingUNet2DModel`` (or a ``UNet2DModel`` / QCFS model), unconditional or
    conditioned on class labels (through ``label_tokens`` for a cross-attention UNet).

    Save it with ``save_pretrained`` and load it back with ``SpikingDiffusionPipeline.from_pretrained`` or
    ``DiffusionPipeline.from_pretrained`` (once ``spiking_diffusers`` is imported).
    """

    model_cpu_offload_seq = "unet"
    _optional_components: ClassVar[list[str]] = ["label_tokens"]

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel | QCFSUNet2DModel | SpikingUNet2DModel,
        scheduler: SchedulerMixin,
        label_tokens: LabelTokens | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, label_tokens=label_tokens)

    @property
    def cross_attention(self) -> bool:
        """Whether the UNet is a cross-attention UNet (conditioned through ``encoder_hidden_states``)."""
        return self.unet.config.get("cross_attention_dim") is not None

    @property
    def is_spiking(self) -> bool:
        """Whether the UNet is a spiking network (which takes ``threshold_scale`` and ``snn_timesteps``)."""
        return isinstance(self.unet, SpikingUNet2DModel)

    def _check_arguments(
        self, output_type: str, threshold_scale: ThresholdScale | None, snn_timesteps, eta
    ) -> TSchedule | None:
        """Refuse bad arguments; returns ``snn_timesteps`` as a schedule (``None``: the model's own T)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}.")
        identity = is_identity(threshold_scale)  # raises on invalid values, whatever the UNet
        if not self.is_spiking:
            kind = type(self.unet).__name__
            if not identity:
                raise ValueError(f"threshold_scale applies to spiking UNets only; this pipeline holds a {kind}.")
            if snn_timesteps is not None:
                raise ValueError(f"snn_timesteps applies to spiking UNets only; this pipeline holds a {kind}.")
        schedule = None if snn_timesteps is None else TSchedule.coerce(snn_timesteps, "spike_steps")
        if eta != 0 and not step_accepts(self.scheduler, "eta"):
            raise ValueError(f"eta applies to DDIM-type schedulers; {type(self.scheduler).__name__} has no eta.")
        return schedule

    def _check_batch(self, batch_size, generator, num_inference_steps, latents) -> int:
        """The number of images to make, with ``batch_size``, the generators, the steps and ``latents`` checked
        against each other; ``TypeError`` / ``ValueError`` naming the argument otherwise."""
        check_steps(self.scheduler, num_inference_steps)
        if latents is None:
            batch = check_int(batch_size, "batch_size", "num_images")
        else:
            expected = self._image_shape(1)[1:]
            if not torch.is_tensor(latents) or latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
                shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(
                    f"latents must be a tensor of shape (batch, {', '.join(map(str, expected))}), got {shape}."
                )
            batch = latents.shape[0]
        if isinstance(generator, list | tuple):
            if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(
                    f"generator must be one torch.Generator or a list of one per image ({batch}), got a list of "
                    f"{len(generator)}."
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}.")
        return batch

    def _conditioning(
        self, batch: int, class_labels, encoder_hidden_states, guidance_scale: float
    ) -> tuple[dict, dict]:
        """The UNet's conditional keyword arguments and, for classifier-free guidance (``guidance_scale`` != 1),
        its unconditional ones (else empty); a ``ValueError`` naming the argument for what the UNet cannot take."""
        if not isinstance(guidance_scale, int | float) or isinstance(guidance_scale, bool) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}.")
        guided = guidance_scale != 1
        device = self._execution_device
        if class_labels is not None:
            if not torch.is_tensor(class_labels) or class_labels.shape[:1] != (batch,):
                raise ValueError(
                    f"class_labels must be a tensor with one label per image ({batch}), got {class_labels!r}."
                )
            class_labels = class_labels.to(device)
        if not self.cross_attention:
            if encoder_hidden_states is not None:
                raise ValueError(
                    f"encoder_hidden_states applies to cross-attention UNets; this is a {type(self.unet).__name__}."
                )
            if guided:
                raise ValueError(
                    "guidance_scale (classifier-free guidance) needs a cross-attention UNet with label_tokens; this "
                    f"pipeline holds a {type(self.unet).__name__}. Leave guidance_scale at 1."
                )
            return {"class_labels": class_labels}, {}
        if encoder_hidden_states is None:
            if class_labels is None or self.label_tokens is None:
                raise ValueError(
                    "This UNet is conditional (cross-attention): pass encoder_hidden_states, or class_labels with a "
                    "pipeline that holds label_tokens."
                )
            encoder_hidden_states = self.label_tokens(class_labels)
            class_labels = None
        encoder_hidden_states = encoder_hidden_states.to(device, self.unet.dtype)
        conditional = {"encoder_hidden_states": encoder_hidden_states, "class_labels": class_labels}
        if not guided:
            return conditional, {}
        if self.label_tokens is None:
            raise ValueError(
                "guidance_scale needs the pipeline's label_tokens (its null token is the unconditional input)."
            )
        null = self.label_tokens.unconditional(batch).to(device, self.unet.dtype)
        return conditional, {"encoder_hidden_states": null, "class_labels": class_labels}

    def _predict(self, model_input, t, kwargs: dict, conditional: dict, unconditional: dict, guidance_scale: float):
        """The noise prediction, with classifier-free guidance when ``unconditional`` is given (one UNet call on
        the doubled batch, as diffusers' pipelines do)."""
        if not unconditional:
            return self.unet(model_input, t, **conditional, **kwargs).sample
        doubled = {
            key: None if value is None else torch.cat([unconditional[key], value]) for key, value in conditional.items()
        }
        uncond, cond = self.unet(torch.cat([model_input] * 2), t, **doubled, **kwargs).sample.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _image_shape(self, batch_size: int) -> tuple[int, ...]:
        config = self.unet.config
        return (batch_size, config.in_channels, *spatial_size(config.sample_size))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        threshold_scale: ThresholdScale | None = None,
        spike_steps: int | str | list[int] | TSchedule | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        snn_timesteps: int | str | list[int] | TSchedule | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        """Sample ``batch_size`` images.

        Args:
            batch_size: number of images (ignored when ``latents`` are given).
            generator: one generator, or a list with one per image (results then do not depend on how
                the images are split into batches).
            num_inference_steps: denoising steps of the scheduler.
            output_type: ``"pil"`` (list of images), ``"np"`` (NHWC array in [0, 1]) or ``"pt"`` (NCHW tensor
                in [0, 1]).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            threshold_scale: threshold guidance for this call: a float for every neuron or a dict per block
                group (``{"down": 0.99, "mid": 1.0, "up": 0.995}``; see ``threshold_guidance``).
                ``None`` keeps the model's current factors.
            spike_steps: simulation steps T per UNet call (default: the model's configured T): an int for
                every denoising step, a list with one int per denoising step, or a T schedule, a
                :class:`~spiking_diffusers.pipelines.TSchedule` or its text form (``"4,16x3"``: T = 16 for the
                last 3 steps, 4 for the others). A schedule that does not fit ``num_inference_steps`` is a
                ``ValueError`` naming the accepted form.
            eta: DDIM-type stochasticity; an error for schedulers whose ``step`` has no ``eta``.
            latents: initial noise of shape ``(B, C, H, W)`` (unscaled; ``init_noise_sigma`` is applied).
            class_labels: one label per image, for class-conditional UNets, or for a cross-attention UNet with
                ``label_tokens`` (which turn them into its ``encoder_hidden_states``).
            snn_timesteps: the deprecated name of ``spike_steps``.
            encoder_hidden_states: ``(batch, tokens, cross_attention_dim)`` conditioning of a cross-attention UNet.
            guidance_scale: classifier-free guidance (1: none), against the null token of ``label_tokens``.
        """
        snn_timesteps = renamed(spike_steps, snn_timesteps, "spike_steps", "snn_timesteps")
        schedule = self._check_arguments(output_type, threshold_scale, snn_timesteps, eta)
        batch = self._check_batch(batch_size, generator, num_inference_steps, latents)
        conditional, unconditional = self._conditioning(batch, class_labels, encoder_hidden_states, guidance_scale)
        if schedule is not None:
            schedule.per_step(num_inference_steps)  # a schedule that does not fit the steps fails before any work
        device = self._execution_device
        dtype = self.unet.dtype
        if latents is None:
            latents = randn_tensor(self._image_shape(batch_size), generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma

        step_kwargs = {}
        if step_accepts(self.scheduler, "eta"):
            step_kwargs["eta"] = eta
        if step_accepts(self.scheduler, "generator"):
            step_kwargs["generator"] = generator
        unet_kwargs = {}

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if schedule is None:  # the model's own T (or a plain UNet, which takes no T)
            per_call = [snn_timesteps] * len(timesteps)
        else:
            per_call = schedule.per_call(timesteps.tolist(), num_inference_steps)
        guidance = scaled_thresholds(self.unet, threshold_scale) if self.is_spiking else contextlib.nullcontext()
        with guidance:
            for t, steps in zip(self.progress_bar(timesteps), per_call, strict=True):
                if self.is_spiking:
                    unet_kwargs["spike_steps"] = steps
                model_input = self.scheduler.scale_model_input(latents, t)
                noise_pred = self._predict(model_input, t, unet_kwargs, conditional, unconditional, guidance_scale)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        # Before the clamp, which would turn Inf into plausible-looking white or black pixels.
        check_finite(
            latents,
            f"The sample after {num_inference_steps} denoising steps",
            "the model's noise prediction overflows; check its weights (and, for a spiking model, T and the "
            "threshold scale).",
        )
        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` find this class by the name in ``model_index.json``.

    diffusers looks the pipeline class of a saved pipeline up in its own namespace only (the components
    are found through the library named in ``model_index.json``); registering the class there lets the
    generic loader return a ``SpikingDiffusionPipeline`` in any process that imported ``spiking_diffusers``.
    """
    setattr(diffusers, SpikingDiffusionPipeline.__name__, SpikingDiffusionPipeline)


register_with_diffusers()
