"""W&B never blocks or kills a run: unreachable or hanging servers fall back to offline within seconds."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from diffuse.tracking import Tracker, resolve_mode


@pytest.fixture
def silent_server():
    """A local TCP server that accepts connections and never answers (a hung W&B server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    th.join()
    for c in conns:
        c.close()
    srv.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_metrics_jsonl_and_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(tmp_path, mode="auto", project="diffuse-test")
    tracker.log({"loss": 0.5, "lr": 1e-3}, step=1)
    tracker.log({"loss": float("nan")}, step=2)
    tracker.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-3}, {"step": 2, "loss": None}]
    assert tracker.mode == "offline"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_auto_mode_without_key_is_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_mode("auto") == "offline"
    with pytest.raises(ValueError, match="logger.mode must be one of"):
        resolve_mode("sometimes")


def test_unreachable_server_falls_back_to_offline_fast(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    assert resolve_mode("online", probe_timeout=2) == "offline"
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
def test_hanging_server_falls_back_to_offline(tmp_path, monkeypatch, silent_server):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    t0 = time.perf_counter()
    assert resolve_mode("online", probe_timeout=2) == "offline"  # it accepted, but never answered
    assert time.perf_counter() - t0 < 5  # the probe's budget, not W&B's init timeout
    t0 = time.perf_counter()
    tracker = Tracker(tmp_path, mode="online")  # the default settings
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert time.perf_counter() - t0 < 30  # probe + an offline start; was ~60 s of waiting on the server
    assert tracker.mode == "offline"
    assert (tmp_path / "metrics.jsonl").read_text().strip()


def test_non_main_rank_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "r1", mode="offline", enabled=False)
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert not (tmp_path / "r1").exists()
