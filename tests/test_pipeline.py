"""`amnseg run`: every stage on a tiny dataset, skipping, invalidation, kill + resume, report."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_config, write_tiny_folder_dataset

from amnseg.pipeline import STAGE_NAMES, load_manifest, run_pipeline
from amnseg.report.html import build_report

FAST = [
    "cam.epochs=1", "amn.epochs=1", "irn.epochs=1", "amn.batch_size=4", "irn.batch_size=4",
    "amn.crop_size=32", "irn.crop_size=32", "irn.radius=3", "irn.backbone_init=cam",
    "irn.infer_pad_size=0", "amn.eval_images=2", "seeds.workers=1", "cam.scales=[1.0,0.5]",
    "amn.scales=[1.0,0.5]", "irn.exp_times=4", "seg.backbone.depth=18",
    "seg.backbone.width=0.125", "seg.init=null", "seg.iterations=3", "seg.batch_size=2",
    "seg.accumulation=2", "seg.crop_size=32", "seg.eval_images=2", "seg.crf_workers=1",
]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".npz", ".png")
        and p.parent.name in ("maps", "cam", "amn", "masks")
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = write_tiny_folder_dataset(root / "data", count=8)
    config = tiny_config(data, root / "run", *FAST)
    messages: list[str] = []
    manifest = run_pipeline(config, progress=messages.append)
    return config, manifest, messages


def test_all_stages_complete_with_metrics(finished_run):
    config, manifest, messages = finished_run
    assert list(manifest["stages"]) == [n for n in STAGE_NAMES if n != "seg_gt"]  # not enabled
    assert "[skip] seg_gt: not enabled by this config" in messages
    assert all(r["status"] == "done" for r in manifest["stages"].values())
    metrics = manifest["stages"]["masks"]["metrics"]
    run = Path(config.run_dir)
    # The reported mIoU is that of the mask files against the GT, recomputed here.
    from amnseg.data import build_dataset
    from amnseg.data.base import read_index_png
    from amnseg.metrics import confusion_matrix, miou

    dataset = build_dataset(config.data, config.data.infer_split)
    confusion = sum(
        confusion_matrix(read_index_png(run / "irn" / "masks" / f"{stem}.png"),
                         dataset.mask(stem), dataset.num_classes + 1)
        for stem in dataset.stems
    )
    assert metrics["pseudo_masks_miou"] == pytest.approx(miou(confusion))
    for folder, suffix in [("cam/maps", ".npz"), ("seeds/cam", ".png"), ("amn/maps", ".npz"),
                           ("seeds/amn", ".png"), ("irn/masks", ".png")]:
        assert len(list((run / folder).glob(f"*{suffix}"))) == 8, folder
    leftovers = [p for p in run.rglob("*")
                 if (p.name.startswith(".") and p.name != ".amnseg.lock") or p.suffix == ".tmp"]
    assert not leftovers


def test_rerun_skips_everything(finished_run):
    config, _, _ = finished_run
    before = digest(Path(config.run_dir))
    messages: list[str] = []
    run_pipeline(config, progress=messages.append)
    assert all(m.startswith("[skip]") for m in messages) and len(messages) == len(STAGE_NAMES)
    assert digest(Path(config.run_dir)) == before


def test_changed_amn_option_reruns_from_amn(finished_run):
    config, _, _ = finished_run
    run = Path(config.run_dir)
    cam_maps = digest(run / "cam")
    changed = tiny_config(Path(config.data.root), run, *FAST, "amn.label_smoothing=0.3")
    messages: list[str] = []
    run_pipeline(changed, progress=messages.append)
    ran = [m.split()[1].rstrip(":") for m in messages if m.startswith("[run")]
    assert ran == [n for n in STAGE_NAMES[STAGE_NAMES.index("amn"):] if n != "seg_gt"]
    assert digest(run / "cam") == cam_maps  # upstream outputs untouched
    # The outputs of a finished stage are not replaced silently: the changed option is named
    # for the stage it belongs to, the later ones say an earlier stage changed.
    said = [m for m in messages if m.startswith("[run]")]
    assert said[0].endswith("(amn.label_smoothing changed since it ran: its outputs are "
                            "replaced)"), said[0]
    assert all(m.endswith("(its options or data changed since it ran, or an earlier stage "
                          "did: its outputs are replaced)") for m in said[1:]), said
    # the original config is now "changed" again: back to it re-runs the same stages
    messages.clear()
    run_pipeline(config, progress=messages.append)
    assert [m.split()[1].rstrip(":") for m in messages if m.startswith("[run")] == ran


def test_report_renders(finished_run):
    config, _, _ = finished_run
    report = build_report(Path(config.run_dir))
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Best and worst images" in text
    assert text.count("data:image/png;base64,") >= 10
    assert "http://" not in text and "https://" not in text  # nothing fetched from outside


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import tiny_config
from amnseg.pipeline import run_pipeline
import amnseg.stages.common as common
if {slow}:
    original = common.save_score_maps
    calls = []
    def save_then_hang(*args, **kwargs):
        import time
        original(*args, **kwargs)
        calls.append(1)
        print("saved", flush=True)
        if len(calls) == 3:
            time.sleep(600)  # wait here to be killed in the middle of the stage
    common.save_score_maps = save_then_hang
config = tiny_config(Path({data!r}), Path({run!r}), *{fast!r})
run_pipeline(config, stop="cam_maps")
"""


