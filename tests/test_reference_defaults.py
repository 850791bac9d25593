"""The defaults are the reference's: every number of METHOD.md, written out here once more, must
equal the config defaults and what `configs/voc12.yaml` resolves to."""

from __future__ import annotations

import pytest

from amnseg.config import config_to_dict, load_config

# METHOD.md, section by section (key in the config: value in the reference).
METHOD = {
    # 0. data
    "data.train_split": "train_aug",
    "data.infer_split": "train",
    "data.val_split": "val",
    "data.exif_orientation": False,  # images read as stored, as the reference reads them
    # The reference's arithmetic: no mixed precision, layout change, compilation or folding.
    "amp": "off",
    "channels_last": False,
    "compile_training": "off",
    "cudnn_benchmark": False,
    "sync_batchnorm": False,
    # 1. backbone (torchvision's ResNet-50 layout)
    "backbone.depth": 50,
    "backbone.width": 1.0,
    "backbone.strides": [2, 2, 2, 1],
    "backbone.dilations": [1, 1, 1, 1],
    "backbone.stride_in_1x1": False,
    "backbone.stem_pool_ceil": False,
    "backbone.fold_norm": False,
    "backbone.norm": "frozen",
    "backbone.freeze_stem": True,
    # 2. cam
    "cam.epochs": 5,
    "cam.batch_size": 16,
    "cam.lr": 0.1,
    "cam.head_lr_mult": 10.0,
    "cam.weight_decay": 1e-4,
    "cam.momentum": 1e-4,
    "cam.poly_power": 0.9,
    "cam.resize_long": [320, 640],
    "cam.crop_size": 512,
    "cam.flip": True,
    "cam.scales": [1.0, 0.5, 1.5, 2.0],
    "cam.eval_threshold": 0.15,
    # 3. seeds
    "seeds.cam_fg_threshold": 0.30,
    "seeds.cam_bg_threshold": 0.05,
    "seeds.amn_fg_threshold": 0.45,
    "seeds.amn_bg_threshold": 0.15,
    "seeds.crf.iterations": 10,
    "seeds.crf.gt_prob": 0.7,
    "seeds.crf.gaussian_sxy": 3,
    "seeds.crf.gaussian_compat": 3,
    "seeds.crf.bilateral_sxy": 50,
    "seeds.crf.bilateral_srgb": 5,
    "seeds.crf.bilateral_compat": 10,
    "seeds.crf_device": "cpu",  # pydensecrf, the reference's C++
    # 4. amn
    "amn.epochs": 5,
    "amn.batch_size": 16,
    "amn.backbone_lr": 5e-6,
    "amn.head_lr": 1e-4,
    "amn.weight_decay": 1e-4,
    "amn.label_smoothing": 0.4,
    "amn.dropout": 0.1,
    "amn.crop_size": 512,
    "amn.rescale": [0.5, 1.5],
    "amn.flip": True,
    "amn.scales": [1.0, 0.5, 1.5, 2.0],
    "amn.eval_threshold": 0.25,
    "amn.backbone_init": "imagenet",
    # 5. irn
    "irn.radius": 10,
    "irn.epochs": 3,
    "irn.batch_size": 32,
    "irn.lr": 0.1,
    "irn.weight_decay": 1e-4,
    "irn.momentum": 1e-4,
    "irn.poly_power": 0.9,
    "irn.crop_size": 512,
    "irn.rescale": [0.5, 1.5],
    "irn.flip": True,
    "irn.backbone_init": "imagenet",
    "irn.infer_pad_size": 512,
    "irn.walk_radius": 5,
    "irn.beta": 10,
    "irn.exp_times": 8,
    "irn.cam_power": 1.3,
    "irn.bg_threshold": 0.25,
    # 6. seg (DeepLab-v2, kazuto1011/deeplab-pytorch's VOC recipe)
    "seg.backbone.depth": 101,
    "seg.backbone.strides": [2, 2, 1, 1],
    "seg.backbone.dilations": [1, 1, 2, 4],
    "seg.backbone.stride_in_1x1": True,
    "seg.backbone.stem_pool_ceil": True,
    "seg.backbone.norm": "frozen",
    "seg.backbone.freeze_stem": False,
    "seg.backbone.width": 1.0,
    "seg.backbone.fold_norm": False,
    "seg.fused_accumulation": False,
    "seg.eval_flip": False,
    "seg.eval_crf": True,
    "seg.crf_device": "cpu",
    "seg.init": "imagenet",
    "seg.masks": "pseudo",
    "seg.iterations": 20000,
    "seg.batch_size": 5,
    "seg.accumulation": 2,
    "seg.lr": 2.5e-4,
    "seg.momentum": 0.9,
    "seg.weight_decay": 5e-4,
    "seg.poly_power": 0.9,
    "seg.lr_decay_every": 10,
    "seg.aspp_weight_lr_mult": 10.0,
    "seg.aspp_bias_lr_mult": 20.0,
    "seg.crop_size": 321,
    "seg.rescale": [0.5, 0.75, 1.0, 1.25, 1.5],
    "seg.flip": True,
    "seg.msc_scales": [0.5, 0.75],
    "seg.crf.iterations": 10,
    "seg.crf.gaussian_sxy": 1,
    "seg.crf.gaussian_compat": 3,
    "seg.crf.bilateral_sxy": 67,
    "seg.crf.bilateral_srgb": 3,
    "seg.crf.bilateral_compat": 4,
}


def lookup(config, dotted: str):
    value = config_to_dict(config)
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("name", [None, "voc12"])
def test_defaults_are_the_reference_values(name):
    config = load_config(name, [])
    for key, expected in METHOD.items():
        got = lookup(config, key)
        assert got == expected and type(got) is type(expected) or (
            isinstance(expected, int) and isinstance(got, float) and got == expected
        ), f"{key}: {got!r}, METHOD.md says {expected!r}"


def test_voc12_config_loads_imagenet_weights_and_coco_keeps_the_method():
    assert load_config("voc12", []).backbone.pretrained == "hub"
    coco = load_config("coco14", [])
    assert coco.data.kind == "coco" and coco.backbone.pretrained == "hub"
    assert len(coco.data.train_split) and coco.cam.eval_threshold == 0.15
    coco_recipe = {"seg.iterations": 100000, "seg.lr": 2e-4}
    for key, expected in METHOD.items():
        if not key.startswith("data."):
            assert lookup(coco, key) == coco_recipe.get(key, expected), key


def test_eval_thresholds_grid():
    config = load_config(None, [])
    grid = config.eval.thresholds()
    assert grid[0] == 0.0 and grid[-1] == 0.95 and len(grid) == 20
    assert config.eval.robust_range == [0.10, 0.60]
    # A grid that does not start at 0: its count from the span, values rounded to 6 places.
    from amnseg.config import EvalConfig

    assert EvalConfig(sweep_start=0.3, sweep_stop=0.6, sweep_step=0.1).thresholds() == [
        0.3, 0.4, 0.5, 0.6]
    assert EvalConfig(sweep_start=0.1, sweep_stop=0.1000004, sweep_step=0.0000001
                      ).thresholds()[1] == 0.1
