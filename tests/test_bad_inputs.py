"""Every command against every kind of bad input: exit code 2 (usage) or 1 (runtime), one ``Error:`` line that
says what to do, no traceback, and the previous content of ``--output`` untouched with no staging left over.

The models are tiny (1x16x16, so ``sdm-eval``'s digit classifier applies) and saved to a temporary
directory; every command runs in-process through click's ``CliRunner``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

import spiking_diffusers
from conftest import TINY_CONFIGS, make_unet
from spiking_diffusers import QCFSUNet2DModel, SpikingDiffusionPipeline, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.cli import OUTPUT_MARKER, output_marker
from spiking_diffusers.commands import calibrate, energy, evaluate, export, sample
from spiking_diffusers.commands import convert as convert_cmd

UNET = dict(TINY_CONFIGS["attention"], sample_size=16)
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
HUB_ID = "google/ddpm-cifar10-32"

FAST = {
    "convert": ["--no-calibrate", "-T", "2"],
    "calibrate": ["-T", "2", "--num-samples", "4", "--sampler-steps", "2", "--distill-steps", "2", "--snn-steps", "1",
                  "--batch-size", "2", "--snn-batch-size", "2", "--threshold-init", "percentile", "--set-size", "16"],
    "sample": ["--steps", "2", "-n", "2"],
    "eval": ["-T", "2", "--no-calibrate", "--num-images", "4", "--batch-size", "4", "--steps", "2",
             "--noise-timesteps", "2", "--noise-images", "2", "--grid-rows", "2", "--no-progress"],
    "energy": ["-T", "2", "--steps", "2", "--num-images", "1", "--no-calibrate"],
    "export": ["-T", "2", "--which", "qcfs", "--no-calibrate"],
}  # fmt: skip
COMMANDS = {
    "convert": convert_cmd,
    "calibrate": calibrate,
    "sample": sample,
    "eval": evaluate,
    "energy": energy,
    "export": export,
}
WITH_LEVELS = ("convert", "calibrate", "eval", "energy", "export")
"""Commands with -T/--timesteps and -L/--levels (sdm-sample's T is --snn-timesteps)."""


def _save_pipeline(unet, path: Path) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def _edit_weights(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / WEIGHTS)
    edit(tensors)
    save_file(tensors, target / WEIGHTS)
    return target


def _image(path: Path, size: int, mode: str) -> None:
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = torch.randint(0, 256, (size, size, channels), generator=torch.Generator().manual_seed(size))
    Image.fromarray(pixels.squeeze(-1).byte().numpy() if channels == 1 else pixels.byte().numpy(), mode).save(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Every bad (and one good) input, by name."""
    root = tmp_path_factory.mktemp("inputs")
    unet = make_unet(UNET, dtype=torch.float32)
    ann = _save_pipeline(unet, root / "ann")
    paths = {"ann": ann, "missing": root / "missing", "file": root / "file.txt"}
    paths["file"].write_text("not a model")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "README.md").write_text("just a folder")
    paths["not_model"] = root / "not-a-model"

    shutil.copytree(ann, root / "truncated")
    data = (ann / WEIGHTS).read_bytes()
    (root / "truncated" / WEIGHTS).write_bytes(data[: len(data) // 2])
    paths["truncated"] = root / "truncated"
    shutil.copytree(ann, root / "corrupt")
    (root / "corrupt" / WEIGHTS).write_bytes(b"\xff" * 64 + data[64:])
    paths["corrupt"] = root / "corrupt"

    paths["nan"] = _edit_weights(ann, root / "nan", lambda t: t["conv_in.weight"].view(-1)[3].fill_(float("nan")))
    paths["inf"] = _edit_weights(ann, root / "inf", lambda t: t["conv_out.bias"].fill_(float("inf")))
    # Finite weights whose output overflows float32: sampling must notice, not write NaN images.
    paths["exploding"] = _edit_weights(ann, root / "exploding", lambda t: t["conv_out.weight"].fill_(1e37))
    # ... and one that overflows in its first layer, so its spiking network computes NaN too.
    paths["exploding_in"] = _edit_weights(ann, root / "exploding-in", lambda t: t["conv_in.weight"].fill_(3e38))

    conditional = UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    conditional.save_pretrained(root / "conditional")
    paths["conditional"] = root / "conditional"
    unsupported = root / "unet3d"
    conditional.save_pretrained(unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps(config | {"_class_name": "UNet3DConditionModel"}))
    paths["unet3d"] = unsupported
    paths["two_channels"] = _save_pipeline(make_unet(dict(UNET, in_channels=2, out_channels=2)).float(), root / "c2")

    snn = convert(quantize(unet, levels=2), timesteps=2)
    SpikingDiffusionPipeline(unet=snn, scheduler=DDPMScheduler()).save_pretrained(root / "snn")
    paths["snn"] = root / "snn"

    for name in ("no_images", "corrupt_images", "rgb_images"):
        (root / name).mkdir()
    (root / "no_images" / "notes.txt").write_text("no images here")
    _image(root / "corrupt_images" / "a.png", 16, "L")
    (root / "corrupt_images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    for i, size in enumerate((12, 20, 16)):  # other sizes and RGB(A) for a 1-channel 16x16 model
        _image(root / "rgb_images" / f"{i}.png", size, "RGBA" if i == 2 else "RGB")
    for name in ("no_images", "corrupt_images", "rgb_images"):
        paths[name] = root / name
    paths["cache"] = root / "cache"

    # Weights and config that do not match: a tensor missing, one left over, another shape, an unknown block.
    paths["missing_tensor"] = _edit_weights(ann, root / "missing-tensor", lambda t: t.pop("conv_in.weight"))
    paths["extra_tensor"] = _edit_weights(ann, root / "extra-tensor", lambda t: t.update(extra=torch.zeros(2)))
    paths["wider_config"] = _edit_config(ann, root / "wider", "unet/config.json", block_out_channels=[16, 64])
    paths["unknown_block"] = _edit_config(
        ann, root / "unknown-block", "unet/config.json", down_block_types=["DownBlock2D", "FancyDownBlock2D"]
    )
    scheduler = "scheduler/scheduler_config.json"
    paths["beta_schedule"] = _edit_config(ann, root / "beta-schedule", scheduler, beta_schedule="fancy")
    paths["scheduler_class"] = _edit_config(ann, root / "scheduler-class", scheduler, _class_name="NoSuchScheduler")
    paths["no_train_steps"] = _edit_config(ann, root / "no-train-steps", scheduler, num_train_timesteps=0)
    paths["negative_beta"] = _edit_config(ann, root / "negative-beta", scheduler, beta_start=-1.0)
    shutil.copytree(ann, root / "scheduler-list")
    (root / "scheduler-list" / scheduler).write_text("[1, 2]")
    paths["scheduler_list"] = root / "scheduler-list"
    return paths


def _edit_config(source: Path, target: Path, name: str, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / name).read_text())
    (target / name).write_text(json.dumps(config | changes))
    return target


def previous_output(out: Path, command: str) -> Path:
    """Make ``out`` a previous output of ``command`` (``"convert"``...): its marker and one file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "keep.txt").write_text("previous result")
    (out / OUTPUT_MARKER).write_text(json.dumps({"command": COMMANDS[command].main.name}))
    return out


def run(command: str, args: list[str], paths: dict[str, Path], tmp_path: Path, fast: bool = True):
    """Invoke ``command`` with ``{name}`` placeholders filled in, into ``tmp_path/out`` (which holds a
    previous result of the same command, replaced only with --overwrite on success)."""
    out = previous_output(tmp_path / "out", command)
    names = {name: str(path) for name, path in paths.items()}
    argv = [arg.format(**names) for arg in args]  # last: click takes the last value of a repeated option
    if "--model" not in argv:
        argv = ["--model", str(paths["ann"]), *argv]
    if "--output" not in argv:
        argv = ["--output", str(out), *argv]
    if command in ("calibrate", "eval"):
        argv = ["--cache-dir", str(paths["cache"]), *argv]
    argv = [*(FAST[command] if fast else []), "--overwrite", *argv]
    return CliRunner().invoke(COMMANDS[command].main, argv)


def assert_clean_failure(result, exit_code: int, message: str, tmp_path: Path) -> None:
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # never an uncaught exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert message.lower() in errors[0].lower(), errors[0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind


MODEL_CASES = [
    ("wrong path", ["--model", "{missing}"], 2, "No such directory"),
    ("a file", ["--model", "{file}"], 2, "is a file"),
    ("not a diffusers model", ["--model", "{not_model}"], 2, "is not a diffusers model"),
    ("truncated safetensors", ["--model", "{truncated}"], 1, "Could not load the weights"),
    ("corrupted safetensors", ["--model", "{corrupt}"], 1, "Could not load the weights"),
    ("unsupported UNet class", ["--model", "{unet3d}"], 2, "holds a UNet3DConditionModel"),
    ("NaN weights", ["--model", "{nan}"], 1, "non-finite weights"),
    ("Inf weights", ["--model", "{inf}"], 1, "non-finite weights"),
    ("output is a file", ["--output", "{file}"], 2, "is a file"),
    ("a tensor missing", ["--model", "{missing_tensor}"], 2, "missing from the weights: conv_in.weight"),
    ("a tensor left over", ["--model", "{extra_tensor}"], 2, "config has no place for: extra"),
    ("config wider than the weights", ["--model", "{wider_config}"], 2, "do not match its config.json"),
    ("unknown block type", ["--model", "{unknown_block}"], 2, "FancyDownBlock2D does not exist. Fix config.json"),
    ("unknown beta schedule", ["--model", "{beta_schedule}"], 2, "is not a usable DDPMScheduler config"),
    ("unknown scheduler class", ["--model", "{scheduler_class}"], 2, "names the scheduler 'NoSuchScheduler'"),
    ("no training timesteps", ["--model", "{no_train_steps}"], 2, "num_train_timesteps must be"),
    ("negative beta", ["--model", "{negative_beta}"], 2, "betas outside [0, 1]"),
    ("scheduler config not an object", ["--model", "{scheduler_list}"], 2, "holds a JSON list"),
    ("seed beyond 64 bits", ["--seed", str(2**64)], 2, "is not in the range 0<=x<="),
    ("negative seed", ["--seed", "-1"], 2, "is not in the range 0<=x<="),
]
CASES = [(command, *case) for command in COMMANDS for case in MODEL_CASES]
T_RANGE = "is not in the range 1<=x<=1024"
CASES += [
    (command, "T = 0", ["-T", "0"], 2, "expected integers >= 1" if command == "eval" else f"0 {T_RANGE}")
    for command in WITH_LEVELS
]
CASES += [
    (command, "T = 10^6", ["-T", "1000000"], 2, "expected integers in the range 1<=x<=1024" if command == "eval"
     else f"1000000 {T_RANGE} (each UNet call simulates T time steps")
    for command in WITH_LEVELS
]  # fmt: skip
CASES += [(command, "L = 0", ["-L", "0"], 2, f"0 {T_RANGE}") for command in WITH_LEVELS]
CASES += [(command, "L = 10^5", ["-L", "100000"], 2, f"100000 {T_RANGE} (L levels take") for command in WITH_LEVELS]
CASES += [("eval", "T list with 0", ["-T", "2,0"], 2, "expected integers >= 1")]
CASES += [  # a cross-attention UNet without label tokens is conditioned on text: the commands take no prompts
    ("convert", "calibrate a text-conditioned UNet", ["--model", "{conditional}", "--calibrate"], 2, "needs prompts"),
    ("calibrate", "calibrate a text-conditioned UNet", ["--model", "{conditional}"], 2, "needs prompts"),
    *[
        (command, "text-conditioned UNet", ["--model", "{conditional}"], 2, "conditioned on text")
        for command in ("sample", "eval", "energy")
    ],
    *[
        (command, "guidance without label tokens", ["--guidance-scale", "2"], 2, "needs a label-conditional model")
        for command in ("sample", "eval", "energy")
    ],
    *[
        (command, "labels for an unconditional model", ["--class-labels", "1"], 2, "takes no class labels")
        for command in ("sample", "eval")
    ],
]
CASES += [
    ("sample", "T = 0", ["--model", "{snn}", "--snn-timesteps", "0"], 2, f"0 {T_RANGE}"),
    ("sample", "T = 10^6", ["--model", "{snn}", "--snn-timesteps", "1000000"], 2, f"1000000 {T_RANGE}"),
    *[
        ("sample", f"threshold scale {scale}", ["--model", "{snn}", "--threshold-scale", scale], 2, "finite number > 0")
        for scale in ("0", "-0.5", "nan", "inf", "down=0")
    ],
    ("sample", "threshold scale item without a group", ["--model", "{snn}", "--threshold-scale", "down=0.99,0.9"], 2,
     "every item names its group (time_embedding, down, mid, up, out), and '0.9' does not"),
    ("sample", "threshold scale group twice", ["--model", "{snn}", "--threshold-scale", "down=0.99,down=0.9"], 2,
     "sets group down twice"),
    ("sample", "eta NaN", ["--eta", "nan"], 2, "'nan' is not a finite number"),
    ("sample", "eta above 1", ["--eta", "2"], 2, "2.0 is not in the range 0<=x<=1"),
]  # fmt: skip
CASES += [
    (command, "images beyond the bound", ["--num-images", "1000000"], 2, "1000000 is not in the range")
    for command in ("sample", "eval", "energy")
]
CASES += [
    (command, "more steps than the model was trained with", ["--steps", "1001"], 2, "--steps must be at most 1000")
    for command in ("sample", "eval", "energy")
]
CASES += [
    ("calibrate", "more sampler steps than training steps", ["--sampler-steps", "1001"], 2,
     "--sampler-steps must be at most 1000"),
    ("calibrate", "NaN learning rate", ["--lr", "nan"], 2, "'nan' is not a finite number"),
    ("calibrate", "NaN percentile", ["--percentile", "nan"], 2, "'nan' is not a finite number"),
    ("calibrate", "Inf loss weight", ["--block-loss-weight", "inf"], 2, "'inf' is not a finite number"),
    ("calibrate", "zero calibration budget", ["--calibration-budget", "0"], 2, "0.0 is not in the range x>0"),
    ("convert", "negative calibration budget", ["--calibration-budget", "-3"], 2, "-3.0 is not in the range x>0"),
    ("eval", "NaN calibration budget", ["--calibration-budget", "nan"], 2, "'nan' is not a finite number"),
    ("energy", "Inf energy per MAC", ["--mac-pj", "inf"], 2, "'inf' is not a finite number"),
    ("eval", "T list beyond the bound", ["-T", "2,5000"], 2, "expected integers in the range 1<=x<=1024"),
]  # fmt: skip
CASES += [
    (command, "non-finite output", ["--model", "{exploding}"], 1, "is not finite")
    for command in ("convert", "calibrate", "sample", "eval", "export")
]
CASES += [
    (command, "non-finite spiking output", ["--model", "{exploding_in}"], 1, "is not finite")
    for command in ("sample", "energy")
]
CASES += [
    ("calibrate", "image dir without images", ["--image-dir", "{no_images}"], 2, "No PNG or JPEG images"),
    ("calibrate", "unreadable image", ["--image-dir", "{corrupt_images}"], 1, "b.png"),
    ("calibrate", "images for a 2-channel model", ["--model", "{two_channels}", "--image-dir", "{rgb_images}"], 2,
     "2-channel"),
    ("eval", "real images without images", ["--real-images", "{no_images}"], 2, "No PNG or JPEG images"),
    ("eval", "unreadable real image", ["--real-images", "{corrupt_images}"], 1, "b.png"),
    ("eval", "reference model damaged", ["--model", "{snn}", "--reference-model", "{corrupt}"], 1, "Could not load"),
    ("convert", "reference model missing", ["--reference", "{missing}"], 2, "No such directory"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "case", "args", "exit_code", "message"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES]
)
def test_bad_input_fails_cleanly(paths, tmp_path, command, case, args, exit_code, message):
    assert_clean_failure(run(command, args, paths, tmp_path), exit_code, message, tmp_path)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_hub_id_while_offline(paths, tmp_path, monkeypatch, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    result = run(command, ["--model", HUB_ID], paths, tmp_path)
    shutil.rmtree(tmp_path / "empty-hub-cache", ignore_errors=True)
    assert_clean_failure(result, 1, "offline", tmp_path)


def test_hub_id_while_offline_as_a_console_script(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [Path(sys.executable).parent / "sdm-sample", "--model", HUB_ID, "--output", tmp_path / "out"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("Error:") and "offline" in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_command_run_outside_the_main_thread_fails_cleanly(tmp_path):
    """Signal handlers can only be set in the main thread; a command run in another once died of that."""
    results = []
    args = ["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]
    worker = threading.Thread(target=lambda: results.append(CliRunner().invoke(convert_cmd.main, args)))
    worker.start()
    worker.join()
    assert results[0].exit_code == 2 and "No such directory" in results[0].output, results[0].output


def test_images_of_another_size_and_channel_count_are_converted(paths, tmp_path):
    """RGB and RGBA images of other sizes are resized and turned grayscale for a 1-channel model."""
    result = run("calibrate", ["--image-dir", "{rgb_images}"], paths, tmp_path)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model_index.json").is_file()
    result = run("eval", ["--real-images", "{rgb_images}", "--output", str(tmp_path / "eval")], paths, tmp_path)
    assert result.exit_code == 0, result.output


PACKAGE = Path(spiking_diffusers.__file__).resolve().parent


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def user_files(paths, tmp_path, monkeypatch) -> Path:
    """A user's folder, the working directory: a note, a model and a previous output of another command."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("the user's notes")
    shutil.copytree(paths["ann"], user / "model")
    other = user / "other-output"
    other.mkdir()
    (other / "result.txt").write_text("made by another command")
    monkeypatch.chdir(user)
    return user


OUTPUT_CASES = [
    ("empty --output (an unset shell variable)", "", "--output is empty"),
    ("blank --output", "  ", "--output is empty"),
    ("--output is the model", "{user}/model", "is --model"),
    ("--output inside the model", "{user}/model/unet", "is inside --model"),
    ("--output holds the model", "{user}", "contains --model"),
    ("--output is the working directory", ".", "contains --model"),
    ("--output is a user's folder", "{user}/other-output", "not a previous"),
    ("--output inside a file", "{user}/notes.txt/out", "is a file, not a directory"),
    ("--output is the shipped model", "{package}/assets/digits-ddpm", "installed spiking-diffusers package"),
    ("--output inside the package", "{package}/assets/new-output", "installed spiking-diffusers package"),
    ("--output holds the package", str(PACKAGE.parent), "installed spiking-diffusers package"),
]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("case", "output", "message"), OUTPUT_CASES, ids=[case[0] for case in OUTPUT_CASES])
def test_an_output_that_would_destroy_something_is_refused(user_files, tmp_path, command, case, output, message):
    """Even with --overwrite, nothing of the user's is replaced, and nothing is written anywhere."""
    other = "sample" if command == "convert" else "convert"
    (user_files / "other-output" / OUTPUT_MARKER).write_text(json.dumps({"command": f"sdm-{other}"}))
    before, package_before = _tree(user_files), _tree(PACKAGE / "assets")
    argv = [*FAST[command], "--output", output.format(user=user_files, package=PACKAGE), "--overwrite"]
    if "package" not in case and "shipped" not in case:
        argv += ["--model", str(user_files / "model")]
    result = CliRunner().invoke(COMMANDS[command].main, argv)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert _tree(user_files) == before and _tree(PACKAGE / "assets") == package_before
    assert not list(tmp_path.rglob(".*.tmp-*")) and not list(PACKAGE.rglob(".*.tmp-*"))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_previous_output_is_replaced_only_with_overwrite_and_a_user_folder_never(paths, tmp_path, command):
    out = previous_output(tmp_path / "out", command)
    result = CliRunner().invoke(COMMANDS[command].main, [*FAST[command], "--output", str(out)])
    assert result.exit_code == 2 and f"holds a previous {COMMANDS[command].main.name} output; pass --overwrite" in (
        result.output
    ), result.output
    (out / OUTPUT_MARKER).unlink()  # the same files, not written by us: never replaced
    result = CliRunner().invoke(COMMANDS[command].main, [*FAST[command], "--output", str(out), "--overwrite"])
    assert result.exit_code == 2 and "not a previous" in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_output_is_checked_before_any_work(user_files, monkeypatch, command):
    """sdm-energy used to measure for minutes before looking at --output; no command loads a model first."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(COMMANDS[command], "load_model", load_model)
    argv = [*FAST[command], "--output", str(user_files / "other-output"), "--overwrite"]
    result = CliRunner().invoke(COMMANDS[command].main, argv)
    assert result.exit_code == 2 and "not a previous" in result.output, result.output


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unwritable_parent_is_a_usage_error_naming_it(tmp_path, monkeypatch, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    result = CliRunner().invoke(COMMANDS[command].main, [*FAST[command], "--output", str(locked / "new" / "out")])
    assert result.exit_code == 2, result.output
    assert f"Error: --output {locked}/new/out: {locked} cannot be written" in result.output
    assert not (locked / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = CliRunner().invoke(convert_cmd.main, [*FAST["convert"], "--output", str(locked / "out")])
    assert result.exit_code == 2 and "cannot be written" in result.output, result.output


def _mkdtemp_failing(kind: str, error: int):
    """``tempfile.mkdtemp`` that fails for the ``kind`` of directory (``.probe-`` or ``.tmp-``: staging)."""
    real = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if kind not in (prefix or ""):
            return real(suffix, prefix, dir)
        raise OSError(error, os.strerror(error), str(Path(dir) / f"{prefix}x1y2"))

    return mkdtemp


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_parent_that_refuses_a_directory_is_found_before_any_work(paths, tmp_path, monkeypatch, command):
    """Root on a read-only mount, or /sys: access() says yes, creating a directory says no."""
    monkeypatch.setattr(tempfile, "mkdtemp", _mkdtemp_failing(".probe-", errno.EPERM))
    result = run(command, [], paths, tmp_path)
    assert_clean_failure(result, 2, f"{tmp_path} cannot be written (Operation not permitted)", tmp_path)


def test_a_failure_to_write_names_the_output_not_the_staging_directory(paths, tmp_path, monkeypatch):
    out = previous_output(tmp_path / "out", "convert")
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkdtemp", _mkdtemp_failing(".tmp-", errno.EACCES))
        result = run("convert", [], paths, tmp_path)
    assert_clean_failure(result, 2, f"Cannot write --output {out}: Permission denied", tmp_path)
    assert ".tmp-" not in result.output

    def disk_full(self, directory, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "unet" / "model.safetensors"))

    monkeypatch.setattr(SpikingDiffusionPipeline, "save_pretrained", disk_full)
    result = run("convert", [], paths, tmp_path)
    assert_clean_failure(result, 1, f"Cannot write --output {out}: No space left on device.", tmp_path)
    assert ".tmp-" not in result.output


def test_the_output_has_the_umask_mode_and_the_marker_of_its_command(paths, tmp_path):
    out = tmp_path / "snn"
    previous = os.umask(0o027)
    try:
        result = CliRunner().invoke(convert_cmd.main, [*FAST["convert"], "--model", str(paths["ann"]), "--output", out])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # not mkdtemp's 0700
    assert output_marker(out) == "sdm-convert"
    again = CliRunner().invoke(convert_cmd.main, [*FAST["convert"], "--model", str(out), "--output", out])
    assert again.exit_code == 2 and "is --model" in again.output, again.output
    result = CliRunner().invoke(
        sample.main, [*FAST["sample"], "--model", str(paths["ann"]), "--output", out, "--overwrite"]
    )
    assert result.exit_code == 2 and "not a previous sdm-sample output" in result.output, result.output
    argv = [*FAST["convert"], "--model", str(paths["ann"]), "--output", out, "--overwrite"]
    assert CliRunner().invoke(convert_cmd.main, argv).exit_code == 0


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_takes_device(command):
    result = CliRunner().invoke(COMMANDS[command].main, ["--help"])
    assert result.exit_code == 0 and "--device [auto|cpu|cuda|mps]" in result.output


# The Python API: a TypeError / ValueError that names the argument and what it accepts, before any work.


@pytest.fixture(scope="module")
def api_models():
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = quantize(unet, levels=2)
    return {"unet": unet, "qnet": qnet, "snn": convert(qnet, timesteps=2)}


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: convert(m["unet"]), TypeError, "not a plain UNet2DModel: quantize it first"),
        (lambda m: convert(m["snn"]), TypeError, "already a SpikingUNet2DModel"),
        (lambda m: convert(m["qnet"], timesteps=2.5), TypeError, "spike_steps must be an int, got float"),
        (lambda m: convert(m["qnet"], timesteps=10**6), ValueError, "spike_steps must be in the range 1<=x<=1024"),
        (lambda m: convert(m["qnet"], neuron="lif"), ValueError, "Unknown neuron 'lif'"),
        (lambda m: quantize(m["qnet"]), TypeError, "already a QCFSUNet2DModel"),
        (
            lambda m: quantize("google/ddpm-cifar10-32"),
            TypeError,
            "takes a diffusers UNet2DModel or UNet2DConditionModel, got str",
        ),
        (lambda m: quantize(m["unet"], levels=0), ValueError, "levels must be in the range 1<=x<=1024, got 0"),
        (lambda m: quantize(m["unet"], levels="4"), TypeError, "levels must be an int, got str"),
        (lambda m: quantize(m["unet"], init="best"), ValueError, "Unknown init 'best'"),
        (lambda m: quantize(m["unet"], percentile=float("nan")), ValueError, "percentile must be a finite number"),
        (lambda m: quantize(m["unet"], seed=-1), ValueError, "seed must be in the range 0<=x<="),
        (lambda m: SpikingUNet2DModel(unet_config="x"), TypeError, "unet_config must be the dict"),
        (lambda m: SpikingUNet2DModel(dict(UNET), timesteps=0), ValueError, "timesteps must be in the range"),
        (lambda m: QCFSUNet2DModel(dict(UNET), levels=-1), ValueError, "levels must be in the range"),
        (lambda m: QCFSUNet2DModel(dict(UNET), phi=2.0), ValueError, "phi must be a finite number >= 0 and <= 1"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_the_api_refuses_bad_arguments_by_name(api_models, call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call(api_models)


@pytest.mark.parametrize("model", ["qnet", "snn"])
@pytest.mark.parametrize(
    ("sample_", "timestep", "error", "message"),
    [
        (torch.randn(2, 1, 8, 8, dtype=torch.float64), 5, TypeError, "sample is torch.float64 but the model's weights"),
        (torch.randn(2, 3, 8, 8), 5, ValueError, "sample must have shape (batch, 1, height, width)"),
        (torch.randn(1, 8, 8), 5, ValueError, "got (1, 8, 8)"),
        (torch.randn(2, 1, 8, 8).numpy(), 5, TypeError, "sample must be a torch.Tensor, got ndarray"),
        (torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]), ValueError, "timestep must be one value or one per sample"),
    ],
    ids=["dtype", "channels", "rank", "not a tensor", "timesteps per sample"],
)
def test_a_forward_on_the_wrong_input_names_the_input(api_models, model, sample_, timestep, error, message):
    with pytest.raises(error, match=re.escape(message)):
        api_models[model](sample_, timestep)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be in the range 1<=x<="),
        ({"batch_size": -2}, ValueError, "batch_size must be in the range 1<=x<="),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be at least 1, got 0"),
        ({"num_inference_steps": 1001}, ValueError, "num_inference_steps must be at most 1000"),
        ({"batch_size": 3, "generator": "few"}, ValueError, "a list of one per image (3), got a list of 2"),
        ({"batch_size": 1, "generator": "many"}, ValueError, "a list of one per image (1), got a list of 2"),
        ({"generator": 7}, TypeError, "generator must be a torch.Generator"),
        ({"latents": torch.randn(2, 3, 8, 8)}, ValueError, "latents must be a tensor of shape (batch, 1, 8, 8)"),
        ({"snn_timesteps": 0}, ValueError, "spike_steps must be in the range 1<=x<=1024"),
    ],
    ids=lambda value: None if isinstance(value, dict | type) else value,
)
def test_the_pipeline_refuses_bad_arguments_by_name(api_models, kwargs, error, message):
    pipe = SpikingDiffusionPipeline(unet=api_models["snn"], scheduler=DDPMScheduler())
    if kwargs.get("generator") in ("few", "many"):
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(error, match=re.escape(message)):
        pipe(**kwargs)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_a_scheduler_that_cannot_take_the_steps_is_refused_up_front(api_models, steps):
    """PNDM's Runge-Kutta warm-up takes 4 steps; below that it died inside numpy ("could not be broadcast")."""
    pipe = SpikingDiffusionPipeline(unet=api_models["snn"], scheduler=PNDMScheduler())
    with pytest.raises(ValueError, match="num_inference_steps must be at least 4 for PNDMScheduler"):
        pipe(num_inference_steps=steps)
    skipping = SpikingDiffusionPipeline(unet=api_models["snn"], scheduler=PNDMScheduler(skip_prk_steps=True))
    assert skipping(num_inference_steps=steps, output_type="np").images.shape == (1, 8, 8, 1)
