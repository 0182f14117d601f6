"""`diffuse evaluate`: metrics.json from a checkpoint, a sampler sweep in one multirun, its errors, and the
reference data it compares with (the test split of MNIST)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffuse.jobs.evaluate import reference_dataset

from conftest import TINY, run_cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    proc = run_cli(["train", *TINY, "trainer.max_steps=3"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, next(root.glob("outputs/*/*/checkpoints/last.ckpt"))


def _metrics(stdout: str) -> list[dict]:
    paths = [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("metrics: ")]
    return [json.loads(open(p).read()) for p in paths]


@pytest.mark.slow
def test_evaluate_writes_metrics_for_each_sampler(checkpoint):
    root, ckpt = checkpoint
    proc = run_cli(["evaluate", "-m", f"checkpoint={ckpt}", "sampler=ddim,dpm_solver", "sampler.steps=4",
                    "num_samples=24", "batch_size=10", "device=cpu"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _metrics(proc.stdout)
    assert [r["sampler"] for r in results] == ["DDIM", "DPMSolverPP"]
    for r in results:
        assert r["step"] == 3 and r["steps"] == 4 and r["num_samples"] == 24
        assert r["nfe"] == 4
        assert math.isfinite(r["fd"]) and r["fd"] > r["fd_real_vs_real"] >= 0  # 3 steps of training: far off
        assert 0 <= r["label_agreement"] <= 1 and 0 <= r["off_range_fraction"] <= 1
        assert 0 <= r["label_agreement_real"] <= 1
        assert r["label_bank"] == 40  # the 64 shapes but the 24 of the ceiling set (label_bank: 10000)
        assert -1 <= r["mean"] <= 1 and r["real_std"] > 0
    # the real sets do not depend on the sampler: the same floor and ceiling in both runs
    assert results[0]["fd_real_vs_real"] == results[1]["fd_real_vs_real"]
    assert results[0]["label_agreement_real"] == results[1]["label_agreement_real"]


@pytest.mark.slow
def test_evaluate_is_reproducible_and_keeps_samples(checkpoint):
    root, ckpt = checkpoint
    args = ["evaluate", f"checkpoint={ckpt}", "sampler=ddim", "sampler.steps=3", "num_samples=12", "device=cpu"]
    first = run_cli([*args, "save_samples=true", "batch_size=5"], root)
    second = run_cli([*args, "batch_size=12"], root)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    a, b = _metrics(first.stdout)[0], _metrics(second.stdout)[0]
    assert a["fd"] == pytest.approx(b["fd"], rel=1e-6)  # per-sample seeds: batch size does not matter
    metrics_path = root / first.stdout.split("metrics: ", 1)[1].splitlines()[0]  # relative to cwd, or absolute
    samples = np.load(metrics_path.parent / "samples.npz")
    assert samples["x"].shape == (12, 1, 8, 8) and samples["y"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


@pytest.mark.slow
def test_evaluate_asks_for_more_data_than_there_is(checkpoint):
    root, ckpt = checkpoint
    proc = run_cli(["evaluate", f"checkpoint={ckpt}", "num_samples=1000", "device=cpu"], root)
    assert proc.returncode == 1
    assert "only 64 images" in proc.stderr and "Traceback" not in proc.stderr


def test_reference_is_the_test_split(shared_data):
    saved = OmegaConf.create({"dim": 2, "dataset": {
        "_target_": "diffuse.data.vision.MNISTDataset", "dim": 2, "root": "/nowhere", "split": "train",
        "resolution": 28, "channels": 1, "num_classes": 10}})
    dataset = reference_dataset(saved, "test", str(shared_data))
    assert len(dataset) == 10000


class _Indexed:
    """A dataset whose item i is the image filled with i (label i % 10): shows which items a set holds."""

    def __len__(self):
        return 100

    def get_batch(self, index, generator=None):
        import torch
        index = torch.as_tensor(index)
        return index.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone(), index % 10


def test_label_bank_holds_the_reference_set_and_more_never_the_ceiling_set():
    from diffuse.jobs.evaluate import label_bank, real_sets
    data = _Indexed()
    x_a, y_a, x_b, _ = real_sets(data, 20)
    ids = lambda x: set(x[:, 0, 0, 0].long().tolist())  # noqa: E731
    bank_x, bank_y = label_bank(data, 20, 70, (x_a, y_a))
    assert len(bank_y) == 70 and ids(x_a) <= ids(bank_x) and not ids(x_b) & ids(bank_x)
    assert bank_x[:20].equal(x_a)  # the FD reference set first, in the same order
    assert (bank_y == bank_x[:, 0, 0, 0].long() % 10).all()
    assert len(label_bank(data, 20, 500, (x_a, y_a))[1]) == 80  # capped by the data (100 − the 20 of the ceiling set)
    assert len(label_bank(data, 20, 5, (x_a, y_a))[1]) == 20  # never smaller than the reference set


@pytest.mark.slow
def test_evaluate_memorization_on_the_training_items(checkpoint):
    """metrics=[fd,memorization]: the samples against the run's 64 training shapes (the same seed, so the same
    items); a 3-step model copies nothing, and the most suspect pairs are written."""
    root, ckpt = checkpoint
    proc = run_cli(["evaluate", f"checkpoint={ckpt}", "sampler=ddim", "sampler.steps=3", "num_samples=8",
                    "metrics=[fd,memorization]", "memorization_k=10", "device=cpu"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _metrics(proc.stdout)
    assert r["memorization_train_items"] == 64 and r["memorization_k"] == 10
    assert r["memorization_copy_rate"] == 0.0 and 0 < r["memorization_median_ratio"] <= 1
    assert "memorization: copy rate 0.000" in proc.stdout
    metrics_path = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("metrics: "))
    assert (Path(metrics_path).parent / "memorization.png").is_file()


@pytest.mark.slow
def test_evaluate_digits_judges_mnist_and_refuses_other_shapes(checkpoint, shared_data, tmp_path):
    """metrics=[digits]: ccexam's classifier on an (untrained, 2-step) MNIST run: the floor is far below the
    samples' distance, the real ceiling is the classifier's ≈ 0.99; a shapes run is refused before sampling."""
    root, ckpt = checkpoint
    refused = run_cli(["evaluate", f"checkpoint={ckpt}", "metrics=[digits]", "num_samples=4", "device=cpu"], root)
    assert refused.returncode == 1 and "judges MNIST-shaped items [1, 28, 28]; this run's are [1, 8, 8]" in refused.stderr
    train = [o for o in TINY if not o.startswith(("dataset.resolution", "dataset.size"))]
    assert run_cli(["train", *train, "dataset=mnist", f"dataset.root={shared_data}", "dataset.split=test",
                    "trainer.max_steps=2"], tmp_path).returncode == 0
    mnist_ckpt = next(tmp_path.glob("outputs/*/*/checkpoints/last.ckpt"))
    proc = run_cli(["evaluate", f"checkpoint={mnist_ckpt}", "metrics=[fd,digits]", "num_samples=200",
                    "sampler.steps=3", f"data_root={shared_data}", "device=cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = _metrics(proc.stdout)
    assert r["digit_fd"] > 1.5 * r["digit_fd_real_vs_real"] > 0  # FD of 128-d features at 200: a biased floor
    assert 0 <= r["digit_accuracy"] <= 1 and r["digit_accuracy_real"] >= 0.9
    assert "digit judge (ccexam's MNIST CNN)" in proc.stdout
