"""Seeds made beside the map stage (``seeds.overlap``): the same files as the seed stage makes
after it, in the seed stage's record; errors left to the seed stage; nothing when it is not to
run."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from conftest import tiny_config, write_tiny_folder_dataset

from amnseg.errors import AmnsegError
from amnseg.pipeline import load_manifest, run_pipeline
from amnseg.stages import seeds as seeds_stage
from amnseg.stages.seeds import SeedFollower, overlap_seeds

FAST = ["cam.epochs=1", "cam.scales=[1.0,0.5]", "seeds.workers=2"]


def seed_files(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / "seeds" / "cam").glob("*.png"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_folder_dataset(tmp_path_factory.mktemp("follower") / "data", count=6)


@pytest.fixture(scope="module")
def seeds_after(data, tmp_path_factory) -> Path:
    """A run that made the CAM seeds after the map stage, as usual on the CPU."""
    run = tmp_path_factory.mktemp("after") / "run"
    run_pipeline(tiny_config(data, run, *FAST), stop="cam_seeds", progress=lambda line: None)
    return run


def test_seeds_made_beside_the_map_stage_are_the_seed_stage_files(data, seeds_after, tmp_path):
    run = tmp_path / "run"
    messages: list[str] = []
    manifest = run_pipeline(tiny_config(data, run, *FAST, "seeds.overlap=true"),
                            stop="cam_seeds", progress=messages.append)
    assert seed_files(run) == seed_files(seeds_after)
    assert len(seed_files(run)) == 6
    record = manifest["stages"]["cam_seeds"]
    # Every seed was made beside the maps: the seed stage found them and kept them.
    assert record["made_beside"] == 6
    assert record["status"] == "done"
    assert record["metrics"] == load_manifest(seeds_after)["stages"]["cam_seeds"]["metrics"]
    assert any(line.startswith("[beside] cam_seeds") for line in messages)
    # A rerun finds everything done.
    again: list[str] = []
    run_pipeline(tiny_config(data, run, *FAST, "seeds.overlap=true"), stop="cam_seeds",
                 progress=again.append)
    assert "[skip] cam_seeds: up to date" in again
    assert not any(line.startswith("[beside]") for line in again)


def test_changed_thresholds_clear_the_old_seeds_before_the_follower_starts(data, tmp_path):
    """A changed map option reruns the maps; the follower's stage starts afresh with them, and
    a changed seed option alone does not start the follower (the maps are up to date)."""
    run = tmp_path / "run"
    run_pipeline(tiny_config(data, run, *FAST, "seeds.overlap=true"), stop="cam_seeds",
                 progress=lambda line: None)
    stale = run / "seeds" / "cam" / "stale.png"
    stale.write_bytes(b"left by an earlier run")
    manifest = run_pipeline(tiny_config(data, run, *FAST, "seeds.overlap=true", "cam.flip=false"),
                            stop="cam_seeds", progress=lambda line: None)
    assert not stale.exists()
    assert manifest["stages"]["cam_seeds"]["made_beside"] == 6
    messages: list[str] = []
    manifest = run_pipeline(
        tiny_config(data, run, *FAST, "seeds.overlap=true", "cam.flip=false",
                    "seeds.cam_fg_threshold=0.4"), stop="cam_seeds", progress=messages.append)
    assert "[skip] cam_maps: up to date" in messages
    assert "made_beside" not in manifest["stages"]["cam_seeds"]


def test_no_follower_when_the_seed_stage_is_not_to_run(data, tmp_path):
    run = tmp_path / "run"
    manifest = run_pipeline(tiny_config(data, run, *FAST, "seeds.overlap=true"),
                            stop="cam_maps", progress=lambda line: None)
    assert "cam_seeds" not in manifest["stages"]
    assert not (run / "seeds").exists()


def test_a_failing_seed_is_reported_by_the_seed_stage(data, tmp_path, monkeypatch):
    """The follower stops at its first error; the map stage ends well, the seed stage meets
    the same error and fails with it (the forked workers inherit the patch)."""
    real = seeds_stage.make_seed

    def failing(image, scores, *args):
        if image.shape[0] == 32 and int(image.sum()) % 3 == 0:  # some images, every time
            raise AmnsegError("this image cannot be seeded")
        return real(image, scores, *args)

    monkeypatch.setattr(seeds_stage, "make_seed", failing)
    run = tmp_path / "run"
    messages: list[str] = []
    with pytest.raises(AmnsegError, match="this image cannot be seeded"):
        run_pipeline(tiny_config(data, run, *FAST, "seeds.overlap=true"), stop="cam_seeds",
                     progress=messages.append)
    stages = load_manifest(run)["stages"]
    assert stages["cam_maps"]["status"] == "done"
    assert stages["cam_seeds"]["status"] == "failed"
    assert "this image cannot be seeded" in stages["cam_seeds"]["error"]
    assert any("[beside] cam_seeds stopped (this image cannot be seeded)" in line
               for line in messages)


def test_overlap_option(data, tmp_path):
    config = tiny_config(data, tmp_path / "run")
    assert config.seeds.overlap == "auto"
    assert not overlap_seeds(config)  # auto: only when the maps are made on a GPU
    assert overlap_seeds(tiny_config(data, tmp_path / "run", "seeds.overlap=yes"))
    assert not overlap_seeds(tiny_config(data, tmp_path / "run", "seeds.overlap=false"))
    with pytest.raises(AmnsegError, match=r"seeds.overlap='sometimes': expected one of auto"):
        tiny_config(data, tmp_path / "run", "seeds.overlap=sometimes")


def test_follower_skips_seeds_that_exist(data, seeds_after, tmp_path):
    config = tiny_config(data, seeds_after, *FAST)
    before = seed_files(seeds_after)
    with SeedFollower(config, "cam", workers=1) as follower:
        for name in before:
            follower.submit(Path(name).stem)
    assert follower.made == 0 and follower.failure is None
    assert seed_files(seeds_after) == before


def test_follower_writes_what_make_seeds_writes_on_maps_where_thresholds_matter(data, tmp_path):
    """Maps that ramp from 0 to 1 across each image: both thresholds cut them, so the seeds
    hold background, unsure and class pixels, and a swapped threshold would show."""
    import numpy as np

    from amnseg.io import ScoreMaps, save_score_maps
    from amnseg.layout import maps_dir
    from amnseg.ops.multiscale import strided_size
    from amnseg.stages.common import processed_images
    from amnseg.stages.seeds import make_seeds

    config = tiny_config(data, tmp_path / "run", *FAST)
    dataset = processed_images(config)
    for stem in dataset.stems:
        height, width = dataset.image(stem).shape[:2]
        ids = np.flatnonzero(dataset.label(stem)) + 1
        ramp = np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))
        full = np.stack([ramp] * len(ids))
        save_score_maps(maps_dir(config, "cam") / f"{stem}.npz", ScoreMaps(
            ids, full[:, ::4, ::4][:, :strided_size(height, width, 4)[0]], full))
    with SeedFollower(config, "cam", workers=2) as follower:
        for stem in dataset.stems:
            follower.submit(stem)
    assert follower.made == len(dataset) and follower.failure is None
    beside = seed_files(tmp_path / "run")
    reference = make_seeds(config, "cam", out_dir=tmp_path / "reference", workers=1)
    assert beside == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(reference.glob("*.png"))}
    from amnseg.data.base import read_index_png

    values = set().union(*(np.unique(read_index_png(path)).tolist()
                           for path in reference.glob("*.png")))
    assert {0, 255} <= values and values - {0, 255}, values


def _touch_slowly(path: Path) -> None:
    time.sleep(0.02)
    path.touch()


def test_worker_pool_drops_queued_work_on_an_error_and_finishes_the_running(tmp_path):
    from amnseg.workers import worker_pool

    with pytest.raises(ValueError, match="stop"), worker_pool(2) as pool:
        futures = [pool.submit(_touch_slowly, tmp_path / f"{i}") for i in range(200)]
        futures[0].result()
        raise ValueError("stop")
    made = len(list(tmp_path.iterdir()))
    assert 1 <= made < 200
    assert all(future.done() for future in futures)  # run or cancelled, none left hanging
    assert sum(future.cancelled() for future in futures) == 200 - made
