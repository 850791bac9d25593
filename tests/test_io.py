"""amnseg.io helpers not covered by the stage tests: the background writer of map files."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from amnseg.io import BackgroundWriter


def test_background_writer_runs_every_write_and_bounds_the_waiting_ones(tmp_path):
    release = threading.Event()
    waiting, most_waiting, lock = [0], [0], threading.Lock()

    def write(index):
        release.wait(timeout=10)
        (tmp_path / f"{index}.txt").write_text(str(index))
        with lock:
            waiting[0] -= 1

    def submit_all(writer):
        for index in range(12):
            with lock:
                waiting[0] += 1
                most_waiting[0] = max(most_waiting[0], waiting[0])
            writer.submit(write, index)  # blocks once 2 x threads writes wait

    with BackgroundWriter(2) as writer:
        blocked = threading.Thread(target=submit_all, args=(writer,))
        blocked.start()
        blocked.join(timeout=0.5)
        assert blocked.is_alive()  # blocked on the bound, not running ahead
        release.set()
        blocked.join(timeout=10)
    assert sorted(int(p.stem) for p in tmp_path.iterdir()) == list(range(12))
    assert most_waiting[0] <= 2 * 2 + 1  # the bound, plus the one being submitted


def test_background_writer_raises_a_failed_write_on_leaving():
    def fails():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), BackgroundWriter(2) as writer:
        writer.submit(fails)


def test_background_writer_without_threads_writes_in_the_caller():
    threads = []
    with BackgroundWriter(0) as writer:
        writer.submit(lambda: threads.append(threading.current_thread()))
    assert threads == [threading.main_thread()]


@pytest.mark.parametrize("edit, words", [
    (dict(class_ids=np.array(["a"])), "class ids of shape (1,) and type <U1, not a list of"),
    (dict(class_ids=np.array([1.5])), "type float64, not a list of integers"),
    (dict(class_ids=np.array([[1]])), "class ids of shape (1, 1)"),
    (dict(class_ids=np.array([1, 1])), "class ids [1, 1] name a class twice"),
    (dict(class_ids=np.array([0])), "class ids [0] outside 1..3"),
    (dict(class_ids=np.array([7])), "class ids [7] outside 1..3"),
    (dict(full=np.zeros((2, 9, 13), np.float32)), "full maps of shape (2, 9, 13) and type "
     "float32 do not match 1 class ids"),
    (dict(strided=np.zeros((1, 9, 13), np.float32)), "stride-4 maps of 13x9 for full maps of "
     "13x9 (expected 4x3)"),
    (dict(full=np.zeros((1, 9, 13), np.int32)), "full maps of shape (1, 9, 13) and type int32"),
    (dict(full=np.full((1, 9, 13), np.nan, np.float32)), "the maps hold NaN or infinite"),
    (dict(strided=np.full((1, 3, 4), np.inf, np.float32)), "the maps hold NaN or infinite"),
])
def test_score_map_files_are_checked_when_read(tmp_path, edit, words):
    from amnseg.errors import AmnsegError
    from amnseg.io import load_score_maps

    arrays = dict(class_ids=np.array([2]), strided=np.zeros((1, 3, 4), np.float32),
                  full=np.zeros((1, 9, 13), np.float32))
    np.savez(tmp_path / "good.npz", **arrays)
    assert load_score_maps(tmp_path / "good.npz", 3).class_ids.tolist() == [2]
    np.savez(tmp_path / "bad.npz", **{**arrays, **edit})
    with pytest.raises(AmnsegError) as exc:
        load_score_maps(tmp_path / "bad.npz", 3)
    assert str(exc.value).startswith(f"{tmp_path / 'bad.npz'}: ") and words in str(exc.value)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    from amnseg.io import save_json

    old = os.umask(0o022)
    try:
        save_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # 0666 less the umask


@pytest.mark.parametrize("threads, on_caller", [(0, True), (1, False), (3, False)])
def test_background_writer_writes_beside_the_caller_when_given_threads(tmp_path, threads,
                                                                       on_caller):
    where = []
    with BackgroundWriter(threads) as writer:
        for _ in range(4):
            writer.submit(lambda: where.append(threading.current_thread()))
    assert len(where) == 4
    assert all((thread is threading.main_thread()) == on_caller for thread in where)


def test_json_files_keep_their_key_order_and_two_space_indent(tmp_path):
    from amnseg.io import save_json

    save_json(tmp_path / "a.json", {"zeta": 1, "alpha": {"b": [1, 2]}})
    assert (tmp_path / "a.json").read_text() == (
        '{\n  "zeta": 1,\n  "alpha": {\n    "b": [\n      1,\n      2\n    ]\n  }\n}\n')


def test_background_writer_does_not_wait_for_earlier_writes_to_take_more():
    started, release, order = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(5)
        order.append("slow write")

    with BackgroundWriter(1) as writer:
        writer.submit(slow)
        started.wait(5)
        writer.submit(lambda: None)  # queued behind the slow one; the caller goes on
        order.append("caller")
        release.set()
    assert order == ["caller", "slow write"]


def test_background_writer_on_an_error_finishes_started_writes_and_drops_the_rest(tmp_path):
    import time

    started, ran = threading.Event(), []

    def started_write():
        started.set()
        time.sleep(0.3)
        (tmp_path / "whole.txt").write_text("done")

    with pytest.raises(RuntimeError, match="stage failed"), BackgroundWriter(1) as writer:
        writer.submit(started_write)
        writer.submit(lambda: ran.append("queued"))
        started.wait(5)
        raise RuntimeError("stage failed")
    assert (tmp_path / "whole.txt").read_text() == "done"  # finished before the error left
    assert ran == []  # never started


class _Payload:
    """Unpickling it would write a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_map_files_with_pickled_objects_are_refused_unread(tmp_path):
    from amnseg.errors import AmnsegError
    from amnseg.io import load_score_maps

    marker = tmp_path / "ran"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    np.savez(tmp_path / "evil.npz", class_ids=payload, strided=np.zeros((1, 1, 1), np.float32),
             full=np.zeros((1, 1, 1), np.float32))
    with pytest.raises(AmnsegError, match="evil.npz: not a valid score map file"):
        load_score_maps(tmp_path / "evil.npz")
    assert not marker.exists()


