"""run_blocking: ORM work in gevent's thread pool, inline when the pool does not take it in time."""

from __future__ import annotations

import threading

import gevent

from offload.blocking import run_blocking


def test_work_runs_in_a_thread_and_returns_its_value():
    main = threading.get_ident()
    assert run_blocking(lambda: threading.get_ident() != main)


def test_a_pool_that_does_not_take_the_task_in_time_is_bypassed(caplog):
    pool = gevent.get_hub().threadpool
    saved = pool.maxsize
    release = threading.Event()
    try:
        pool.maxsize = 1
        busy = pool.spawn(release.wait, 10)  # the pool's one thread is taken
        main = threading.get_ident()
        ran_on = run_blocking(lambda: threading.get_ident(), inline_after=0.05)
        assert ran_on == main, "ran inline, on the caller's thread"
        assert "did not run" in caplog.text
    finally:
        release.set()
        busy.get(timeout=5)
        pool.maxsize = saved
