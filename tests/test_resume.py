"""Exact resume: every training stage killed mid-epoch and every per-image stage killed at
several points resumes to byte-identical outputs; stale inputs and missing outputs rerun what
they must; a second run on the same folder is refused."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config, write_tiny_folder_dataset
from test_pipeline import FAST

from amnseg import training
from amnseg.errors import AmnsegError
from amnseg.io import load_checkpoint
from amnseg.pipeline import STAGE_NAMES, load_manifest, run_folder_lock, run_pipeline

# Two epochs everywhere, so that a kill in the second epoch resumes from a checkpoint.
TWO_EPOCHS = [*FAST, "cam.epochs=2", "amn.epochs=2", "irn.epochs=2", "seg.iterations=4",
              "seg.eval_images=0", "backbone.norm=batch"]


def config_for(data: Path, run: Path, *extra: str):
    return tiny_config(data, run, *TWO_EPOCHS, *extra)


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".pt", ".npz",
                                                                               ".png")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete run (the uninterrupted reference) and its dataset."""
    root = tmp_path_factory.mktemp("resume")
    data = write_tiny_folder_dataset(root / "data", count=8)
    config = config_for(data, root / "straight")
    run_pipeline(config, progress=lambda line: None)
    return data, root


def upstream_copy(finished, stage: str, name: str) -> Path:
    """A copy of the finished run with ``stage`` and everything after it undone."""
    data, root = finished
    target = root / name
    shutil.copytree(root / "straight", target)
    config = config_for(data, target)
    run_pipeline(config, progress=lambda line: None)  # all up to date
    manifest = load_manifest(target)
    for later in STAGE_NAMES[STAGE_NAMES.index(stage):]:
        manifest["stages"].pop(later, None)
    from amnseg.io import save_json

    save_json(target / "manifest.json", manifest)
    for folder in {"cam": ["cam"], "amn": ["amn"], "irn": ["irn"], "seg": ["seg"]}.get(stage, []):
        shutil.rmtree(target / folder)
    return target


@pytest.mark.parametrize("kill_at_step", [1, 3])
@pytest.mark.parametrize("stage", ["cam", "amn", "irn", "seg"])
def test_training_stage_killed_mid_epoch_resumes_bit_identically(finished, stage, kill_at_step,
                                                                 monkeypatch):
    data, root = finished
    run = upstream_copy(finished, stage, f"killed_{stage}_{kill_at_step}")
    original = training.train_step
    steps = {"count": 0}

    def dies_in_second_epoch(*args, **kwargs):
        loss = original(*args, **kwargs)
        steps["count"] += 1
        if steps["count"] == kill_at_step:  # epochs have 2 steps: mid-epoch 1 or 2
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(training, "train_step", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config_for(data, run), stage, stage, progress=lambda line: None)
    assert load_manifest(run)["stages"][stage]["status"] == "interrupted"
    assert (run / stage / "last.pt").is_file() == (kill_at_step > 2)
    assert not (run / stage / f"{stage}.pt").exists()
    monkeypatch.setattr(training, "train_step", original)
    run_pipeline(config_for(data, run), stage, stage, progress=lambda line: None)
    expected = (root / "straight" / stage / f"{stage}.pt").read_bytes()
    assert (run / stage / f"{stage}.pt").read_bytes() == expected  # byte-identical file
    reference = load_checkpoint(root / "straight" / stage / f"{stage}.pt")["model"]
    assert all(reference[k].equal(v) for k, v in
               load_checkpoint(run / stage / f"{stage}.pt")["model"].items())
    log = (run / stage / "log.jsonl").read_text().splitlines()
    assert len(log) == 2  # one line per epoch, none repeated


@pytest.mark.parametrize("stage, folder, saver", [
    ("cam_maps", "cam/maps", "amnseg.stages.common.save_score_maps"),
    ("cam_seeds", "seeds/cam", "amnseg.stages.seeds.save_label_png"),
    ("amn_maps", "amn/maps", "amnseg.stages.common.save_score_maps"),
    ("amn_seeds", "seeds/amn", "amnseg.stages.seeds.save_label_png"),
    ("masks", "irn/masks", "amnseg.stages.irn.save_label_png"),
])
@pytest.mark.parametrize("kill_after", [1, 5])
def test_per_image_stage_killed_resumes_to_identical_files(finished, stage, folder, saver,
                                                           kill_after, monkeypatch):
    data, root = finished
    run = upstream_copy(finished, stage, f"killed_{stage}_{kill_after}")
    shutil.rmtree(run / folder)
    module_name, function = saver.rsplit(".", 1)
    import importlib

    module = importlib.import_module(module_name)
    original = getattr(module, function)
    written = []

    def dies_after(*args, **kwargs):
        original(*args, **kwargs)
        written.append(args[0])
        if len(written) == kill_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, function, dies_after)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config_for(data, run), stage, stage, progress=lambda line: None)
    assert len(list((run / folder).iterdir())) == kill_after
    monkeypatch.setattr(module, function, original)
    run_pipeline(config_for(data, run), progress=lambda line: None)
    assert files_digest(run / folder) == files_digest(root / "straight" / folder)
    assert not [p for p in run.rglob("*.tmp")]