def run_script(data: Path, run: Path, slow: bool) -> subprocess.Popen:
    code = SCRIPT.format(tests=str(Path(__file__).parent), slow=slow, data=str(data),
                         run=str(run), fast=FAST)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def test_killed_map_stage_resumes_to_identical_outputs(tmp_path):
    data = write_tiny_folder_dataset(tmp_path / "data", count=8)
    straight = run_script(data, tmp_path / "straight", slow=False)
    assert straight.wait(timeout=300) == 0

    victim = run_script(data, tmp_path / "killed", slow=True)
    saved = 0
    deadline = time.time() + 300
    while saved < 3 and time.time() < deadline:
        if victim.stdout.readline().startswith("saved"):
            saved += 1
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    maps = tmp_path / "killed" / "cam" / "maps"
    written = list(maps.glob("*.npz"))
    assert len(written) == 3  # killed in the middle of the map stage
    assert load_manifest(tmp_path / "killed")["stages"]["cam_maps"]["status"] == "running"

    resumed = run_script(data, tmp_path / "killed", slow=False)
    assert resumed.wait(timeout=300) == 0
    assert digest(tmp_path / "killed" / "cam") == digest(tmp_path / "straight" / "cam")
    assert not [p for p in maps.iterdir() if not p.name.endswith(".npz")]


def test_report_opens_in_chromium_with_all_pictures(finished_run, tmp_path):
    from amnseg.report.screenshot import broken_images, find_browser, screenshot

    if find_browser() is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium')")
    config, _, _ = finished_run
    page = build_report(Path(config.run_dir))
    assert broken_images(page) == 0
    png = screenshot(page, tmp_path / "report.png", height=900)
    assert png.stat().st_size > 10_000


