"""`diffuse evaluate`: sample quality of a checkpoint against real data of the dataset it was trained on.

Draws `num_samples` images with the run's sampler (or `sampler=X`), as `diffuse sample` would, and compares
them with as many real images (the `reference_split` of datasets that have splits; latent runs: decoded,
against the pixel data). Metrics (diffuse/metrics.py): FD on fixed random-conv features with its
real-vs-real floor at the same count, label agreement for conditional models, the off-range fraction and
the brightness statistics; with `metrics=[fd,fid,kid,prc]` also Inception FID, KID and precision/recall
through torch-fidelity (diffuse/fidelity.py; 2-D grey/RGB only, weights from a local file, never downloaded).
Writes metrics.json (and samples.npz with save_samples) into its run dir. Under torchrun each process draws a
share of the samples and rank 0 scores them (see jobs/sampling.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffuse import fidelity, media, metrics
from diffuse.building import build, without_locations
from diffuse.data.base import split_config
from diffuse.data.latent import is_latent_run
from diffuse.diffusion.generation import class_labels
from diffuse.diffusion.guidance import guidance_note
from diffuse.errors import DiffuseError
from diffuse.jobs.common import on_rank0, report
from diffuse.jobs.sampling import open_run, sampling_processes
from diffuse.digit_classifier import DigitFeatures, load_digit_classifier
from diffuse.memorization import DEFAULT_K, DEFAULT_THRESHOLD, memorization
from diffuse.training.distributed import DistInfo


def reference_dataset(saved: DictConfig, split: str | None, data_root: str | None, download: bool = False):
    """The run's own data (for latent runs the pixel data under the VAE), on the asked split, read from where
    *this* command says: `data_root` (a folder dataset's folder; the torchvision sets' root, default
    $DIFFUSE_DATA or ~/.cache/diffuse/data) and `download`. The stored config names the dataset and its shape;
    where it lies, caches or downloads from it never says (building.without_locations)."""
    node = saved.dataset.data if is_latent_run(saved) else saved.dataset
    node = OmegaConf.to_container(node, resolve=True)
    given = {"root": data_root, "path": data_root, "download": bool(download)}
    node = without_locations(node, {k: v for k, v in given.items() if k in node and v is not None})
    if "path" in node and not node["path"]:
        raise DiffuseError("the run trained on a folder of its own (dataset=folder), and a checkpoint never chooses "
                           "the files read: give that folder with data_root=FOLDER")
    node = split_config(node, split) or node
    return build(OmegaConf.create(node), "dataset")


def _reference_order(dataset) -> torch.Tensor:
    """A fixed random order of the reference data: the first n are the reference set, the next n the second."""
    return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1234))


def real_sets(dataset, n: int):
    """Two disjoint random sets of real images with labels: the reference (x_a [n, C, *sp], y_a [n]) and,
    when the dataset holds 2n images, a second set for the floors (x_b, y_b; else None, None)."""
    if len(dataset) < n:
        raise DiffuseError(f"num_samples={n} but the reference data holds only {len(dataset)} images")
    order = _reference_order(dataset)
    fixed = torch.Generator().manual_seed(0)  # any augmentation (hflip) the same every time
    x_a, y_a = dataset.get_batch(order[:n], fixed)
    if len(dataset) < 2 * n:
        return x_a.float().cpu(), y_a.cpu(), None, None
    x_b, y_b = dataset.get_batch(order[n:2 * n], fixed)
    return x_a.float().cpu(), y_a.cpu(), x_b.float().cpu(), y_b.cpu()


def label_bank(dataset, n: int, size: int, reference: tuple[torch.Tensor, torch.Tensor]):
    """The real images label agreement looks up (x [M, C, *sp], y [M]): the reference set (x_a, y_a of
    real_sets, reused, not loaded again) and further images, up to `size` (at least n), never the second set,
    whose own agreement is the ceiling. A bigger bank judges better: on MNIST the nearest of 1000 test digits
    has the right class 90 % of the time, of 9000 about 96 %."""
    x_a, y_a = reference
    extra = _reference_order(dataset)[2 * n:][:max(int(size) - n, 0)]
    if len(extra) == 0:
        return x_a, y_a
    x, y = dataset.get_batch(extra, torch.Generator().manual_seed(0))
    return torch.cat([x_a, x.float().cpu()]), torch.cat([y_a, y.cpu()])


def label_scores(x: torch.Tensor, labels: torch.Tensor, bank: tuple[torch.Tensor, torch.Tensor],
                 real_b: torch.Tensor | None, real_b_y: torch.Tensor | None) -> dict:
    """label_agreement of samples x asked for `labels`, the same rule's score on the real second set (its
    ceiling; None without one) and the bank's size."""
    bank_x, bank_y = bank
    return {"label_agreement": float((metrics.nearest_label(x, bank_x, bank_y) == labels).float().mean()),
            "label_agreement_real": None if real_b is None else
            float((metrics.nearest_label(real_b, bank_x, bank_y) == real_b_y).float().mean()),
            "label_bank": len(bank_y)}


