"""The Hugging Face Hub, through `huggingface_hub` (its cache, its token: `huggingface-cli login` or $HF_TOKEN):

    hf://USER/NAME[/SUBFOLDER][@REVISION]    checkpoint=, init_from=, latent.vae=, model.pretrained=
    diffuse export push_to_hub=USER/NAME     uploads the export folder (a private repo unless push_private=false)

A hub address is downloaded into huggingface_hub's cache and then read as a local path would be, through the
same vetting (tensors only, configs checked): the Hub is only a way to get files. Offline, unknown or
unauthorised: one line. huggingface_hub comes with diffusers (`pip install huggingface_hub` otherwise)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffuse.errors import DiffuseError

SCHEME = "hf://"


@dataclass(frozen=True)
class HubAddress:
    repo_id: str
    subfolder: str = ""
    revision: str | None = None


def is_hub(value) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse(value: str) -> HubAddress:
    """hf://user/name[/sub/folder][@revision] → its parts; one line for anything else."""
    rest, _, revision = value[len(SCHEME):].partition("@")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise DiffuseError(f"{value}: a hub address is hf://USER/NAME[/SUBFOLDER][@REVISION]")
    return HubAddress("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def _library():
    try:
        import huggingface_hub
    except ImportError:
        raise DiffuseError("hf:// addresses and push_to_hub need huggingface_hub: pip install huggingface_hub") \
            from None
    return huggingface_hub


def _reason(e: Exception) -> str:
    """huggingface_hub's and the network's failures as a few words."""
    from huggingface_hub import errors
    if isinstance(e, errors.OfflineModeIsEnabled):
        return "offline (HF_HUB_OFFLINE is set)"
    if isinstance(e, (errors.RepositoryNotFoundError, errors.GatedRepoError)):
        return "no such repository, or no access to it (log in: huggingface-cli login, or set HF_TOKEN)"
    if isinstance(e, errors.RevisionNotFoundError):
        return "no such revision"
    if isinstance(e, errors.LocalTokenNotFoundError):
        return "no token: log in with `huggingface-cli login`, or set HF_TOKEN"
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return f"not authorised (HTTP {status}): log in with a token that may write there"
        return f"the Hub answered HTTP {status}" if status else "the Hub refused"
    if isinstance(e, (ConnectionError, TimeoutError, OSError)) or "Connection" in type(e).__name__:
        return "the Hub cannot be reached (offline?)"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def download(value: str) -> Path:
    """hf://… → the local folder (or file) in huggingface_hub's cache holding it."""
    address = parse(value)
    hub = _library()
    patterns = [f"{address.subfolder}/*", f"{address.subfolder}/**"] if address.subfolder else None
    try:
        root = Path(hub.snapshot_download(address.repo_id, revision=address.revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - every failure of the download is one line
        raise DiffuseError(f"{value}: cannot download: {_reason(e)}") from None
    local = root / address.subfolder if address.subfolder else root
    if not local.exists():
        raise DiffuseError(f"{value}: the repository has no {address.subfolder}")
    return local


def local(value):
    """A config value that may be a hub address: downloaded and returned as a local path string; anything
    else unchanged."""
    return str(download(value)) if is_hub(value) else value


def push(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload `folder` as the model repository `repo_id` (created, private by default, if missing); returns its
    URL. One line when offline or unauthorised."""
    if is_hub(repo_id):
        repo_id = parse(repo_id).repo_id
    if len([p for p in str(repo_id).split("/") if p]) != 2:
        raise DiffuseError(f"push_to_hub={repo_id}: expected USER/NAME")
    hub = _library()
    api = hub.HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="diffuse export")
    except Exception as e:  # noqa: BLE001 - every failure of the upload is one line
        raise DiffuseError(f"push_to_hub={repo_id}: {_reason(e)}; the export is kept in {folder}") from None
    return str(url)
