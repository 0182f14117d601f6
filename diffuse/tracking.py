"""Run tracking behind one small interface: `metrics.jsonl` always, Weights & Biases when it works.

W&B must never stop or stall a run. mode: auto (online when an API key is configured, else offline),
online, offline, disabled. Online W&B with no network can hang for minutes inside `wandb.init`, so we
probe the server first with a few-second budget (it must answer: a TLS handshake or an HTTP reply, not only
accept the connection) and fall back to offline with one warning line; any
W&B error later disables W&B for the rest of the run (again with one warning), never the run itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from diffuse.network import reachable

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text() or "wandb" in netrc.read_text()
    except OSError:
        return False


def resolve_mode(mode: str, probe_timeout: float = 3.0) -> str:
    """The W&B mode to use for a requested one, after checking key and network."""
    if mode not in MODES:
        raise ValueError(f"logger.mode must be one of {', '.join(MODES)}; got {mode!r}")
    env_mode = os.environ.get("WANDB_MODE")
    if mode == "auto" and env_mode in ("online", "offline", "disabled"):
        mode = env_mode
    if mode == "auto":
        mode = "online" if _api_key_configured() else "offline"
    if mode == "online" and not reachable([os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")],
                                           probe_timeout, answers=True):
        log.warning("W&B server unreachable: logging offline instead (sync later with `wandb sync`)")
        mode = "offline"
    return mode


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", -1)
    except ValueError:  # a torn last line (a run killed mid-write): drop it
        return float("inf")


class Tracker:
    """Writes metrics.jsonl in run_dir and mirrors everything to W&B. On non-main ranks does nothing."""

    def __init__(self, run_dir: str | Path, mode: str = "auto", project: str = "diffuse",
                 config: dict | None = None, name: str | None = None, run_id: str | None = None,
                 enabled: bool = True, init_timeout: float = 15.0):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb = None
        self.run_id = run_id
        self.mode = "disabled"
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        mode = resolve_mode(mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: metrics go to metrics.jsonl only")
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        settings = dict(init_timeout=init_timeout, console="off", x_disable_stats=True)
        kwargs = dict(project=project, name=name, id=run_id, resume="allow" if run_id else None,
                      dir=str(self.run_dir), config=config)
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
        except Exception as e:  # noqa: BLE001 - any W&B failure must leave the run alone
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if mode != "online":
                log.warning("W&B disabled for this run: %s", reason)
                return
            log.warning("W&B online start failed (%s): logging offline instead", reason)
            try:
                run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **kwargs)
            except Exception as e2:  # noqa: BLE001
                log.warning("W&B disabled for this run: %s", str(e2).splitlines()[0] if str(e2) else e2)
                return
        self.wandb = wandb
        self.run_id = run.id
        self.mode = mode if run.settings.mode != "offline" else "offline"

    def _wandb_call(self, fn, *args, **kwargs) -> None:
        if self.wandb is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging failed, disabling it for this run: %s", e)
            self.wandb = None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in clean.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._wandb_call(lambda: self.wandb.log(clean, step=step))

    def drop_after(self, step: int) -> None:
        """Remove metrics.jsonl lines of steps after `step` (a resumed run logs them again), atomically."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) != len(lines):
            tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.metrics_path)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        if self.enabled:
            self._wandb_call(lambda: self.wandb.log({key: self.wandb.Image(str(path))}, step=step))

    def log_video(self, key: str, path: str | Path, step: int, fps: int = 10) -> None:
        if self.enabled:
            self._wandb_call(lambda: self.wandb.log({key: self.wandb.Video(str(path), fps=fps)}, step=step))

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int,
                  image_columns: tuple[str, ...] = ()) -> None:
        """A W&B table `key` of `rows` (cells in `image_columns` are image file paths), logged whole: a W&B
        table is immutable once logged, so the caller passes every row each time (the newest version is the
        one shown). Never raises, as every W&B call here."""
        if not self.enabled or self.wandb is None:
            return
        picture = [c in image_columns for c in columns]

        def log_it():
            data = [[self.wandb.Image(str(v)) if pic and v is not None else v for v, pic in zip(row, picture)]
                    for row in rows]
            self.wandb.log({key: self.wandb.Table(columns=list(columns), data=data)}, step=step)

        self._wandb_call(log_it)

    def finish(self) -> None:
        if self.wandb is not None:
            self._wandb_call(self.wandb.finish)
            self.wandb = None