def test_map_files_are_compressed_unless_asked(tmp_path):
    import zipfile

    from amnseg.io import ScoreMaps, load_score_maps, save_score_maps

    maps = ScoreMaps(np.array([1]), np.zeros((1, 3, 4), np.float32),
                     np.zeros((1, 9, 13), np.float32))
    save_score_maps(tmp_path / "packed.npz", maps)
    save_score_maps(tmp_path / "plain.npz", maps, compress=False)
    for name, method in (("packed", zipfile.ZIP_DEFLATED), ("plain", zipfile.ZIP_STORED)):
        with zipfile.ZipFile(tmp_path / f"{name}.npz") as archive:
            assert {info.compress_type for info in archive.infolist()} == {method}
        np.testing.assert_array_equal(load_score_maps(tmp_path / f"{name}.npz").full, maps.full)


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_damaged_map_files_are_one_line(tmp_path, damage):
    from amnseg.errors import AmnsegError
    from amnseg.io import ScoreMaps, load_score_maps, save_score_maps

    rng = np.random.default_rng(0)
    path = tmp_path / "m.npz"
    save_score_maps(path, ScoreMaps(np.array([1]), rng.random((1, 30, 40), np.float32),
                                    rng.random((1, 120, 160), np.float32)))
    data = bytearray(path.read_bytes())
    if damage == "cut":
        data = data[:100]
    else:
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(AmnsegError, match=r"m.npz: not a valid score map file .*delete it"):
        load_score_maps(path)


def test_a_failed_write_names_the_file_not_its_temporary_name(tmp_path, monkeypatch):
    from amnseg.io import atomic_path, save_json

    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(source))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError) as caught:
        save_json(tmp_path / "metrics.json", {"a": 1})
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "metrics.json")
    assert list(tmp_path.iterdir()) == []  # and the temporary file is gone
    # an error about another file is left as it is
    with pytest.raises(OSError) as caught, atomic_path(tmp_path / "a.txt"):
        open(tmp_path / "absent" / "b.txt")  # noqa: SIM115
    assert caught.value.filename == str(tmp_path / "absent" / "b.txt")


def test_an_output_whose_name_fits_gets_a_temporary_name_that_fits(tmp_path):
    """Image names of up to 251 bytes give outputs (<stem>.npz, <stem>.png) that fit the
    255-byte limit; their temporary names must fit too (multi-byte characters included)."""
    from amnseg.io import atomic_path, save_json, temporary_name

    for name in ("x" * 250 + ".json", "é" * 125 + ".json", "metrics.json"):
        save_json(tmp_path / name, {"a": 1})
        assert (tmp_path / name).read_text() == '{\n  "a": 1\n}\n'
        temporary = temporary_name(name)
        assert len(temporary.encode()) <= 255 and temporary.endswith(".tmp")
        assert temporary.startswith("." + name[:100])
    assert temporary_name("metrics.json")[:-17] == ".metrics.json"
    # A write that fails without a file name (a full disk) names the output.
    with pytest.raises(OSError) as caught, atomic_path(tmp_path / "maps.npz"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(tmp_path / "maps.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["x" * 250 + ".json", "é" * 125 + ".json", "metrics.json"])