OWN_METRICS = ("memorization", "digits")  # computed here, beside fd (the Inception ones: fidelity.METRICS)


def _metric_list(value) -> list[str]:
    """`metrics` (a list, or one name) as a list of names."""
    return [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]


def asked(cfg: DictConfig, name: str) -> bool:
    return name in _metric_list(cfg.get("metrics", ["fd"]))


def digit_scores(judge, x: torch.Tensor, labels: torch.Tensor | None, real_a: torch.Tensor,
                 real_b: torch.Tensor | None, real_b_y: torch.Tensor | None) -> dict:
    """metrics=[…, digits] on MNIST-shaped items: `judge`, ccexam's classifier (diffuse/digit_classifier.py,
    trained by others): its accuracy on the asked class (and on the real second set: the ceiling), and the
    Fréchet distance of its 128-d penultimate features to the reference set (and real vs real: the floor)."""
    features = DigitFeatures(judge)
    reference_feats = metrics.features(features, real_a)
    out = {"digit_fd": metrics.frechet_distance(metrics.features(features, x), reference_feats),
           "digit_fd_real_vs_real": None if real_b is None else
           metrics.frechet_distance(metrics.features(features, real_b), reference_feats),
           "digit_accuracy": None, "digit_accuracy_real": None}
    if labels is not None:
        out["digit_accuracy"] = float((judge.predict(x) == labels).float().mean())
        if real_b is not None:
            out["digit_accuracy_real"] = float((judge.predict(real_b) == real_b_y).float().mean())
    return out


def metric_names(value) -> tuple[bool, tuple[str, ...]]:
    """`metrics` (a list, or one name) → (random-conv FD wanted, the Inception metrics asked for)."""
    names = _metric_list(value)
    unknown = [v for v in names if v not in ("fd", *fidelity.METRICS, *OWN_METRICS)]
    if unknown:
        raise DiffuseError(f"metrics: unknown {unknown}; choose from fd, {', '.join(fidelity.METRICS)}, "
                           f"{', '.join(OWN_METRICS)} (e.g. metrics=[fd,fid])")
    return "fd" in names, tuple(m for m in fidelity.METRICS if m in names)


def memorization_scores(cfg: DictConfig, saved: DictConfig, x: torch.Tensor, run_dir: Path) -> dict:
    """The samples x against the run's training items (its train split; at most memorization_max_train of them,
    unflipped): the copy rate of the ratio test (diffuse/memorization.py), and memorization.png with the most
    suspect samples beside their nearest training items (a pair per row)."""
    train = reference_dataset(saved, "train", cfg.get("data_root"), cfg.get("download", False))
    if hasattr(train, "hflip"):
        train.hflip = False  # the items as stored, not a random flip of them
    n = min(len(train), int(cfg.get("memorization_max_train") or len(train)))
    items = torch.cat([train.get_batch(torch.arange(i, min(n, i + 4096)), None)[0].float().cpu()
                       for i in range(0, n, 4096)])
    found = memorization(x, items, k=int(cfg.get("memorization_k", DEFAULT_K)),
                         threshold=float(cfg.get("memorization_threshold", DEFAULT_THRESHOLD)))
    worst = found.closest(min(8, len(x)))
    run_dir.mkdir(parents=True, exist_ok=True)
    media.save_grid(torch.stack([x[worst], items[found.nearest[worst]]], 1).flatten(0, 1),
                    run_dir / "memorization.png", nrow=2, view=cfg.get("view", "slices"))
    return {"memorization_copy_rate": found.copy_rate, "memorization_median_ratio": float(found.ratio.median()),
            "memorization_k": found.k, "memorization_threshold": found.threshold, "memorization_train_items": n}


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    with sampling_processes(cfg, Path(run_dir)) as (dist, device, run_dir), torch.inference_mode():
        return _run(cfg, run_dir, device, dist)


