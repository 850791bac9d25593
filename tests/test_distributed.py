"""torchrun with 2 processes on the CPU (gloo): a training stage ends with the same weights on
both ranks, equal to one process with the same global batch and data order; sharded inference
writes byte-identical files; a killed 2-rank run resumes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_folder_dataset
from test_pipeline import FAST

import amnseg as amnseg_package
from amnseg import distributed
from amnseg.io import load_checkpoint

DRIVER = '''
import os, sys, time
from amnseg import checkpoints, distributed
from amnseg.io import save_checkpoint

original_save_once = checkpoints.save_once


def every_rank_saves_too(path, checkpoint):
    # The test compares the weights each rank ends with.
    save_checkpoint(path.with_name(f"rank{distributed.rank()}.pt"), checkpoint)
    return original_save_once(path, checkpoint)


checkpoints.save_once = every_rank_saves_too
if os.environ.get("AMNSEG_TEST_HANG_AFTER"):
    import amnseg.stages.common as common

    original_maps = common.save_score_maps
    written = []

    def save_then_hang(*args, **kwargs):
        original_maps(*args, **kwargs)
        written.append(1)
        if len(written) == int(os.environ["AMNSEG_TEST_HANG_AFTER"]):
            time.sleep(600)  # waits here to be killed

    common.save_score_maps = save_then_hang
from amnseg.cli import main

main()
'''

OVERRIDES = ["data.kind=folder", "data.train_split=train", "data.infer_split=train",
             "data.val_split=val", "data.num_workers=0", "device=cpu", "backbone.depth=18",
             "backbone.width=0.125", "backbone.strides=[2,2,1,1]", "backbone.pretrained=null",
             "cam.epochs=2", "cam.batch_size=4", "cam.resize_long=[24,40]", "cam.crop_size=32",
             *FAST, "cam.epochs=2",
             # Map groups of 2 images: the 8 images make 4 groups, 2 for each of 2 ranks.
             "map_batch_images=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(driver: Path, processes: int, *args: str, torchrun: bool | None = None
            ) -> list[str]:
    """The command line of ``driver``: under torchrun with ``processes`` processes, or as a
    plain process (the default for one process)."""
    if not (processes > 1 if torchrun is None else torchrun):
        return [sys.executable, str(driver), *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            "--nnodes=1", f"--master_port={free_port()}", str(driver), *args]


def environment() -> dict[str, str]:
    """The driver imports the amnseg these tests import (not whatever is installed) and conftest."""
    package_root = str(Path(amnseg_package.__file__).parents[1])
    path = os.pathsep.join([package_root, str(Path(__file__).parent)])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def amnseg(driver: Path, processes: int, *args: str, timeout: int = 300,
           torchrun: bool | None = None) -> None:
    result = subprocess.run(command(driver, processes, *args, torchrun=torchrun),
                            capture_output=True, text=True, env=environment(), timeout=timeout,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def kill_every_process_running(script: Path) -> None:
    """SIGKILL every process whose command line names ``script`` (like kill -9 on a node)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(script) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = write_tiny_folder_dataset(root / "data", count=8)
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    return root, data, driver