def amnseg_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amnseg.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_cli_sweep_and_status(finished_run):
    config, _, _ = finished_run
    run = Path(config.run_dir)
    result = amnseg_cli("sweep", str(run / "config.json"), "--maps", f"CAM={run / 'cam/maps'}",
                        "--maps", f"AMN={run / 'amn/maps'}")
    assert result.returncode == 0, result.stderr
    assert "Threshold robustness" in result.stdout
    commands = run / "eval" / "commands"
    assert (commands / "CAM_sweep.json").is_file() and (commands / "sweep.png").is_file()
    # The run's own evaluation files are left as the run wrote them (the report reads them).
    before = {p.name: p.read_bytes() for p in (run / "eval").glob("*.json")}
    result = amnseg_cli("eval", str(run / "config.json"), "--maps", str(run / "amn/maps"),
                        "--name", "cam", "--threshold", "0.5")
    assert result.returncode == 0, result.stderr
    assert str(commands / "cam_sweep.json") in " ".join(result.stdout.split())
    assert json.loads((commands / "cam_sweep.json").read_text())["threshold"] == 0.5
    result = amnseg_cli("eval-seg", str(run / "config.json"), "seg.eval_crf=false")
    assert result.returncode == 0, result.stderr
    assert json.loads((commands / "seg.json").read_text())["crf"] is None
    assert {p.name: p.read_bytes() for p in (run / "eval").glob("*.json")} == before
    status = amnseg_cli("status", str(run))
    assert status.returncode == 0 and "pseudo_masks_miou" in status.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train-cam", "voc12", "data.root=/nonexistent/voc"], "/nonexistent/voc: VOC2012 folder"),
        (["eval", "voc12", "data.root=/nonexistent/voc", "--maps", "/nonexistent/maps"],
         "/nonexistent/voc: VOC2012 folder"),
        (["train-cam", "voc12", "cam.epochz=3"], "cam.epochz: unknown option (did you mean"),
        (["run", "voc12", "--from", "nope"], "unknown stage 'nope'"),
        (["status", "/nonexistent/run"], "/nonexistent/run: run folder not found"),
        (["report", "/nonexistent/run"], "/nonexistent/run: run folder not found"),
        (["status", "/"], "/: no manifest.json"),
        (["report", "/", "--png", "/tmp"], "--png /tmp: is a folder; give a file name ending in"),
        (["report", "/", "--png", "/tmp/page.jpg"], "--png /tmp/page.jpg: the file name must end "
         "in .png"),
        (["eval-seg", "demo"], "seg/seg.pt: no trained segmentation network in this run"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path):
    if args[0] not in ("status", "report"):
        args = [*args, f"run_dir={tmp_path / 'run'}"]  # nothing is written into the checkout
    result = amnseg_cli(*args)
    if args[0] in ("eval-seg", "train-cam", "eval"):
        assert not (tmp_path / "run").exists()  # nothing left behind by a command that failed
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amnseg: error:") and message in lines[0]


def test_report_flags_a_best_threshold_at_the_bottom_of_the_sweep():
    from amnseg.report.html import _robustness_table

    result = {"best_threshold": 0.0, "thresholds": [0.0, 0.05, 0.1], "best_miou": 0.4,
              "oracle_miou": 0.5, "miou_range": 0.1, "optimal_threshold_mean": 0.0,
              "optimal_threshold_std": 0.0, "fg_bg_gap": 0.1, "robust_range": [0.1, 0.6]}
    flagged = _robustness_table({"cam_sweep": result})
    assert "lowest threshold of the sweep" in flagged
    fine = _robustness_table({"cam_sweep": dict(result, best_threshold=0.05)})
    assert "lowest threshold" not in fine


def test_sweep_plot_is_titled_for_maps(tmp_path):
    import inspect

    from amnseg.report import plots

    source = inspect.getsource(plots.plot_sweep)
    assert "Map mIoU against the background threshold" in source and "Seed mIoU" not in source


def test_eval_threshold_defaults_to_the_map_kinds_own(tmp_path):
    from amnseg.cli import _threshold, map_kind
    from amnseg.config import load_config
    from amnseg.errors import AmnsegError

    config = load_config(None, [])
    assert map_kind(tmp_path / "run" / "amn" / "maps", None) == "amn"
    assert map_kind(tmp_path / "run" / "cam" / "maps", None) == "cam"
    assert map_kind(tmp_path / "elsewhere", "amn") == "amn"
    assert _threshold(config, "amn", None) == 0.25 and _threshold(config, "cam", None) == 0.15
    assert _threshold(config, "amn", 0.4) == 0.4
    with pytest.raises(AmnsegError, match="--kind irn"):
        map_kind(tmp_path, "irn")


