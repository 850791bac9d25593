"""amnseg.io helpers not covered by the stage tests: the background writer of map files."""

from __future__ import annotations

import threading

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
