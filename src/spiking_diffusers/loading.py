"""Finding and loading models the way users point at them: a hub id, a local directory, or nothing.

Two layouts are met in practice: a saved pipeline (``model_index.json`` with ``unet/`` and ``scheduler/``)
and the google/ddpm-* repositories (the UNet's ``config.json`` and weights at the root, beside
``scheduler_config.json``). Both load here, for an original ``UNet2DModel`` or ``UNet2DConditionModel`` and
for this package's QCFS and spiking versions of them. A pipeline's conditioning comes along: its
``label_tokens`` (a label-conditional model) are loaded; other components (a Stable Diffusion pipeline's
``text_encoder``, ``tokenizer``, ``vae``...) are only named, for ``sdm-convert`` to copy. Every expected mistake
raises :class:`ModelLoadError` with one line that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel, UNet2DModel

from .converter.models import (
    QCFSUNet2DConditionModel,
    QCFSUNet2DModel,
    SpikingUNet2DConditionModel,
    SpikingUNet2DModel,
)
from .errors import SdmError
from .label_tokens import LabelTokens

UNET_CLASSES = {
    cls.__name__: cls
    for cls in (
        UNet2DModel,
        QCFSUNet2DModel,
        SpikingUNet2DModel,
        UNet2DConditionModel,
        QCFSUNet2DConditionModel,
        SpikingUNet2DConditionModel,
    )
}
CONDITIONAL_CLASSES = (UNet2DConditionModel, QCFSUNet2DConditionModel, SpikingUNet2DConditionModel)
OWN_COMPONENTS = ("unet", "scheduler", "label_tokens")
"""The pipeline components the commands load themselves; any other one is carried along unchanged."""
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DOWNLOADED = ("json", "safetensors", "bin", "txt", "model")
"""File types fetched from the hub, at the top and one folder down: configs, weights, tokenizer files."""


class ModelLoadError(SdmError, ValueError):
    """The model argument does not lead to a loadable model; the message says why and what to do.

    ``exit_code`` is 2 for a usage mistake (wrong path, not a model, unsupported architecture) and 1 for a
    runtime failure (damaged or non-finite weights, hub unreachable).
    """

    exit_code = 2


@dataclass
class LoadedModel:
    """A UNet (original, QCFS or spiking), its scheduler, where they came from, and its conditioning.

    ``label_tokens`` is a label-conditional pipeline's class-label encoder (else ``None``); ``components``
    names the pipeline's other components (a Stable Diffusion pipeline's ``text_encoder``, ``vae``...), which
    are not loaded; ``root`` is the directory the model was read from.
    """

    unet: UNet2DModel | QCFSUNet2DModel | SpikingUNet2DModel
    scheduler: SchedulerMixin
    source: str
    label_tokens: LabelTokens | None = None
    components: tuple[str, ...] = ()
    root: Path | None = None

    @property
    def cross_attention(self) -> bool:
        """Whether the UNet is a cross-attention (``UNet2DConditionModel``-family) UNet."""
        return isinstance(self.unet, CONDITIONAL_CLASSES)

    @property
    def text_conditioned(self) -> bool:
        """A cross-attention UNet whose conditioning comes from outside this package (a text encoder)."""
        return self.cross_attention and self.label_tokens is None

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
                allow_patterns=[f"{folder}*.{ext}" for folder in ("", "*/") for ext in DOWNLOADED],
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
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(
            f"{path} is not valid JSON ({err}); the model directory is damaged: download or save the model again."
        ) from err
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"{path} holds a JSON {type(data).__name__}, not the settings object diffusers writes; the model "
            "directory is damaged: download or save the model again."
        )
    return data


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
            return scheduler_from_config(_read_json(candidate), candidate)
    train_steps = _read_json(unet_dir / "config.json").get("num_train_timesteps") or 1000
    return scheduler_from_config({"num_train_timesteps": train_steps}, unet_dir / "config.json")


def scheduler_from_config(config: dict, path: Path | str) -> SchedulerMixin:
    """The diffusers scheduler ``config`` (read from ``path``) describes, checked to give a usable noise
    schedule; a :class:`ModelLoadError` (exit 2) that names the file and says what to do otherwise."""
    from diffusers import schedulers

    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(schedulers, name, None) if isinstance(name, str) else None
    hint = "fix it, or copy scheduler_config.json from the original model"
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ModelLoadError(
            f"{path} names the scheduler {name!r}, which diffusers does not have; {hint} (a DDPM's is DDPMScheduler)."
        )
    try:
        with _diffusers_quiet():
            scheduler = cls.from_config(config)
    except Exception as err:
        raise ModelLoadError(f"{path} is not a usable {name} config ({_first_line(err)}); {hint}.") from err
    train_steps = scheduler.config.get("num_train_timesteps")
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 1:
        raise ModelLoadError(f"{path}: num_train_timesteps must be a whole number >= 1, got {train_steps!r}; {hint}.")
    betas = getattr(scheduler, "betas", None)
    if torch.is_tensor(betas) and not (betas.isfinite().all() and (betas >= 0).all() and (betas <= 1).all()):
        raise ModelLoadError(
            f"{path} gives a noise schedule with betas outside [0, 1] (beta_start, beta_end, beta_schedule or "
            f"trained_betas); {hint}."
        )
    return scheduler


@contextlib.contextmanager
def _diffusers_quiet() -> Iterator[None]:
    """Hold diffusers' warnings back while loading: what they warn of is reported here as one error line."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model(model: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the UNet (ANN, QCFS or SNN) and its scheduler from a hub id, a directory, or the shipped model."""
    root = resolve_model_dir(model)
    unet_dir = _unet_dir(root)
    config = _read_json(unet_dir / "config.json")
    class_name = config.get("_class_name", "UNet2DModel")
    if not isinstance(class_name, str) or class_name not in UNET_CLASSES:
        raise ModelLoadError(
            f"{root} holds a {class_name}; the commands take UNet2DModel and UNet2DConditionModel diffusion models "
            "(and this package's QCFS / spiking versions of them)."
        )
    if not any((unet_dir / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{unet_dir} has no weights ({' or '.join(WEIGHT_FILES)}).")
    cls = UNET_CLASSES[class_name]
    scheduler = _scheduler(root, unet_dir)  # a damaged scheduler config is refused before the weights load
    _check_weight_shapes(_config_shapes(cls, config, unet_dir), unet_dir)
    try:
        with _diffusers_quiet():
            unet, info = cls.from_pretrained(unet_dir, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        cause = _root_cause(err)
        if any(sign in cause for sign in ("expected shape", "size mismatch", "keys are missing")):
            raise ModelLoadError(f"The weights in {unet_dir} do not match its config.json: {cause[:300]}.") from err
        raise ModelLoadError(
            f"Could not load the weights in {unet_dir}: {cause[:300]}. The file is truncated or "
            "damaged: download or save the model again.",
            exit_code=1,
        ) from err
    _check_loading_info(unet, info, unet_dir)
    _check_finite_weights(unet, unet_dir)
    components = _components(root) if unet_dir != root else ()
    label_tokens = _label_tokens(root, unet) if "label_tokens" in components else None
    if label_tokens is not None:
        label_tokens = label_tokens.to(device).eval()
    others = tuple(name for name in components if name not in OWN_COMPONENTS)
    return LoadedModel(unet.to(device).eval(), scheduler, str(root), label_tokens, others, root)


def _components(root: Path) -> tuple[str, ...]:
    """The component names of a saved pipeline (the entries of ``model_index.json`` that name a class)."""
    index = _read_json(root / "model_index.json")
    return tuple(
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1] is not None
    )


def _label_tokens(root: Path, unet: torch.nn.Module) -> LabelTokens:
    """A label-conditional pipeline's ``LabelTokens``, checked to fit the UNet's cross-attention width."""
    directory = root / "label_tokens"
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{root}/model_index.json names label_tokens but {directory}/config.json is missing.")
    try:
        with _diffusers_quiet():
            tokens = LabelTokens.from_pretrained(directory)
    except Exception as err:
        raise ModelLoadError(
            f"Could not load the label tokens in {directory}: {_root_cause(err)[:300]}. Save the pipeline again."
        ) from err
    width = getattr(unet.config, "cross_attention_dim", None)
    if tokens.config.dim != width:
        raise ModelLoadError(
            f"{directory} holds label tokens of width {tokens.config.dim}, but the UNet's cross_attention_dim is "
            f"{width}: they belong to different models."
        )
    _check_finite_weights(tokens, directory)
    return tokens


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return f"{shown} (+{len(keys) - 3} more)" if len(keys) > 3 else shown


def _config_shapes(cls: type, config: dict, unet_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """The tensor shapes ``config`` asks for (built on the meta device: no memory, no time), or a
    :class:`ModelLoadError` naming config.json when diffusers cannot build it (an unknown block type, a
    value of the wrong kind). ``None`` where only a real build can tell, and it succeeds."""
    try:
        with _diffusers_quiet(), torch.device("meta"):
            model = cls.from_config(config)
        return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    except Exception:
        pass
    try:  # a config that builds on the CPU but not on the meta device is not the user's fault
        with _diffusers_quiet():
            cls.from_config(config)
    except Exception as err:
        raise ModelLoadError(
            f"{unet_dir / 'config.json'} does not describe a {cls.__name__} that diffusers can build: "
            f"{_first_line(err)[:300].rstrip('.')}. Fix config.json, or use the one saved with the weights."
        ) from err
    return None


def _check_weight_shapes(expected: dict[str, tuple[int, ...]] | None, unet_dir: Path) -> None:
    """Compare the safetensors header (no tensor is read) with the shapes the config asks for."""
    path = unet_dir / WEIGHT_FILES[0]
    if expected is None or not path.is_file():
        return
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as weights:
            found = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    except Exception:
        return  # a damaged file: loading it reports that
    mismatched = [name for name in expected if name in found and found[name] != expected[name]]
    if mismatched:
        first = mismatched[0]
        raise ModelLoadError(
            f"The weights in {unet_dir} do not match its config.json: {len(mismatched)} tensor(s) of another "
            f"shape, first {first} ({list(found[first])} in the weights, {list(expected[first])} by the config). "
            "The config and the weights come from different models: use the config.json saved with the weights."
        )


def _check_loading_info(unet: torch.nn.Module, info: dict, unet_dir: Path) -> None:
    """Refuse weights with tensors missing (left uninitialised, on the meta device) or left over."""
    on_meta = [name for name, tensor in unet.state_dict().items() if tensor.is_meta]
    missing = sorted(set(info.get("missing_keys", [])) | set(on_meta))
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = [
        str(entry[0]) if isinstance(entry, tuple | list) else str(entry) for entry in info.get("mismatched_keys", [])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the weights: {_names(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) in the weights that the config has no place for: {_names(unexpected)}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of another shape: {_names(mismatched)}")
    if problems:
        raise ModelLoadError(
            f"The weights in {unet_dir} do not match its config.json: {'; '.join(problems)}. The weights file is "
            "incomplete or the config belongs to another model: use the config.json and weights saved together."
        )


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost exception of ``err``'s chain (diffusers wraps the safetensors error)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_finite_weights(unet: torch.nn.Module, unet_dir: Path) -> None:
    """A NaN or Inf weight makes every output NaN; refuse the model at load, naming the first such tensor."""
    bad = [
        name
        for name, tensor in unet.state_dict().items()
        if tensor.is_floating_point() and not tensor.is_meta and not tensor.isfinite().all()
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