def test_from_seg_with_a_pseudo_mask_gone_keeps_the_seg_outputs(finished_run, tmp_path):
    import shutil

    from amnseg.errors import AmnsegError

    config, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(config.run_dir, run)
    from amnseg.config import load_config

    moved = load_config(str(run / "config.json"), [f"run_dir={run}", "seg.iterations=4"])
    gone = sorted((run / "irn" / "masks").glob("*.png"))[0]
    gone.unlink()
    before = (run / "seg" / "seg.pt").read_bytes()
    with pytest.raises(AmnsegError, match=rf"{gone.name}: mask not found"):
        run_pipeline(moved, start="seg", progress=lambda line: None)
    assert (run / "seg" / "seg.pt").read_bytes() == before


def test_changed_evaluation_options_evaluate_again_and_keep_the_outputs(finished_run, tmp_path):
    """The threshold of the map evaluation and the segmentation net's test-time options are
    evaluation options: changing them evaluates again; nothing is made or trained again."""
    import json
    import shutil

    config, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(config.run_dir, run)
    outputs, network = digest(run), (run / "seg" / "seg.pt").read_bytes()
    changed = tiny_config(Path(config.data.root), run, *FAST, "cam.eval_threshold=0.35",
                          "seg.eval_flip=true", "seg.eval_crf=false")
    messages: list[str] = []
    manifest = run_pipeline(changed, progress=messages.append)
    why = " (its evaluation options or data changed: evaluating again)"
    assert [m for m in messages if not m.startswith("[skip]")] == [
        f"[evaluate] cam_maps{why}", f"[evaluate] seg{why}"]
    assert digest(run) == outputs and (run / "seg" / "seg.pt").read_bytes() == network
    sweep = json.loads((run / "eval" / "cam_sweep.json").read_text())
    metrics = manifest["stages"]["cam_maps"]["metrics"]
    assert sweep["threshold"] == 0.35
    assert metrics["cam_miou_at_threshold"] == sweep["miou"][sweep["thresholds"].index(0.35)]
    assert metrics["images"] == 8  # what the stage itself recorded is kept
    seg = json.loads((run / "eval" / "seg.json").read_text())
    assert seg["flip"] is True and seg["crf"] is None
    metrics = manifest["stages"]["seg"]["metrics"]
    # The CRF figure of the earlier evaluation is gone with it; the training's record stays.
    assert "seg_crf_miou" not in metrics and metrics["seg_miou"] == seg["no_crf"]["miou"]
    assert metrics["train_images"] == 8
    messages.clear()
    run_pipeline(changed, progress=messages.append)
    assert all(m.startswith("[skip]") for m in messages)
    # A record from before evaluations had fingerprints is evaluated once.
    del manifest["stages"]["masks"]["eval_fingerprint"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    messages.clear()
    run_pipeline(changed, progress=messages.append)
    assert [m for m in messages if not m.startswith("[skip]")] == [f"[evaluate] masks{why}"]


def test_stages_made_with_other_options_are_out_of_date_in_status_and_report(finished_run,
                                                                              tmp_path):
    """After `run --to cam_seeds` with other seed thresholds, the later stages were made from
    the old seeds: status and the report say so, and the report labels every seed row with the
    thresholds that made it."""
    import shutil

    from amnseg.pipeline import load_run_config, stale_stages

    config, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(config.run_dir, run)
    changed = tiny_config(Path(config.data.root), run, *FAST, "seeds.cam_fg_threshold=0.35")
    manifest = run_pipeline(changed, stop="cam_seeds", progress=lambda line: None)
    assert manifest["stages"]["cam_seeds"]["options"]["seeds.cam_fg_threshold"] == 0.35
    assert manifest["stages"]["amn_seeds"]["options"]["seeds.amn_fg_threshold"] == 0.45
    later = ["amn", "amn_maps", "amn_seeds", "irn", "masks", "seg"]
    assert stale_stages(load_run_config(run), manifest) == later
    # Against the config that made the later stages, only the new seeds are out of date.
    assert stale_stages(tiny_config(Path(config.data.root), run, *FAST), manifest) == [
        "cam_seeds"]
    status = amnseg_cli("status", str(run))
    assert status.returncode == 0, status.stderr
    said = " ".join(status.stdout.split())  # lines wrapped at the terminal's width
    assert f"out of date: {', '.join(later)} (made with other options" in said
    assert "done, out of date" in status.stdout
    again = amnseg_cli("run", str(run / "config.json"), "--to", "cam_seeds")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done, out of date") == len(later)
    text = build_report(run).read_text()
    assert "CAM seeds (CRF, 0.35/0.05)</th>" in text
    assert "AMN seeds (CRF, 0.45/0.15) ⚠ out of date" in text
    assert "Pseudo masks (IRN random walk) ⚠ out of date" in text
    assert "CAM maps (best threshold) t=" in text and "CAM maps (best threshold) ⚠" not in text
    assert "trained on the pseudo masks ⚠ out of date" in text
    assert text.count("<td>done, out of date</td>") == len(later)


def test_from_seg_gt_needs_none_of_the_pseudo_mask_stages(tmp_path):
    """The upper bound trains on the ground truth: `run --from seg_gt` on a new folder trains
    it alone, while `--from seg` still wants the stages that make its masks."""
    from amnseg.errors import AmnsegError

    data = write_tiny_folder_dataset(tmp_path / "data", count=4)
    config = tiny_config(data, tmp_path / "run", *FAST, "seg.upper_bound=true")
    with pytest.raises(AmnsegError, match="stage cam is not done with this config"):
        run_pipeline(config, start="seg", progress=lambda line: None)
    messages: list[str] = []
    manifest = run_pipeline(config, start="seg_gt", progress=messages.append)
    assert list(manifest["stages"]) == ["seg_gt"]
    assert manifest["stages"]["seg_gt"]["status"] == "done"
    assert (tmp_path / "run" / "seg_gt" / "seg_gt.pt").is_file()
    assert messages[-1].startswith("[run] seg_gt")
    # Its val images are training images (this dataset's val is half of train): said.
    assert ("note: all 2 images of data.val_split='val' are in data.train_split='train': the "
            "segmentation network's val mIoU is measured on images it trained on") in messages


def test_val_images_apart_from_the_training_images_need_no_note(tmp_path):
    from amnseg.pipeline import _note_val_inside_train

    data = write_tiny_folder_dataset(tmp_path / "data", count=4)
    stems = (data / "splits" / "train.txt").read_text().split("\n")[:4]
    (data / "splits" / "train.txt").write_text("\n".join(stems[:3]) + "\n")
    (data / "splits" / "val.txt").write_text(stems[3] + "\n")
    notes: list[str] = []
    _note_val_inside_train(tiny_config(data, tmp_path / "run"), notes.append)
    assert notes == []
    (data / "splits" / "val.txt").write_text(stems[2] + "\n")
    _note_val_inside_train(tiny_config(data, tmp_path / "run"), notes.append)
    assert len(notes) == 1 and notes[0].startswith("note: all 1 images")


def test_status_with_a_damaged_config_still_shows_the_manifest(finished_run, tmp_path):
    import shutil

    config, _, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(config.run_dir, run)
    (run / "config.json").write_text("{not json")
    status = amnseg_cli("status", str(run))
    assert status.returncode == 0, status.stderr
    assert "pseudo_masks_miou" in status.stdout
    said = " ".join(status.stdout.split())  # lines wrapped at the terminal's width
    assert "which stages are out of date is unknown:" in said
    assert "config.json: not valid JSON" in said
    # A value of the wrong type: the file and the option are named.
    (run / "config.json").write_text(json.dumps({"cam": {"epochs": "x"}}))
    report = amnseg_cli("report", str(run))
    assert report.returncode == 2
    assert f"{run / 'config.json'}: cam.epochs: Value 'x' of type 'str' could not be " \
        "converted to Integer" in " ".join(report.stderr.split())
