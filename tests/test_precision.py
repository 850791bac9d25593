"""The amp / channels_last options (amnseg/precision.py): off by default, bf16 without effect
on the CPU, channels_last on any device, and what the wrapper does when on (run here with CPU
autocast; on CUDA under the ``gpu`` marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from amnseg.config import load_config
from amnseg.errors import AmnsegError
from amnseg.precision import MixedPrecision, with_precision


class Recorder(nn.Module):
    """A conv net that records the memory format and dtype its convolution sees."""

    has_unused_parameters = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, images, scale=None):
        self.seen.append((images.is_contiguous(memory_format=torch.channels_last),
                          torch.get_autocast_dtype(images.device.type)
                          if torch.is_autocast_enabled(images.device.type) else None))
        out = self.conv(images)
        return [out, out.mean(dim=(2, 3))] if scale is None else out * scale

    def cam(self, images):
        return torch.relu(self.conv(images))


def test_options_off_by_default_bf16_cuda_only_channels_last_anywhere():
    config = load_config(None, [])
    assert config.amp == "off" and config.channels_last is False
    model = Recorder()
    assert with_precision(model, config, torch.device("cpu")) is model
    bf16 = load_config(None, ["amp=bf16"])
    assert with_precision(model, bf16, torch.device("cpu")) is model  # CUDA only
    on = load_config(None, ["amp=bf16", "channels_last=true"])
    wrapped = with_precision(model, on, torch.device("cpu"))
    assert isinstance(wrapped, MixedPrecision) and not wrapped.bf16 and wrapped.channels_last
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 8, 9)
    out = wrapped(images)[0]
    assert model.seen[-1] == (True, None)  # NHWC input, no autocast
    torch.testing.assert_close(out, torch.nn.functional.conv2d(
        images, model.conv.weight.contiguous(), model.conv.bias, padding=1))


def test_cpu_training_and_maps_in_channels_last_match_the_plain_run(tmp_path):
    """channels_last on the CPU: the same training and maps up to floating-point order."""
    from conftest import tiny_config, write_tiny_folder_dataset

    from amnseg.checkpoints import load_model
    from amnseg.io import load_score_maps
    from amnseg.layout import checkpoint_path
    from amnseg.stages.cam import make_cams, train_cam

    data = write_tiny_folder_dataset(tmp_path / "data")
    runs = {}
    for name, options in (("plain", []), ("nhwc", ["channels_last=true"])):
        config = tiny_config(data, tmp_path / name, "cam.epochs=1", *options)
        train_cam(config)
        make_cams(config)
        weights = load_model(checkpoint_path(config, "cam"), "cam", ["square", "disc"])
        maps = {p.name: load_score_maps(p) for p in (tmp_path / name / "cam/maps").glob("*.npz")}
        runs[name] = (weights.state_dict(), maps)
    (plain_weights, plain_maps), (nhwc_weights, nhwc_maps) = runs["plain"], runs["nhwc"]
    for key, value in plain_weights.items():
        torch.testing.assert_close(nhwc_weights[key], value, rtol=1e-4, atol=1e-5)
    assert sorted(nhwc_maps) == sorted(plain_maps) and plain_maps
    for name, maps in plain_maps.items():
        np.testing.assert_allclose(nhwc_maps[name].strided, maps.strided, atol=1e-4)


def test_bad_amp_value_is_a_one_line_error():
    with pytest.raises(AmnsegError, match=r"amp='fp16': expected one of off, bf16"):
        load_config(None, ["amp=fp16"])
    with pytest.raises(AmnsegError, match="channels_last"):
        load_config(None, ["channels_last=maybe"])


def test_amp_off_as_written_in_yaml(tmp_path):
    """YAML reads ``off`` as false: on the command line and in a file it still means off."""
    assert load_config(None, ["amp=off"]).amp == "off"
    config_file = tmp_path / "config.yaml"
    config_file.write_text("amp: off\n")
    assert load_config(config_file).amp == "off"
    with pytest.raises(AmnsegError, match=r"amp='on': expected one of off, bf16"):
        load_config(None, ["amp=on"])  # on is not a precision


def test_wrapper_runs_forward_and_methods_in_bf16_with_float32_outputs():
    torch.manual_seed(0)
    model = Recorder()
    wrapped = MixedPrecision(model, "cpu", bf16=True, channels_last=True)
    images = torch.randn(2, 3, 8, 9)
    outputs = wrapped(images)
    assert model.seen[-1] == (True, torch.bfloat16)
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.conv(images.contiguous(memory_format=torch.channels_last))
    assert expected.dtype == torch.bfloat16
    assert torch.equal(outputs[0], expected.float())
    assert not torch.equal(outputs[0], model.conv(images))  # bf16 differs from float32
    # Extra positional inputs pass through; a method runs the same way as forward.
    assert wrapped(images, torch.tensor(2.0)).dtype == torch.float32
    cams = wrapped.cam(images)
    assert cams.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cams, torch.relu(model.conv(images)).float())
    # Attributes and parameters are the model's own.
    assert wrapped.conv is model.conv and wrapped.has_unused_parameters is True
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in model.parameters()}


def test_wrapper_with_both_off_is_the_model_bit_for_bit():
    model = Recorder()
    wrapped = MixedPrecision(model, "cpu", bf16=False, channels_last=False)
    images = torch.randn(1, 3, 5, 5)
    assert torch.equal(wrapped(images)[0], model(images)[0])
    assert model.seen[-2] == (False, None)


def test_precision_options_change_the_fingerprints_of_network_stages():
    from amnseg.pipeline import STAGES, fingerprint

    base, amp = load_config(None, []), load_config(None, ["amp=bf16"])
    layout = load_config(None, ["channels_last=true"])
    for stage in STAGES:
        networked = stage.name not in ("cam_seeds", "amn_seeds")
        assert (fingerprint(stage, base, "") != fingerprint(stage, amp, "")) == networked, stage
        assert (fingerprint(stage, base, "") != fingerprint(stage, layout, "")) == networked


@pytest.mark.gpu
def test_cuda_training_and_maps_with_bf16_and_channels_last(tmp_path):
    """A CAM run on CUDA with both options: trains, and its maps stay close to fp32 maps of
    the same checkpoint (bf16 carries ~3 significant digits)."""
    from conftest import tiny_config, write_tiny_folder_dataset

    from amnseg.io import load_score_maps
    from amnseg.stages.cam import make_cams, train_cam

    data = write_tiny_folder_dataset(tmp_path / "data")
    fast = tiny_config(data, tmp_path / "run", "device=cuda", "amp=bf16", "channels_last=true")
    train_cam(fast)
    make_cams(fast)
    fast_maps = {p.name: load_score_maps(p) for p in (tmp_path / "run/cam/maps").glob("*.npz")}
    plain = tiny_config(data, tmp_path / "run", "device=cuda")
    for path in (tmp_path / "run/cam/maps").glob("*.npz"):
        path.unlink()
    make_cams(plain)
    for name, maps in fast_maps.items():
        exact = load_score_maps(tmp_path / "run/cam/maps" / name)
        assert maps.strided.dtype == exact.strided.dtype
        assert abs(maps.strided - exact.strided).max() < 0.05, name


def test_compile_and_cudnn_options_change_the_training_stages_fingerprints_only():
    from amnseg.pipeline import STAGES, fingerprint

    base = load_config(None, [])
    training = {"cam", "amn", "irn", "seg", "seg_gt"}
    assert training <= {stage.name for stage in STAGES}
    for option in ("compile_training=default", "cudnn_benchmark=true"):
        changed = load_config(None, [option])
        for stage in STAGES:
            differs = fingerprint(stage, base, "") != fingerprint(stage, changed, "")
            assert differs == (stage.name in training), (option, stage.name)


@pytest.mark.parametrize("value, mode", [("true", "default"), ("yes", "default"),
                                         ("false", "off"), ("off", "off"),
                                         ("reduce-overhead", "reduce-overhead")])
def test_compile_training_takes_torch_compile_modes_and_yaml_booleans(value, mode):
    assert load_config(None, [f"compile_training={value}"]).compile_training == mode


def test_an_unknown_compile_mode_is_a_one_line_error():
    with pytest.raises(AmnsegError, match="compile_training='max-speed': expected one of off"):
        load_config(None, ["compile_training=max-speed"])