def reference(cfg: DictConfig, saved: DictConfig, n: int, inception: tuple[str, ...]):
    """The dataset and its two real sets (real_sets), checked against the Inception metrics asked for."""
    dataset = reference_dataset(saved, cfg.get("reference_split"), cfg.get("data_root"), cfg.get("download", False))
    real = real_sets(dataset, n)
    if inception:  # 1-D / 3-D data, odd channel counts, settings that cannot work at n: refused before sampling
        fidelity.check_images(real[0].shape[1:])
        fidelity.check_settings(n, inception, cfg.kid_subset_size, cfg.prc_neighborhood)
    return dataset, real


def _run(cfg: DictConfig, run_dir: Path, device: torch.device, dist: DistInfo) -> dict:
    """The recipe: check what is asked, open the run, load the real sets, draw, decode, score, write
    metrics.json (and samples.npz), report. Under several processes all draw; rank 0 alone loads the real
    data and scores, and its refusals (before sampling) stop every rank."""
    want_fd, inception = metric_names(cfg.get("metrics", ["fd"]))
    # before anything slow: no weights (or no torch-fidelity) must not cost the user a sampling run
    weights = on_rank0(lambda: fidelity.find_weights(cfg.get("inception_weights")), dist,
                       share=False) if inception else None
    n = int(cfg.num_samples)
    if n < 2:
        raise DiffuseError(f"num_samples must be at least 2 (a covariance needs two); got {n}")
    # its package missing: one line before sampling; rank 0 keeps the judge for the scoring
    judge = on_rank0(lambda: load_digit_classifier(device), dist, share=False) if asked(cfg, "digits") else None
    session = open_run(cfg, device, dist)
    saved, sampler = session.run.config, session.plan.sampler
    dataset, (real_a, real_y, real_b, real_b_y) = on_rank0(lambda: reference(cfg, saved, n, inception), dist,
                                                           share=False) or (None, (None,) * 4)
    if dist.is_main and asked(cfg, "digits") and tuple(real_a.shape[1:]) != (1, 28, 28):
        raise DiffuseError(f"metrics=digits judges MNIST-shaped items [1, 28, 28]; this run's are "
                           f"{list(real_a.shape[1:])}")
    labels = class_labels(n, session.num_classes)
    labels = None if labels is None else labels[:n]  # rounded up per class by class_labels; keep n
    out, seconds = session.draw(n, labels, desc=f"evaluate ({type(sampler).__name__})")
    if not dist.is_main:
        return {}
    x = torch.cat([session.decode(out.x[i:i + cfg.batch_size].to(device)).float().cpu()
                   for i in range(0, n, cfg.batch_size)]).clamp(-1, 1)
    if x.shape[1:] != real_a.shape[1:]:
        raise DiffuseError(f"samples are {tuple(x.shape[1:])} but the reference data is {tuple(real_a.shape[1:])}")

    result = {
        "checkpoint": str(session.run.path), "step": session.run.step, "sampler": type(sampler).__name__,
        "sampler_config": OmegaConf.to_container(session.sampler_config, resolve=True),
        "guidance_scale": session.plan.guidance_scale, "precision": session.precision,
        "steps": int(sampler.steps), "clip_x0": sampler.clip_x0, "nfe": int(out.nfe), "num_samples": n,
        "seconds": round(seconds, 3),
    }
    if want_fd:
        net = metrics.RandomFeatures(dim=x.dim() - 2, channels=x.shape[1]).to(device)
        feats_real = metrics.features(net, real_a)
        result["fd"] = metrics.frechet_distance(metrics.features(net, x), feats_real)
        result["fd_real_vs_real"] = None if real_b is None else metrics.frechet_distance(metrics.features(net, real_b),
                                                                                          feats_real)
    result.update({"label_agreement": None, "label_agreement_real": None, "label_bank": None} if labels is None
                  else label_scores(x, labels, label_bank(dataset, n, cfg.get("label_bank", n), (real_a, real_y)),
                                    real_b, real_b_y))
    result.update({
        "off_range_fraction": metrics.off_range_fraction(x, real_a),
        "mean": float(x.mean()), "std": float(x.std()), "real_mean": float(real_a.mean()),
        "real_std": float(real_a.std()),
    })
    if want_fd:
        result["metric"] = "FD of fixed random-conv features (diffuse/metrics.py), comparable at equal num_samples only"
    if inception:
        floor = real_b if "fid" in inception else None  # FID's real-vs-real floor at the same N, like FD's (None:
                                                        # the data has too few items for a second real set)
        bar = tqdm(total=(2 if floor is None else 3) * n, desc="Inception features (torch-fidelity)",
                   dynamic_ncols=True)
        start = time.perf_counter()
        scores = fidelity.compute(x, real_a, inception, weights=weights, device=device,
                                  batch_size=cfg.inception_batch_size, kid_subset_size=cfg.kid_subset_size,
                                  kid_subsets=cfg.kid_subsets, prc_neighborhood=cfg.prc_neighborhood,
                                  progress=bar.update, real_vs_real=floor)
        # precision/recall of Kynkäänniemi et al. as prc_*: "precision" is the network's number format here
        result.update({("prc_" + k if k in ("precision", "recall") else k): v for k, v in scores.items()})
        bar.close()
        result["inception_seconds"] = round(time.perf_counter() - start, 3)
        result["inception_metric"] = ("torch-fidelity InceptionV3 pool3 (2048-d; precision/recall too) on uint8 RGB, "
                                      "grey replicated, resized to 299 by torch-fidelity; comparable only at equal "
                                      "num_samples and the same weights (inception_weights_sha256)")
    if judge is not None:
        result.update(digit_scores(judge, x, labels, real_a, real_b, real_b_y))
    if asked(cfg, "memorization"):
        result.update(memorization_scores(cfg, saved, x, run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(result, indent=2))
    if cfg.save_samples:
        arrays = {"x": x.numpy().astype(np.float32)}
        if labels is not None:
            arrays["y"] = labels.numpy().astype(np.int64)
        np.savez(run_dir / "samples.npz", **arrays)
    report(*summary_lines(result, session.run.step), f"metrics: {path}")
    return result


def summary_lines(result: dict, step: int) -> list[str]:
    """metrics.json's numbers as the lines `diffuse evaluate` prints."""
    n = result["num_samples"]
    lines = [f"{result['sampler']} {result['steps']} steps{guidance_note(result.get('guidance_scale'))}, "
             f"{result['nfe']} NFE, {n} samples, {result.get('precision', 'fp32')}, step {step}:"]
    if "fd" in result:
        floor = "" if result.get("fd_real_vs_real") is None else f" (real vs real: {result['fd_real_vs_real']:.3f})"
        lines.append(f"  FD {result['fd']:.3f}{floor}")
    if "inception_metric" in result:
        fid_floor = f" (real vs real: {result['fid_real_vs_real']:.3f})" if "fid_real_vs_real" in result else ""
        parts = [f"FID {result['fid']:.3f}{fid_floor}" if "fid" in result else "",
                 f"KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}" if "kid_mean" in result else "",
                 f"precision {result['prc_precision']:.3f} recall {result['prc_recall']:.3f}"
                 if "prc_precision" in result else ""]
        lines.append(f"  {'  '.join(p for p in parts if p)} (Inception, {n} vs {n} images, "
                     f"weights {result['inception_weights']}, sha256 {result['inception_weights_sha256'][:8]})")
    if result["label_agreement"] is not None:
        ceiling = result["label_agreement_real"]
        lines.append(f"  label agreement {result['label_agreement']:.3f}"
                     + ("" if ceiling is None else f" (real images, same rule: {ceiling:.3f})"))
    if "digit_fd" in result:
        floor = "" if result["digit_fd_real_vs_real"] is None else f" (real vs real: {result['digit_fd_real_vs_real']:.3f})"
        accuracy = "" if result["digit_accuracy"] is None else (
            f"  accuracy on the asked class {result['digit_accuracy']:.3f}"
            + ("" if result["digit_accuracy_real"] is None else f" (real: {result['digit_accuracy_real']:.3f})"))
        lines.append(f"  digit judge (ccexam's MNIST CNN): FD of its features {result['digit_fd']:.3f}{floor}{accuracy}")
    if "memorization_copy_rate" in result:
        lines.append(f"  memorization: copy rate {result['memorization_copy_rate']:.3f}, median d1/d{result['memorization_k']}"
                     f" {result['memorization_median_ratio']:.3f} (copy: < {result['memorization_threshold']:.3f}; "
                     f"{result['memorization_train_items']} training items)")
    lines.append(f"  off-range {result['off_range_fraction']:.3f}  mean/std {result['mean']:.3f}/{result['std']:.3f} "
                 f"(real {result['real_mean']:.3f}/{result['real_std']:.3f})")
    return lines
