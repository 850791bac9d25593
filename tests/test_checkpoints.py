"""Import of the authors' checkpoints (synthetic, from the published key lists), export, and
the default forward passes against functional re-computations from METHOD.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from amnseg.checkpoints import build_model, export_reference, import_reference
from amnseg.config import deeplab_backbone
from amnseg.errors import AmnsegError
from amnseg.io import load_checkpoint

# The key lists of the authors' files (copied from ../shared/reference/).
REFERENCE = Path(__file__).resolve().parent / "data"
VOC_LIKE = [f"class{i}" for i in range(20)]


def key_list(kind: str) -> list[tuple[str, tuple[int, ...], str]]:
    path = REFERENCE / f"official_keys_{kind}.tsv"
    rows = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype))
    return rows


def synthetic_reference(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the listed shapes, plus alias copies like the real files carry."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in key_list(kind):
        if dtype == "torch.int64":
            state[key] = torch.randint(0, 100, shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    # Aliases: the same tensors under other module paths.
    state["stage1.0.weight"] = state["resnet50.conv1.weight"].clone()
    state["backbone.0.1.running_mean"] = state["resnet50.bn1.running_mean"].clone()
    state["stage4.0.2.conv3.weight"] = state["resnet50.layer4.2.conv3.weight"].clone()
    if kind == "cam":
        state["newly_added.0.weight"] = state["classifier.weight"].clone()
    if kind == "amn":
        state["newly_added.0.1.c2.weight"] = state["classifier.1.c2.weight"].clone()
    for key in [k for k in state if k.startswith("edge_layers.")]:
        # IRN lists its edge modules twice: edge_layers.i.* is fc_edge{i+1}.*
        index, rest = key[len("edge_layers."):].split(".", 1)
        state[key] = state[f"fc_edge{int(index) + 1}.{rest}"].clone()
    return state


def save(tmp_path: Path, state: dict, name: str) -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


# --- functional re-computation of the reference networks from raw tensors -----------------

def f_bn(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], False, 0.0, 1e-5)


def f_bottleneck(x, sd, prefix, stride):
    out = F.relu(f_bn(F.conv2d(x, sd[f"{prefix}.conv1.weight"]), sd, f"{prefix}.bn1"))
    out = F.relu(f_bn(F.conv2d(out, sd[f"{prefix}.conv2.weight"], stride=stride, padding=1),
                      sd, f"{prefix}.bn2"))
    out = f_bn(F.conv2d(out, sd[f"{prefix}.conv3.weight"]), sd, f"{prefix}.bn3")
    if f"{prefix}.downsample.0.weight" in sd:
        x = f_bn(F.conv2d(x, sd[f"{prefix}.downsample.0.weight"], stride=stride), sd,
                 f"{prefix}.downsample.1")
    return F.relu(out + x)


def f_resnet50_levels(x, sd):
    """conv1 s2 -> bn -> relu -> maxpool, layers with strides 1, 2, 2, 1 (METHOD.md 1)."""
    r = "resnet50"
    x = F.relu(f_bn(F.conv2d(x, sd[f"{r}.conv1.weight"], stride=2, padding=3), sd, f"{r}.bn1"))
    levels = [F.max_pool2d(x, 3, 2, 1)]
    for layer, (blocks, stride) in enumerate(zip([3, 4, 6, 3], [1, 2, 2, 1], strict=True), 1):
        x = levels[-1]
        for block in range(blocks):
            x = f_bottleneck(x, sd, f"{r}.layer{layer}.{block}", stride if block == 0 else 1)
        levels.append(x)
    return levels


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 70, 54, generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def test_cam_import_and_forward_match_functional(tmp_path, image):
    state = synthetic_reference("cam")
    checkpoint = import_reference("cam", save(tmp_path, state, "res50_cam.pth"), VOC_LIKE,
                                  tmp_path / "cam.pt")
    model = build_model(checkpoint).eval()
    features = f_resnet50_levels(image, state)[-1]
    expected_cam = F.relu(F.conv2d(features, state["classifier.weight"]))
    torch.testing.assert_close(model.cam(image), expected_cam, rtol=1e-4, atol=1e-5)
    expected_logits = F.conv2d(features.mean(dim=(2, 3), keepdim=True),
                               state["classifier.weight"]).flatten(1)
    torch.testing.assert_close(model(image), expected_logits, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "cam.pt").is_file()


@torch.no_grad()
def test_amn_import_and_forward_match_functional(tmp_path, image):
    state = synthetic_reference("amn", seed=1)
    model = build_model(import_reference("amn", save(tmp_path, state, "res50_amn.pth"),
                                         VOC_LIKE)).eval()
    labels = torch.zeros(2, 20)
    labels[0, 3] = labels[1, 7] = labels[1, 14] = 1
    features = f_resnet50_levels(image, state)[-1]
    conditioning = labels @ state["label_enc.weight"].T + state["label_enc.bias"]
    conditioned = features * conditioning[:, :, None, None]
    expected = sum(
        F.conv2d(conditioned, state[f"classifier.1.c{i}.weight"], state[f"classifier.1.c{i}.bias"],
                 padding=rate, dilation=rate)
        for i, rate in enumerate([6, 12, 18, 24])
    )
    torch.testing.assert_close(model(image, labels), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_irn_import_and_forward_match_functional(tmp_path, image):
    state = synthetic_reference("irn", seed=2)
    model = build_model(import_reference("irn", save(tmp_path, state, "res50_irn.pth"),
                                         VOC_LIKE)).eval()
    levels = f_resnet50_levels(image, state)
    edges = []
    for index, (level, scale) in enumerate(zip(levels, [1, 1, 2, 4, 4], strict=True), 1):
        edge = F.conv2d(level, state[f"fc_edge{index}.0.weight"])
        edge = F.group_norm(edge, 4, state[f"fc_edge{index}.1.weight"],
                            state[f"fc_edge{index}.1.bias"])
        if scale > 1:
            edge = F.interpolate(edge, scale_factor=scale, mode="bilinear", align_corners=False)
        edges.append(F.relu(edge))
    height, width = edges[1].shape[-2:]
    stacked = torch.cat([edge[..., :height, :width] for edge in edges], dim=1)
    expected = F.conv2d(stacked, state["fc_edge6.weight"], state["fc_edge6.bias"])
    torch.testing.assert_close(model(image), expected, rtol=1e-4, atol=1e-5)
    assert expected.shape[-2:] == ((70 - 1) // 4 + 1, (54 - 1) // 4 + 1)


@pytest.mark.parametrize("kind", ["cam", "amn", "irn"])
def test_export_then_import_is_identity(tmp_path, kind):
    checkpoint = import_reference(kind, save(tmp_path, synthetic_reference(kind), "ref.pth"),
                                  VOC_LIKE)
    exported = export_reference(checkpoint)
    assert set(exported) <= {key for key, _, _ in key_list(kind)}
    again = import_reference(kind, save(tmp_path, exported, "exported.pth"), VOC_LIKE)
    for key, value in checkpoint["model"].items():
        assert torch.equal(value, again["model"][key]), key


def test_export_refuses_networks_the_reference_cannot_read(tmp_path):
    checkpoint = import_reference("cam", save(tmp_path, synthetic_reference("cam"), "ref.pth"),
                                  VOC_LIKE)
    export_reference(checkpoint)  # the reference layout itself exports
    for field, value, said in [("depth", 18, "depth 18, not 50"),
                               ("width", 0.25, "width 0.25, not 1.0"),
                               ("strides", [2, 2, 1, 1], "strides [2, 2, 1, 1], not [2, 2, 2, 1]"),
                               ("dilations", [1, 1, 1, 2], "dilations [1, 1, 1, 2], not"),
                               ("stride_in_1x1", True, "stride_in_1x1 True, not False"),
                               ("stem_pool_ceil", True, "stem_pool_ceil True, not False")]:
        other = {**checkpoint, "backbone": {**checkpoint["backbone"], field: value}}
        with pytest.raises(AmnsegError, match="its cam network is not the authors' ResNet-50 "
                           rf"\({re.escape(said)}"):
            export_reference(other)
    # how it trained does not change what the reference reads
    export_reference({**checkpoint, "backbone": {**checkpoint["backbone"], "norm": "batch",
                                                 "fold_norm": True, "freeze_stem": False}})
    seg = {"format": "amnseg", "stage": "seg", "model": {},
           "backbone": dataclasses.asdict(deeplab_backbone())}
    for change, said in [({"backbone": checkpoint["backbone"]}, "depth 50, not 101"),
                         ({"input": "imagenet"}, "input imagenet, not caffe")]:
        with pytest.raises(AmnsegError, match=f"its seg network is not DeepLab-v2's ResNet-101 "
                           rf"\(.*{re.escape(said)}"):
            export_reference({**seg, **change})


def test_refusals(tmp_path):
    state = synthetic_reference("cam")
    path = save(tmp_path, state, "res50_cam.pth")
    with pytest.raises(AmnsegError, match="res50_cam.pth: checkpoint is for 20 classes, 80"):
        import_reference("cam", path, [f"c{i}" for i in range(80)])
    state["stage1.0.weight"] = state["stage1.0.weight"] + 1  # an alias that disagrees
    with pytest.raises(AmnsegError, match=r"bad.pth: stage1.0.weight is no weight of the "
                       r"authors' cam network and equals none of them \(the release's aliased "
                       r"copies do\): an unknown key, or a damaged copy$"):
        import_reference("cam", save(tmp_path, state, "bad.pth"), VOC_LIKE)
    wrong = synthetic_reference("cam")
    wrong["resnet50.layer1.0.conv1.weight"] = torch.zeros(3, 3)
    with pytest.raises(AmnsegError, match="layer1.0.conv1.weight has shape"):
        import_reference("cam", save(tmp_path, wrong, "wrong.pth"), VOC_LIKE)
    for other in ("amn", "irn"):  # a CAM file given as another kind
        with pytest.raises(AmnsegError, match=rf"res50_cam.pth: a reference cam checkpoint, "
                           rf"not {other} \(import it as cam\)"):
            import_reference(other, path, VOC_LIKE)
    amn_file = save(tmp_path, synthetic_reference("amn"), "res50_amn.pth")
    with pytest.raises(AmnsegError, match="res50_amn.pth: a reference amn checkpoint, not cam"):
        import_reference("cam", amn_file, VOC_LIKE)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(AmnsegError, match="junk.pth: not a readable checkpoint .not a PyTorch "
                       "file: neither a zip archive nor a pickle"):
        import_reference("cam", junk, VOC_LIKE)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:100])  # a zip archive cut short
    with pytest.raises(AmnsegError, match="broken.pth: not a readable checkpoint"):
        import_reference("cam", broken, VOC_LIKE)
    pickled = tmp_path / "pickled.pth"
    torch.save({"resnet50.conv1.weight": Unsafe()}, pickled)  # arbitrary objects never load
    with pytest.raises(AmnsegError, match="pickled.pth: not a readable checkpoint"):
        import_reference("cam", pickled, VOC_LIKE)


class Unsafe:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pipeline_with_published_checkpoints_trains_nothing(tmp_path):
    from conftest import write_tiny_folder_dataset

    from amnseg.config import load_config
    from amnseg.pipeline import run_pipeline

    data = write_tiny_folder_dataset(tmp_path / "data", count=4)
    (data / "classes.txt").write_text("\n".join(["square", "disc", *VOC_LIKE[2:]]) + "\n")
    paths = {kind: save(tmp_path, synthetic_reference(kind), f"res50_{kind}.pth")
             for kind in ("cam", "amn", "irn")}
    config = load_config("voc12_published", [
        f"run_dir={tmp_path / 'run'}", "device=cpu", "data.kind=folder", f"data.root={data}",
        "data.infer_split=train", "data.num_workers=0", "seeds.workers=1",
        "irn.infer_pad_size=0", "cam.scales=[1.0]", "amn.scales=[1.0]", "irn.exp_times=3",
        *[f"{kind}.checkpoint={path}" for kind, path in paths.items()],
    ])
    manifest = run_pipeline(config, stop="masks", progress=lambda message: None)
    assert all(record["status"] == "done" for record in manifest["stages"].values())
    assert "seg" not in manifest["stages"]
    run = tmp_path / "run"
    assert not list(run.rglob("last.pt")) and not list(run.rglob("log.jsonl"))  # no training
    assert len(list((run / "irn" / "masks").glob("*.png"))) == 4
    cam = build_model(load_checkpoint(run / "cam" / "cam.pt"))
    assert torch.equal(cam.classifier.weight, synthetic_reference("cam")["classifier.weight"])


def test_an_irn_file_is_named_whatever_kind_it_is_imported_as(tmp_path):
    path = save(tmp_path, synthetic_reference("irn"), "res50_irn.pth")
    for other in ("cam", "amn"):
        with pytest.raises(AmnsegError, match=rf"res50_irn.pth: a reference irn checkpoint, "
                           rf"not {other} \(import it as irn\)"):
            import_reference(other, path, VOC_LIKE)


def test_amn_file_for_other_classes_names_both_counts(tmp_path):
    path = save(tmp_path, synthetic_reference("amn"), "res50_amn.pth")
    with pytest.raises(AmnsegError, match="res50_amn.pth: checkpoint is for 20 classes, 3 class "
                       "names given"):
        import_reference("amn", path, ["a", "b", "c"])


def test_aliases_are_compared_value_by_value(tmp_path):
    """An alias with the same values in another order (same sums, same absolute sums) or with
    one value's sign flipped against another's is not the canonical tensor; 1-element and
    integer aliases are compared too."""
    for name, edit in {
        "reversed": lambda t: t.flatten().flip(0).reshape(t.shape),
        "swapped_signs": lambda t: torch.cat([-t.flatten()[:1], t.flatten()[1:]]).reshape(
            t.shape),
    }.items():
        state = synthetic_reference("cam")
        state["stage1.0.weight"] = edit(state["stage1.0.weight"])
        with pytest.raises(AmnsegError, match="stage1.0.weight is no weight of the authors'"):
            import_reference("cam", save(tmp_path, state, f"{name}.pth"), VOC_LIKE)
    for alias, value in {"stage1.0.bn.num_batches_tracked": torch.tensor(12345),
                         "stage1.0.one": torch.tensor([0.5])}.items():
        state = synthetic_reference("cam")
        state[alias] = value
        with pytest.raises(AmnsegError, match=f"{alias} is no weight of the authors' cam "):
            import_reference("cam", save(tmp_path, state, "scalar.pth"), VOC_LIKE)
    # The same scalar as a canonical one is an alias that agrees.
    state = synthetic_reference("cam")
    state["stage1.0.bn.num_batches_tracked"] = state["resnet50.bn1.num_batches_tracked"].clone()
    import_reference("cam", save(tmp_path, state, "fine.pth"), VOC_LIKE)


def test_imported_networks_keep_the_reference_stem_frozen(tmp_path):
    """The release never trains conv1 and bn1; a stage that starts from an imported network's
    backbone (backbone_init=cam) must not either."""
    checkpoint = import_reference("cam", save(tmp_path, synthetic_reference("cam"), "c.pth"),
                                  VOC_LIKE)
    backbone = build_model(checkpoint).backbone
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1.weight", "bn1.weight", "bn1.bias"}


@pytest.mark.parametrize("content, words", [
    ([1, 2], "not a checkpoint (it holds a list"),
    (torch.zeros(3), "not a checkpoint (it holds a Tensor"),
    ({1: torch.zeros(1)}, "not a checkpoint (a key 1 that is not a name)"),
    ({"resnet50.conv1.weight": 5}, "resnet50.conv1.weight is not a tensor but int"),
])
def test_files_that_are_not_state_dicts_are_named(tmp_path, content, words):
    from amnseg.checkpoints import import_deeplab, load_model

    path = tmp_path / "odd.pth"
    torch.save(content, path)
    for load in (lambda: import_reference("cam", path, VOC_LIKE),
                 lambda: load_model(path, "cam", VOC_LIKE)):
        with pytest.raises(AmnsegError, match=rf"odd.pth: .*{re_escape(words)}"):
            load()
    with pytest.raises(AmnsegError, match="odd.pth: "):
        import_deeplab(path, VOC_LIKE)


def test_authors_file_given_for_the_seg_stage_is_named(tmp_path):
    from amnseg.checkpoints import load_model

    path = save(tmp_path, synthetic_reference("cam"), "res50_cam.pth")
    with pytest.raises(AmnsegError, match="res50_cam.pth: an authors' cam checkpoint, not a seg"):
        load_model(path, "seg", VOC_LIKE)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_zips_that_torch_did_not_write_and_cut_archives_are_named(tmp_path):
    import numpy as np

    np.savez(tmp_path / "maps.npz", a=np.zeros(3))
    with pytest.raises(AmnsegError, match=r"maps.npz: not a readable checkpoint \(a zip "
                       r"archive, but not one torch.save wrote: no data.pkl\)"):
        import_reference("cam", tmp_path / "maps.npz", VOC_LIKE)
    whole = save(tmp_path, synthetic_reference("cam"), "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AmnsegError, match=r"cut.pth: not a readable checkpoint \(a zip archive "
                       r"cut short or damaged\)"):
        import_reference("cam", tmp_path / "cut.pth", VOC_LIKE)


def test_a_state_dict_without_resnet_weights_is_not_called_corrupt(tmp_path):
    path = save(tmp_path, {"a": torch.zeros(3)}, "rand.pth")
    for kind in ("cam", "amn", "irn"):
        with pytest.raises(AmnsegError, match=rf"rand.pth: not an authors' {kind} checkpoint "
                           r"\(no resnet50.\* weights\)"):
            import_reference(kind, path, VOC_LIKE)


def test_authors_files_saved_inside_a_wrapper_or_by_dataparallel_are_imported(tmp_path):
    """{"state_dict": ...}, {"model": ...} and DataParallel's module. keys hold the same
    weights; an unknown key and a missing one are named as the file names them."""
    state = synthetic_reference("amn")
    expected = import_reference("amn", save(tmp_path, state, "plain.pth"), VOC_LIKE)["model"]
    for name, wrapped in {
        "state_dict": {"state_dict": state, "epoch": 5},
        "model": {"model": state, "optimizer": {}},
        "module": {f"module.{key}": value for key, value in state.items()},
        "both": {"state_dict": {f"module.{key}": value for key, value in state.items()}},
    }.items():
        got = import_reference("amn", save(tmp_path, wrapped, f"{name}.pth"), VOC_LIKE)["model"]
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[key], expected[key]) for key in expected), name
    extra = {**state, "extra.weight": torch.full((3,), 7.0)}
    with pytest.raises(AmnsegError, match=r"extra.pth: extra.weight is no weight of the authors' "
                       r"amn network"):
        import_reference("amn", save(tmp_path, extra, "extra.pth"), VOC_LIKE)
    missing = {key: value for key, value in state.items() if key != "resnet50.bn1.weight"}
    with pytest.raises(AmnsegError, match=r"missing.pth: not a reference amn checkpoint: "
                       r"resnet50.bn1.weight is missing$"):
        import_reference("amn", save(tmp_path, missing, "missing.pth"), VOC_LIKE)
    missing = {key: value for key, value in state.items() if key != "label_enc.weight"}
    with pytest.raises(AmnsegError, match=r"missing.pth: not a reference amn checkpoint: "
                       r"label_enc.weight is missing$"):
        import_reference("amn", save(tmp_path, missing, "missing.pth"), VOC_LIKE)


def test_a_training_state_given_as_a_checkpoint_points_to_the_stage_file(tmp_path):
    from amnseg.checkpoints import load_model

    path = save(tmp_path, {"model": {}, "optimizer": {}, "scheduler": {}, "epochs_done": 3},
                "last.pt")
    with pytest.raises(AmnsegError, match=r"last.pt: expected an amnseg amn checkpoint, found a "
                       r"training state \(last.pt: resumes training; the trained network is "
                       r"<run_dir>/amn/amn.pt\)"):
        load_model(path, "amn", VOC_LIKE)