def test_leftover_temporary_files_are_removed_at_start(finished):
    data, root = finished
    run = upstream_copy(finished, "masks", "leftovers")
    stale = run / "cam" / "maps" / ".img 00.npz.0123456789ab.tmp"
    stale.write_bytes(b"half a file")
    also = run / "irn" / ".last.pt.abcdef012345.tmp"
    also.write_bytes(b"half a checkpoint")
    # Not its own: a user's file of another shape, another command's file in a folder no
    # stage writes (e.g. predict --out <run>/preds).
    kept = [run / "cam" / ".draft.tmp", run / "preds" / ".a.png.0123456789ab.tmp",
            run / "cam" / "maps" / ".img 00.npz.0123.tmp"]
    for path in kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"mine")
    messages: list[str] = []
    run_pipeline(config_for(data, run), progress=messages.append)
    assert not stale.exists() and not also.exists()
    assert any("removed 2 temporary files" in m for m in messages)
    assert all(path.read_bytes() == b"mine" for path in kept)


def test_second_run_on_the_same_folder_is_refused(finished):
    data, root = finished
    run = root / "straight"
    busy = r"another amnseg run \(pid \d+\) is using"
    with run_folder_lock(run), pytest.raises(AmnsegError, match=busy):
        run_pipeline(config_for(data, run), progress=lambda line: None)
    run_pipeline(config_for(data, run), progress=lambda line: None)  # free again


def ran(messages: list[str]) -> list[str]:
    return [m.split()[1].rstrip(":") for m in messages if m.startswith("[run]")]


def test_stale_inputs_and_missing_outputs_rerun_what_they_must(tmp_path):
    data = write_tiny_folder_dataset(tmp_path / "data", count=8)
    config = config_for(data, tmp_path / "run")
    run_pipeline(config, progress=lambda line: None)

    messages: list[str] = []
    run_pipeline(config, progress=messages.append)
    assert ran(messages) == []

    # A deleted output: only its stage runs again (resuming), and puts it back.
    victim = tmp_path / "run" / "seeds" / "amn" / "img 03.png"
    before = victim.read_bytes()
    victim.unlink()
    messages.clear()
    run_pipeline(config, progress=messages.append)
    assert ran(messages) == ["amn_seeds"] and "1 output files missing" in " ".join(messages)
    assert victim.read_bytes() == before

    # A deleted checkpoint: the training stage resumes from its state and rewrites it.
    (tmp_path / "run" / "irn" / "irn.pt").unlink()
    messages.clear()
    run_pipeline(config, progress=messages.append)
    assert ran(messages) == ["irn"]

    # Changed labels: everything from the CAM classifier on.
    labels = data / "labels.csv"
    rows = labels.read_text().splitlines()
    rows[1] = rows[1].split(",")[0] + ",square;disc"
    labels.write_text("\n".join(rows) + "\n")
    messages.clear()
    run_pipeline(config, progress=messages.append)
    assert ran(messages) == [n for n in STAGE_NAMES if n != "seg_gt"]

    # A replaced image (same name, other content): again everything.
    image = next((data / "images").iterdir())
    image.write_bytes((data / "images" / "img 05.png").read_bytes())
    messages.clear()
    run_pipeline(config, progress=messages.append)
    assert ran(messages)[0] == "cam" and len(ran(messages)) == len(STAGE_NAMES) - 1

    # A changed val mask: only the stage that evaluates on val.
    val_mask = data / "masks" / "img 00.png"
    content = val_mask.read_bytes()
    val_mask.write_bytes(content)  # same bytes, new modification time
    import os

    os.utime(val_mask, ns=(1, 1))
    messages.clear()
    run_pipeline(config, progress=messages.append)
    assert "cam" in ran(messages)  # img 00 is also a training image here: everything reruns


def test_an_epoch_logged_twice_by_a_killed_run_is_logged_once(finished, monkeypatch):
    data, root = finished
    run = upstream_copy(finished, "irn", "killed_after_log")
    original = training.TrainingState.save
    saves = {"count": 0}

    def dies_before_second_save(self, *args, **kwargs):
        saves["count"] += 1
        if saves["count"] == 2:  # epoch 2 is logged, its state not saved
            raise KeyboardInterrupt
        original(self, *args, **kwargs)

    monkeypatch.setattr(training.TrainingState, "save", dies_before_second_save)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config_for(data, run), "irn", "irn", progress=lambda line: None)
    assert len((run / "irn" / "log.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(training.TrainingState, "save", original)
    run_pipeline(config_for(data, run), "irn", "irn", progress=lambda line: None)
    epochs = [line for line in (run / "irn" / "log.jsonl").read_text().splitlines()]
    assert [__import__("json").loads(e)["epoch"] for e in epochs] == [1, 2]
    assert (run / "irn" / "irn.pt").read_bytes() == (root / "straight" / "irn" / "irn.pt"
                                                      ).read_bytes()


def test_a_run_folders_config_reads_back_as_written(tmp_path):
    """status and report read a run's config.json: every option as the run had it (not the
    defaults under it), its run_dir where the folder is now, and a bad value named with the
    file."""
    import json

    from amnseg.config import config_to_dict, load_config
    from amnseg.pipeline import RUN_CONFIG, load_run_config

    config = load_config("demo", ["cam.epochs=7", "seeds.amn_fg_threshold=0.5",
                                  "seg.msc_scales=[0.25]", "eval.robust_range=[0.2,0.3]"])
    (tmp_path / RUN_CONFIG).write_text(json.dumps(config_to_dict(config)))
    read = load_run_config(tmp_path)
    assert read.run_dir == str(tmp_path)
    read.run_dir = config.run_dir
    assert config_to_dict(read) == config_to_dict(config)
    values = config_to_dict(config)
    values["cam"]["epochs"] = 0
    (tmp_path / RUN_CONFIG).write_text(json.dumps(values))
    with pytest.raises(AmnsegError, match=f"{tmp_path / RUN_CONFIG}: cam.epochs=0: must be"):
        load_run_config(tmp_path)