def test_training_under_torchrun_matches_one_process(setup):
    root, data, driver = setup
    runs = {}
    # 1: a plain process; "torchrun 1": one process under torchrun (process group, DDP).
    for processes in (1, "torchrun 1", 2):
        run = root / f"train_{processes}".replace(" ", "_")
        amnseg(driver, 2 if processes == 2 else 1, "train-cam", "voc12", f"run_dir={run}",
               f"data.root={data}", *OVERRIDES, torchrun=processes != 1)
        runs[processes] = run
    one = load_checkpoint(runs[1] / "cam" / "rank0.pt")["model"]
    under_torchrun = load_checkpoint(runs["torchrun 1"] / "cam" / "rank0.pt")["model"]
    for key, value in one.items():
        assert torch.equal(under_torchrun[key], value), key  # DDP on one rank changes nothing
    assert '"processes": 1' in (runs["torchrun 1"] / "cam" / "log.jsonl").read_text()
    rank0 = load_checkpoint(runs[2] / "cam" / "rank0.pt")["model"]
    rank1 = load_checkpoint(runs[2] / "cam" / "rank1.pt")["model"]
    for key, value in one.items():
        assert torch.equal(rank0[key], rank1[key]), key  # the ranks agree exactly
        torch.testing.assert_close(rank0[key].double(), value.double(), rtol=1e-4, atol=1e-6,
                                   msg=key)
    log = (runs[2] / "cam" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"processes": 2' in log[0]  # one line per epoch, from rank 0
    assert not (runs[2] / "cam" / "rank2.pt").exists()


def test_sharded_inference_is_byte_identical_and_a_killed_run_resumes(setup):
    root, data, driver = setup
    base = root / "maps_base"
    amnseg(driver, 1, "train-cam", "voc12", f"run_dir={base}", f"data.root={data}", *OVERRIDES)
    outputs = {}
    for processes in (1, 2):
        run = root / f"maps_{processes}"
        shutil.copytree(base, run)
        amnseg(driver, processes, "make-cam", "voc12", f"run_dir={run}", f"data.root={data}",
               *OVERRIDES)
        outputs[processes] = digest(run / "cam" / "maps")
    assert len(outputs[1]) == 8 and outputs[1] == outputs[2]

    run = root / "maps_killed"
    shutil.copytree(base, run)
    args = ["make-cam", "voc12", f"run_dir={run}", f"data.root={data}", *OVERRIDES]
    victim = subprocess.Popen(command(driver, 2, *args), env={
        **environment(), "AMNSEG_TEST_HANG_AFTER": "2"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    maps = run / "cam" / "maps"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(maps.glob("*.npz"))) < 4:
        time.sleep(0.5)
    kill_every_process_running(driver)  # torchrun and both ranks (in sessions of their own)
    victim.wait(timeout=60)
    assert len(list(maps.glob("*.npz"))) == 4  # both ranks wrote 2, then hung
    amnseg(driver, 2, *args)
    assert digest(maps) == outputs[1]


def test_fused_accumulation_under_torchrun_matches_two_passes_in_one_process(setup):
    """seg.fused_accumulation on 2 ranks: each rank's batch holds its share of both accumulated
    batches, sliced back into them for the loss; the weights are those of one process running
    the two batches one after the other."""
    root, data, driver = setup
    seg = ["seg.init=null", "seg.iterations=3", "seg.batch_size=2", "seg.accumulation=2",
           "seg.crop_size=32", "seg.eval_images=0", "seg.eval_crf=false",
           "seg.backbone.depth=18", "seg.backbone.width=0.125", "seg.backbone.pretrained=null",
           "seg.lr=0.01", "seg.upper_bound=true"]
    runs = {"two passes": root / "seg_two", "fused, 2 ranks": root / "seg_fused"}
    amnseg(driver, 1, "train-seg-gt", "voc12", f"run_dir={runs['two passes']}",
           f"data.root={data}", *OVERRIDES, *seg)
    amnseg(driver, 2, "train-seg-gt", "voc12", f"run_dir={runs['fused, 2 ranks']}",
           f"data.root={data}", *OVERRIDES, *seg, "seg.fused_accumulation=true", torchrun=True)
    two, fused = (load_checkpoint(run / "seg_gt" / "seg_gt.pt")["model"] for run in runs.values())
    for key, value in two.items():
        torch.testing.assert_close(fused[key].double(), value.double(), rtol=1e-4, atol=1e-6,
                                   msg=key)


GLOO_PEER_GONE = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                  "by peer [127.0.0.1]:9628")


def test_a_collective_failing_because_another_process_stopped_is_one_line(monkeypatch, capsys):
    """One rank's bad input stops it; the others then fail in their next collective. Their
    message points to the error that matters instead of a gloo traceback, and the manifest
    says the same rather than gloo's words."""
    from amnseg import cli, distributed
    from amnseg.pipeline import _recorded_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.peer_stopped(RuntimeError(GLOO_PEER_GONE))
    assert distributed.peer_stopped(RuntimeError("... Connection reset by peer"))
    assert not distributed.peer_stopped(RuntimeError("CUDA error: an illegal memory access"))
    assert not distributed.peer_stopped(ValueError(GLOO_PEER_GONE))
    assert _recorded_error(RuntimeError(GLOO_PEER_GONE)) == (
        "another process of this torchrun job stopped (its error is in the job's output); the "
        "same command resumes where it stopped")
    assert _recorded_error(ValueError("first\nlast line")) == "last line"

    def collective_fails(**kwargs):
        raise RuntimeError(GLOO_PEER_GONE)

    monkeypatch.setattr(cli, "app", collective_fails)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "amnseg: error: another process of this torchrun job stopped (its error is above); "
        "the same command resumes where it stopped")
    # In a single process the same failure is no peer's: it stays a traceback.
    for size in ("1", "x"):
        monkeypatch.setenv("WORLD_SIZE", size)
        assert not distributed.peer_stopped(RuntimeError(GLOO_PEER_GONE))
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            cli.main()


def test_a_process_not_started_by_torchrun_says_what_it_waits_for(monkeypatch, capsys):
    """RANK, WORLD_SIZE and MASTER_ADDR left over in a shell: the process group would wait for
    the other processes silently, for half an hour."""
    from amnseg import distributed

    def joins(*args, **kwargs):
        raise KeyboardInterrupt  # the user's Ctrl-C while it waits

    monkeypatch.setattr(distributed.dist, "init_process_group", joins)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29777"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(KeyboardInterrupt):
        distributed.setup("cpu")
    assert capsys.readouterr().err == (
        "amnseg: waiting for the 2 processes of WORLD_SIZE=2 (this one RANK=0) at "
        "localhost:29777; not started by torchrun: unset RANK, WORLD_SIZE and MASTER_ADDR to "
        "run alone\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun's: its processes all start
    with pytest.raises(KeyboardInterrupt):
        distributed.setup("cpu")
    assert capsys.readouterr().err == ""
    # A world of one process waits for no other.
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(KeyboardInterrupt):
        distributed.setup("cpu")
    assert capsys.readouterr().err == ""


def test_torchruns_failure_summary_names_the_error_line(tmp_path):
    """torchrun ends a failed job with its own summary (and a traceback of the launcher itself,
    which no process of the job can prevent); its root-cause block shows our one line."""
    missing = tmp_path / "no-such-config.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
         f"--master_port={free_port()}", "-m", "amnseg", "run", str(missing)],
        capture_output=True, text=True, env=environment(), timeout=120, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    root_cause = output.split("Root Cause (first observed failure):", 1)[1]
    assert f"traceback : amnseg: error: {missing}: no such config file" in root_cause
    assert "To enable traceback see" not in output


def test_recorded_error_is_what_torchrun_reads(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    distributed.record_error("amnseg: error: x.png: unreadable image")  # no torchrun: no file
    assert not error_file.exists()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    before = int(time.time())
    distributed.record_error("amnseg: error: x.png: unreadable image")
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message == "amnseg: error: x.png: unreadable image"
    assert before <= failure.timestamp <= time.time()
    # A file that cannot be written leaves torchrun's own summary; the error line still shows.
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "missing" / "error.json"))
    distributed.record_error("amnseg: error: x.png: unreadable image")
