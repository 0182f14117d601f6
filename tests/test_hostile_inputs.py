"""What a hostile file or a careless command line tries, through the real CLI: each ends in exit 1 with one
`diffuse JOB: error:` line (no traceback), writes nothing outside the run folder, and what was written before
stays loadable. Files tampered with here start from a genuine tiny run's checkpoint and export."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.storage.checkpoint import load_checkpoint, save_checkpoint

from conftest import TINY, run_cli
from inproc_cli import one_error_line, run_inproc

SAMPLE = ["sampler.steps=2", "num_samples=2", "device=cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 3-step conditional run (trained by the CLI) and its export; returns (cwd, checkpoint, export)."""
    cwd = tmp_path_factory.mktemp("hostile")
    res = run_inproc(["train", *TINY, "trainer.max_steps=3", "trainer.checkpoint_every=1"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    (ckpt,) = (cwd / "outputs").glob("*/*/checkpoints/last.ckpt")
    res = run_inproc(["export", f"checkpoint={ckpt}", f"out={cwd / 'exp'}"], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd, ckpt, cwd / "exp"


def _state(ckpt):
    state = load_checkpoint(ckpt)
    return {k: v for k, v in state.items() if k not in ("format", "version")}


def _files(root):
    return {p for p in root.rglob("*") if p.is_file()}


def _victim(tmp_path):
    """Someone's private pictures: a class folder of PNGs."""
    folder = tmp_path / "victim" / "Pictures"
    (folder / "holiday").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / "holiday" / f"p{i}.png")
    return folder


# -- 1. a stored config chooses no place to read or write --------------------------------------------------
@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_evaluate_never_reads_or_writes_where_a_file_says(trained, tmp_path, monkeypatch, source):
    cwd, ckpt, export = trained
    victim = _victim(tmp_path)
    drop = tmp_path / "attacker-drop"
    node = {"_target_": "diffuse.data.folder.FolderDataset", "path": str(victim), "cache_dir": str(drop),
            "dim": 2, "resolution": 8, "channels": 1, "num_classes": 0, "download": True}
    if source == "checkpoint":
        state = _state(ckpt)
        state["config"]["dataset"] = node
        evil = tmp_path / "evil.ckpt"
        save_checkpoint(state, evil)
    else:
        evil = tmp_path / "evil-export"
        shutil.copytree(export, evil)
        meta = json.loads((evil / "config.json").read_text())
        meta["dataset"] = node
        (evil / "config.json").write_text(json.dumps(meta))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = _files(tmp_path)
    res = run_inproc(["evaluate", f"checkpoint={evil}", "num_samples=2", "device=cpu"], tmp_path / "victim")
    line = one_error_line(res, "evaluate")
    assert "give that folder with data_root=FOLDER" in line
    # nothing anywhere but this job's own run folder: no cache beside the pictures, in the drop, or in ~/.cache
    new = {p for p in _files(tmp_path) - before if "outputs" not in p.relative_to(tmp_path).parts}
    assert not new, sorted(map(str, new))
    assert not drop.exists() and not (tmp_path / "xdg").exists()


def test_evaluate_reads_the_data_root_this_command_gives(trained, tmp_path, monkeypatch):
    """The stored root of a torchvision set is not used: data_root (or the default) is."""
    cwd, ckpt, _ = trained
    state = _state(ckpt)
    state["config"]["dataset"] = {"_target_": "diffuse.data.vision.MNISTDataset", "root": str(tmp_path / "theirs"),
                                  "download": True, "resolution": 8, "channels": 1, "dim": 2, "split": "train"}
    evil = tmp_path / "mnist.ckpt"
    save_checkpoint(state, evil)
    monkeypatch.setenv("DIFFUSE_DATA", str(tmp_path / "mine"))
    line = one_error_line(run_inproc(["evaluate", f"checkpoint={evil}", "num_samples=2", "device=cpu"], tmp_path),
                          "evaluate")
    assert str(tmp_path / "mine") in line and "theirs" not in line  # no download, not their root
    assert not (tmp_path / "theirs").exists()


def test_resume_takes_the_data_location_from_the_command_line(tmp_path):
    folder = _victim(tmp_path)
    (folder / "work").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 200 - 30 * i, np.uint8)).save(folder / "work" / f"w{i}.png")
    args = ["train", "dataset=folder", f"dataset.path={folder}", "dataset.resolution=8", "dataset.channels=1",
            "model.base_channels=8", "model.channel_mult=[1,2]", "model.time_emb_dim=8", "trainer.batch_size=4",
            "trainer.sample_every=0", "logger=none", "device=cpu", "trainer.max_steps=2"]
    assert run_inproc(args, tmp_path).returncode == 0
    (run,) = (tmp_path / "outputs").glob("*/*")
    line = one_error_line(run_inproc(["train", f"resume={run}", "trainer.max_steps=3", "logger=none"], tmp_path),
                          "train")
    assert "give the folder again with dataset.path=FOLDER" in line
    res = run_inproc(["train", f"resume={run}", "trainer.max_steps=3", f"dataset.path={folder}", "logger=none"],
                     tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 3


def test_exports_leak_no_local_paths(trained):
    cwd, _, export = trained
    text = (export / "config.json").read_text()
    assert str(cwd) not in text and "/tmp" not in text
    assert json.loads(text)["exported_from"].endswith("checkpoints/last.ckpt")


# -- 2. a full disk ------------------------------------------------------------------------------------------
def _limited_train(cwd, limit_bytes, extra=()):
    """`diffuse train` in a subprocess whose files may not grow past limit_bytes (RLIMIT_FSIZE: a write past it
    fails with EFBIG, as a full disk fails one with ENOSPC)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffuse", "train", *TINY, "trainer.max_steps=3",
                           "trainer.checkpoint_every=1", *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def _assert_clean_failure(proc, cwd):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = re.findall(r"diffuse train: error: [^\r\n]*", proc.stderr)  # after a progress bar's \r, if any
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0], proc.stderr[-3000:]
    assert not [p for p in cwd.rglob("*") if ".tmp" in p.name], "temp files left behind"
    return lines[0]


@pytest.mark.slow
def test_a_write_that_fails_is_one_line_and_leaves_no_temp_file(tmp_path):
    proc = _limited_train(tmp_path, 64 * 1024)  # every checkpoint is larger than this
    line = _assert_clean_failure(proc, tmp_path)
    assert "File too large" in line


def _tmpfs(path, size_kb):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_mid_run_keeps_the_last_checkpoint(tmp_path):
    """On a real 4 MB filesystem (checkpoints of ~0.9 MB, all kept): the run fills it, stops with one line, leaves no temp file, and the
    checkpoint written before still loads."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, 4096):
        pytest.skip("mount -t tmpfs is not permitted in this sandbox")
    try:
        proc = run_cli(["train", *TINY, "trainer.max_steps=40", "trainer.checkpoint_every=1",
                        "trainer.keep_checkpoints=null"], disk)
        line = _assert_clean_failure(proc, disk)
        assert "No space left on device" in line
        (last,) = disk.glob("outputs/*/*/checkpoints/last.ckpt")
        assert load_checkpoint(last)["step"] >= 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_temp_files_of_a_killed_writer_are_removed(tmp_path):
    from diffuse.files import atomic_write

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.ckpt.tmp{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    atomic_write(tmp_path / "last.ckpt", lambda p: p.write_bytes(b"whole"))
    assert not stale.exists() and (tmp_path / "last.ckpt").read_bytes() == b"whole"


def test_export_to_a_place_that_cannot_be_written(trained, tmp_path):
    cwd, ckpt, _ = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_error_line(run_inproc(["export", f"checkpoint={ckpt}", f"out={blocker}"], tmp_path), "export")
    assert "cannot write" in line and str(blocker) in line
    assert blocker.read_text() == "not a folder"


# -- 3. every checkpoint the tool writes loads -----------------------------------------------------------------
def test_a_config_value_holding_an_interpolation_round_trips(tmp_path):
    res = run_inproc(["train", *TINY, "trainer.max_steps=2", "logger.name=exp\\${1}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert run_inproc(["sample", f"checkpoint={run}", *SAMPLE], tmp_path).returncode == 0
    res = run_inproc(["train", f"resume={run}", "trainer.max_steps=3"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert run_inproc(["export", f"checkpoint={run}", f"out={tmp_path / 'e'}"], tmp_path).returncode == 0
    assert run_inproc(["sample", f"checkpoint={tmp_path / 'e'}", *SAMPLE], tmp_path).returncode == 0
    from omegaconf import OmegaConf
    assert OmegaConf.create(load_checkpoint(run / "checkpoints" / "last.ckpt")["config"]).logger.name == "exp${1}"


# -- 4. resume with another length ------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_resume_with_a_shorter_or_longer_run(tmp_path, schedule):
    args = ["train", *TINY, f"trainer.lr_schedule={schedule}", "trainer.warmup_steps=1"]
    assert run_inproc([*args, "trainer.max_steps=4"], tmp_path).returncode == 0
    (run,) = (tmp_path / "outputs").glob("*/*")
    for steps in (2, 4):
        line = one_error_line(run_inproc(["train", f"resume={run}", f"trainer.max_steps={steps}"], tmp_path),
                              "train")
        assert "already at step 4" in line
    for steps in (5, 7):  # shorter than the first plan would have been, and longer
        res = run_inproc(["train", f"resume={run}", f"trainer.max_steps={steps}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == steps


# -- 7. bad values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["sample", "guidance.scale=inf"], "guidance.scale must be a number ≥ 0, or auto; got inf"),
    (["sample", "guidance.scale=nan"], "guidance.scale must be a number ≥ 0, or auto; got nan"),
    (["sample", f"seed={2**64}"], "seed must be an integer in \\[0, 4294967295\\]"),
    (["train", "schedule.beta_end=nan", "logger=none"], "schedule.beta_end must be a number in \\(0, 1\\)"),
    (["train", "dataset.resolution=100000", "logger=none", "device=cpu"], "holds more than 268435456 values"),
])
def test_bad_values_on_the_command_line(tmp_path, args, message):
    import re
    line = one_error_line(run_inproc(args, tmp_path), args[0])
    assert re.search(message, line), line


@pytest.mark.parametrize("tamper,message", [
    (lambda s: s["config"]["schedule"].update(beta_end=float("nan")), "stored config: schedule.beta_end must be"),
    (lambda s: s["config"]["sampler"].update(steps=0), "stored config: sampler.steps must be"),
    (lambda s: s["config"]["guidance"].update(scale=float("inf")), "stored config: guidance.scale must be"),
    (lambda s: s["config"]["dataset"].update(channels=3), "does not fit model UNet"),
    (lambda s: s["ema"]["model"][next(iter(s["ema"]["model"]))].fill_(float("nan")), "holds NaN/inf"),
    (lambda s: s["config"]["model"].update(_partial_=True), "may not use Hydra's _partial_"),
    (lambda s: s.update(rng=[{"torch": torch.zeros(7, dtype=torch.uint8), "loss": torch.zeros(7, dtype=torch.uint8)}]),
     "rng\\[0\\].torch must be a uint8 generator state"),
    (lambda s: s.update(step="4"), "step must be a whole number"),
    (lambda s: s["config"].update(model=[1, 2]), "config.model must be a mapping"),
])
def test_a_tampered_checkpoint_is_one_line(trained, tmp_path, tamper, message):
    import re
    _, ckpt, _ = trained
    state = _state(ckpt)
    tamper(state)
    evil = tmp_path / "odd.ckpt"
    save_checkpoint(state, evil)
    before = _files(tmp_path)
    line = one_error_line(run_inproc(["sample", f"checkpoint={evil}", *SAMPLE], tmp_path), "sample")
    assert re.search(message, line), line
    assert not {p for p in _files(tmp_path) - before if "outputs" not in p.relative_to(tmp_path).parts}


def test_the_pickle_refusal_gives_no_advice_to_unpickle(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "pickle.ckpt"
    torch.save({"format": "diffuse-checkpoint", "x": Payload()}, evil)
    line = one_error_line(run_inproc(["sample", f"checkpoint={evil}", *SAMPLE], tmp_path), "sample")
    assert "weights_only" not in line and "refused" in line
    assert pickle  # noqa: the payload class pickles through torch.save above


# -- 8. resume keeps its experiment ----------------------------------------------------------------------------
def test_resume_refuses_another_experiment(trained, tmp_path):
    _, ckpt, _ = trained
    line = one_error_line(run_inproc(["train", f"resume={ckpt}", "experiment=msnat_2d"], tmp_path), "train")
    assert "cannot change 'experiment' when resuming" in line


# -- 9. runs are ordered by what the tool recorded ------------------------------------------------------------
def test_a_copied_run_with_a_future_mtime_does_not_take_over(tmp_path):
    assert run_inproc(["train", *TINY, "trainer.max_steps=2"], tmp_path).returncode == 0
    (own,) = (tmp_path / "outputs").glob("*/*")
    copy = tmp_path / "outputs" / "2000-01-01" / "00-00-00"
    shutil.copytree(own, copy)
    time.sleep(1.1)  # Hydra names run folders by the second
    assert run_inproc(["train", *TINY, "trainer.max_steps=2", "seed=1"], tmp_path).returncode == 0
    newest = max((p for p in (tmp_path / "outputs").glob("*/*") if p not in (own, copy)))
    future = time.time() + 80 * 365 * 86400
    os.utime(copy / "run.json", (future, future))
    record = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**record, "started": future}))  # even its record says 2106
    from diffuse.storage.checkpoint import latest_run
    assert latest_run("diffusion", [tmp_path / "outputs"]) == newest
    res = run_inproc(["train", "resume=auto", "trainer.max_steps=3"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_checkpoint(newest / "checkpoints" / "last.ckpt")["step"] == 3
    assert load_checkpoint(copy / "checkpoints" / "last.ckpt")["step"] == 2


# -- 10. files of unexpected structure: mutated at random, never a traceback ---------------------------------
def _paths(node, prefix=()):
    """Every (key path) into a checkpoint's nested dicts/lists, tensors' entries as leaves."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(v, torch.Tensor) or len(prefix) < 2:
                yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from _paths(v, (*prefix, i))


def _odd_values():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12), st.sampled_from(["${oc.env:HOME}", "_partial_", "auto", "", "../.."]))
    tensors = st.sampled_from([torch.zeros(3), torch.zeros(2, 2, dtype=torch.uint8), torch.tensor(float("nan")),
                               torch.zeros(0)])
    deep = st.integers(30, 60).map(lambda n: __import__("functools").reduce(lambda acc, _: {"a": acc}, range(n), 1))
    return st.one_of(scalars, tensors, deep, st.lists(scalars, max_size=3),
                     st.dictionaries(st.sampled_from(["_target_", "_partial_", "_args_", "x"]), scalars, max_size=2))


def _mutated(state, path, action, value):
    """A copy of `state` with the entry at `path` deleted or replaced by `value`."""
    import copy
    state = copy.deepcopy(state)
    if not path:
        return value if action == "replace" else {}
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return state


def _assert_one_line_or_fine(res, job, cwd, before):
    if res.returncode != 0:
        one_error_line(res, job)
    written = {p for p in _files(cwd) - before if "outputs" not in p.relative_to(cwd).parts}
    assert not written, sorted(map(str, written))


@pytest.mark.slow
def test_fuzzed_checkpoints_and_exports_fail_in_one_line(trained, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, ckpt, export = trained
    state = _state(ckpt)
    meta = json.loads((export / "config.json").read_text())
    ckpt_paths = sorted(set(_paths(state)), key=str)
    meta_paths = sorted(set(_paths(meta)), key=str)

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.booleans(), st.data(), st.sampled_from(["replace", "delete"]), _odd_values())
    def run(in_export, data, action, value):
        cwd = tmp_path_factory.mktemp("fuzz")
        if in_export:
            path = data.draw(st.sampled_from(meta_paths))
            target = cwd / "exp"
            shutil.copytree(export, target)
            try:
                text = json.dumps(_mutated(meta, path, action, value if not isinstance(value, torch.Tensor) else 0))
            except (ValueError, RecursionError):
                return
            (target / "config.json").write_text(text)
        else:
            path = data.draw(st.sampled_from(ckpt_paths))
            target = cwd / "odd.ckpt"
            torch.save({"format": "diffuse-checkpoint", "version": 1, **_mutated(state, path, action, value)}, target)
        before = _files(cwd)
        res = run_inproc(["sample", f"checkpoint={target}", *SAMPLE], cwd)
        _assert_one_line_or_fine(res, "sample", cwd, before)
        if not in_export:  # resume reads the training state too
            res = run_inproc(["train", f"resume={target}", "trainer.max_steps=5", "logger=none"], cwd)
            _assert_one_line_or_fine(res, "train", cwd, before)

    run()


# -- 11. an I/O error in the run folder -------------------------------------------------------------------------
def test_a_run_folder_deleted_mid_run_is_one_line(tmp_path, monkeypatch):
    """The run folder removed while training (a cleanup script, a user): one line, no traceback."""
    from diffuse.tracking import Tracker

    log = Tracker.log

    def log_then_vanish(self, metrics, step):
        if step == 2:
            shutil.rmtree(self.run_dir)
        return log(self, metrics, step)

    monkeypatch.setattr(Tracker, "log", log_then_vanish)
    line = one_error_line(run_inproc(["train", *TINY, "trainer.max_steps=4", "trainer.checkpoint_every=100"],
                                     tmp_path), "train")
    assert "cannot write or read" in line and "metrics.jsonl" in line
