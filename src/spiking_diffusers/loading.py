"""Finding and loading models the way users point at them: a hub id, a local directory, or nothing.

Two layouts are met in practice: a saved pipeline (``model_index.json`` with ``unet/`` and ``scheduler/``)
and the google/ddpm-* repositories (the UNet's ``config.json`` and weights at the root, beside
``scheduler_config.json``). Both load here, for an original ``UNet2DModel`` and for this package's QCFS and
spiking models. Every expected mistake raises :class:`ModelLoadError` with one line that says what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, SchedulerMixin, UNet2DModel

from .converter.models import QCFSUNet2DModel, SpikingUNet2DModel
from .errors import SdmError

UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, QCFSUNet2DModel, SpikingUNet2DModel)}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ModelLoadError(SdmError, ValueError):
    """The model argument does not lead to a loadable model; the message says why and what to do.

    ``exit_code`` is 2 for a usage mistake (wrong path, not a model, unsupported architecture) and 1 for a
    runtime failure (damaged or non-finite weights, hub unreachable).
    """

    exit_code = 2


@dataclass
class LoadedModel:
    """A UNet (original, QCFS or spiking), its scheduler, and where they came from."""

    unet: UNet2DModel | QCFSUNet2DModel | SpikingUNet2DModel
    scheduler: SchedulerMixin
    source: str

    @property
    def kind(self) -> str:
        """``"ann"``, ``"qcfs"`` or ``"snn"``."""
        if isinstance(self.unet, SpikingUNet2DModel):
            return "snn"
        return "qcfs" if isinstance(self.unet, QCFSUNet2DModel) else "ann"


def shipped_model_path() -> str:
    """The small digits DDPM that ships inside the package (the default of every command)."""
    from .digits import SHIPPED_MODEL_PATH

    return SHIPPED_MODEL_PATH


def resolve_model_dir(model: str | None) -> Path:
    """A local directory for ``model``: the shipped model for ``None``, the path itself, or a hub download."""
    if model is None:
        return Path(shipped_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{model} is a file; pass the model's directory (with config.json or model_index.json)."
            )
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(
            f"No such directory: {model}. Pass a local model directory or a hub id like google/ddpm-cifar10-32."
        )
    return _download(model)


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*/*.json", "*/*.safetensors", "*/*.bin"],
                local_files_only=_offline(),
            )
        )
    except LocalEntryNotFoundError as err:
        raise ModelLoadError(
            f"{repo_id} is not in the local cache and the hub cannot be reached (offline?); download it once "
            "with network access or pass a local directory.",
            exit_code=1,
        ) from err
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise ModelLoadError(f"{repo_id} is not a model on the hub and not a local directory.") from err
    except OSError as err:
        raise ModelLoadError(
            f"Could not fetch {repo_id} from the hub: {err}. Pass a local directory instead.", 1
        ) from err


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); the model directory is damaged.") from err


def _unet_dir(root: Path) -> Path:
    if (root / "model_index.json").is_file():
        if not (root / "unet" / "config.json").is_file():
            raise ModelLoadError(f"{root} has model_index.json but no unet/config.json; it is not a UNet pipeline.")
        return root / "unet"
    if (root / "config.json").is_file():
        return root
    raise ModelLoadError(
        f"{root} is not a diffusers model: expected model_index.json (a saved pipeline) or config.json (a UNet)."
    )


def _scheduler(root: Path, unet_dir: Path) -> SchedulerMixin:
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            config = _read_json(candidate)
            from diffusers import schedulers

            cls = getattr(schedulers, config.get("_class_name", "DDPMScheduler"), DDPMScheduler)
            return cls.from_config(config)
    train_steps = _read_json(unet_dir / "config.json").get("num_train_timesteps") or 1000
    return DDPMScheduler(num_train_timesteps=train_steps)


def load_model(model: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the UNet (ANN, QCFS or SNN) and its scheduler from a hub id, a directory, or the shipped model."""
    root = resolve_model_dir(model)
    unet_dir = _unet_dir(root)
    config = _read_json(unet_dir / "config.json")
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name not in UNET_CLASSES:
        raise ModelLoadError(
            f"{root} holds a {class_name}; only unconditional UNet2DModel diffusion models (and this package's "
            "QCFS / spiking versions of them) are supported."
        )
    if not any((unet_dir / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{unet_dir} has no weights ({' or '.join(WEIGHT_FILES)}).")
    try:
        unet = UNET_CLASSES[class_name].from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(
            f"Could not load the weights in {unet_dir}: {_root_cause(err)[:300]}. The file is truncated or "
            "damaged: download or save the model again.",
            exit_code=1,
        ) from err
    _check_finite_weights(unet, unet_dir)
    return LoadedModel(unet.to(device).eval(), _scheduler(root, unet_dir), str(root))


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost exception of ``err``'s chain (diffusers wraps the safetensors error)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_finite_weights(unet: torch.nn.Module, unet_dir: Path) -> None:
    """A NaN or Inf weight makes every output NaN; refuse the model at load, naming the first such tensor."""
    bad = [
        name for name, tensor in unet.state_dict().items() if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if bad:
        raise ModelLoadError(
            f"{unet_dir} has non-finite weights (NaN or Inf) in {len(bad)} tensor(s), first {bad[0]}: the file is "
            "damaged or the model diverged in training; use an intact copy of the model.",
            exit_code=1,
        )


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is not available is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps was asked for but MPS is not available here; use --device cpu or auto.")
    return torch.device(device)
