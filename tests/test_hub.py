"""The Hugging Face Hub (diffuse/storage/hub.py) with huggingface_hub's functions patched, never the network:
hf:// addresses download into a fake cache and then go through the same vetting as local paths (checkpoint=,
init_from=, latent.vae=); `diffuse export push_to_hub=…` uploads the folder privately; offline, unknown and
unauthorised are one line each, and the export is kept."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch

from diffuse.errors import DiffuseError
from diffuse.storage import hub

from conftest import TINY, compose_cfg, run_cli

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import errors  # noqa: E402


def test_addresses_parse_or_are_refused():
    assert hub.parse("hf://user/name") == hub.HubAddress("user/name")
    assert hub.parse("hf://user/name/vae@v1") == hub.HubAddress("user/name", "vae", "v1")
    assert hub.local("outputs/x") == "outputs/x" and not hub.is_hub(None)
    for bad in ("hf://user", "hf://user/name/../etc", "hf://"):
        with pytest.raises(DiffuseError, match="hf://USER/NAME"):
            hub.parse(bad)


class FakeHub:
    """snapshot_download from local folders standing in for repositories; create_repo/upload_folder recorded."""

    def __init__(self, repos: dict[str, Path], cache: Path):
        self.repos, self.cache, self.calls = repos, cache, []

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None):
        self.calls.append(("download", repo_id, revision, allow_patterns))
        if repo_id not in self.repos:
            raise errors.RepositoryNotFoundError("404", response=mock.Mock(status_code=404, headers={}))
        dest = self.cache / repo_id.replace("/", "--") / (revision or "main")
        if not dest.exists():
            shutil.copytree(self.repos[repo_id], dest)
        return str(dest)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    fake = FakeHub({}, tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 1-step run and its `diffuse export` folder, as a repository would hold it."""
    root = tmp_path_factory.mktemp("hub_run")
    proc = run_cli(["train", *TINY, "trainer.max_steps=1"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(["export", f"out={root / 'export'}"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_checkpoint_and_init_from_read_hub_addresses_like_local_folders(exported, fake_hub):
    from diffuse.jobs.common import find_checkpoint
    from diffuse.training.init_weights import read_weights
    fake_hub.repos["me/shapes"] = exported / "export"
    path = find_checkpoint("hf://me/shapes@v2")
    assert path.is_dir() and (path / "model.safetensors").is_file() and "hf-cache" in str(path)
    assert fake_hub.calls[-1] == ("download", "me/shapes", "v2", None)
    weights, report = read_weights("hf://me/shapes")
    assert report["source"] == "export" and all(isinstance(v, torch.Tensor) for v in weights.values())
    with pytest.raises(DiffuseError) as e:
        find_checkpoint("hf://me/missing")
    assert "\n" not in str(e.value) and "no such repository" in str(e.value)


def test_latent_vae_reads_a_subfolder_of_a_hub_repository(fake_hub, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffuse.data.latent import read_vae_checkpoint
    repo = tmp_path / "sd"
    diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), layers_per_block=1).save_pretrained(repo / "vae")
    fake_hub.repos["me/sd"] = repo
    record = read_vae_checkpoint("hf://me/sd/vae")
    assert record["source"] == "diffusers AutoencoderKL" and record["path"].endswith("vae")
    assert fake_hub.calls[-1][3] == ["vae/*", "vae/**"]  # only the subfolder is fetched


@pytest.mark.parametrize("failure,words", [
    (errors.OfflineModeIsEnabled("offline"), "offline"),
    (errors.HfHubHTTPError("401", response=mock.Mock(status_code=401, headers={})), "not authorised"),
    (ConnectionError("no route"), "cannot be reached"),
])
def test_download_failures_are_one_line(monkeypatch, failure, words):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", mock.Mock(side_effect=failure))
    with pytest.raises(DiffuseError) as e:
        hub.download("hf://me/x")
    assert "\n" not in str(e.value) and words in str(e.value) and str(e.value).startswith("hf://me/x")


def _export_cfg(root: Path, out: Path, *extra):
    return compose_cfg("export", [f"checkpoint={next(root.glob('outputs/*/*/checkpoints/last.ckpt'))}",
                                  f"out={out}", *extra])


def test_export_pushes_the_folder_privately(exported, tmp_path, monkeypatch):
    from diffuse.jobs import export as export_job
    api = mock.Mock()
    api.create_repo.return_value = "https://huggingface.co/me/shapes"
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    out = tmp_path / "push"
    summary = export_job.run(_export_cfg(exported, out, "push_to_hub=me/shapes"), tmp_path)
    api.create_repo.assert_called_once_with("me/shapes", private=True, exist_ok=True, repo_type="model")
    (call,) = api.upload_folder.call_args_list
    assert call.kwargs["folder_path"] == str(out) and call.kwargs["repo_id"] == "me/shapes"
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert summary["hub"] == "https://huggingface.co/me/shapes"


def test_an_unauthorised_push_is_one_line_and_keeps_the_export(exported, tmp_path, monkeypatch):
    from diffuse.jobs import export as export_job
    api = mock.Mock()
    api.create_repo.side_effect = errors.HfHubHTTPError("403", response=mock.Mock(status_code=403, headers={}))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    out = tmp_path / "kept"
    with pytest.raises(DiffuseError) as e:
        export_job.run(_export_cfg(exported, out, "push_to_hub=me/shapes", "push_private=false"), tmp_path)
    assert "\n" not in str(e.value) and "HTTP 403" in str(e.value) and str(out) in str(e.value)
    assert (out / "model.safetensors").is_file()
