"""`diffuse edit`: a trained run used on items of your own (diffusion/editing.py does the math).

  mode=inpaint      fill in where `mask` is False: num_samples completions per input (method auto | replacement |
                    reconstruction | repaint)
  mode=img2img      SDEdit: the input noised to t = strength, then the run's sampler (labels=K turns it into class K)
  mode=invert       encode each input to noise along the probability-flow ODE and decode it back
  mode=interpolate  inputs 2k and 2k+1 encoded, their noises slerped over `frames`, each frame decoded

Inputs: `input.path` (a samples.npz, or a folder as dataset=folder reads it) or the run's own dataset's held-out
items (read from input.root: a checkpoint never chooses which files are read); in [−1, 1], of the run's item
shape. Latent runs edit the VAE's latents of the inputs (masks downsampled, masks.to_grid) and decode.

Writes into its own run dir: edits.npz (inputs, outputs, and per mode masks / noise / frames, labels), grid.png
(a row per input: inpaint: input | masked input | completions; img2img: input | outputs; invert: input | noise
(pixel runs) | decoded; interpolate: the frames from one input to the other) and, with animation.enabled, the process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from diffuse import media
from diffuse.data.base import heldout_of
from diffuse.data.latent import encode_data, is_latent_run, latent_vae
from diffuse.devices import resolve_device
from diffuse.diffusion import editing, masks
from diffuse.diffusion.guidance import Denoiser, guidance_note
from diffuse.diffusion.samplers import NoiseSource
from diffuse.dims import item_shape
from diffuse.errors import DiffuseError
from diffuse.jobs.common import report
from diffuse.jobs.evaluate import reference_dataset
from diffuse.jobs.sampling import SamplingSession, open_run

log = logging.getLogger(__name__)

MODES = ("inpaint", "img2img", "invert", "interpolate")
RANGE_SLACK = 1e-3  # inputs may overshoot [−1, 1] by rounding (a uint8 image read back) but no more


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    if cfg.mode not in MODES:
        raise DiffuseError(f"mode must be one of {', '.join(MODES)}; got {cfg.mode!r}")
    device = resolve_device(cfg.device)
    with torch.no_grad():  # not inference_mode: reconstruction guidance differentiates through the network
        session = open_run(cfg, device)
        return Edit(cfg, session, device).run(Path(run_dir))


def data_shape_of(run_config) -> tuple[int, ...]:
    """[C, *spatial] of the run's data (for a latent run: of the data its VAE encodes, not of the latents)."""
    node = run_config["dataset"]
    if is_latent_run(run_config):
        node = node["data"]
    return item_shape(node["channels"], node["resolution"], run_config["dim"])


def read_inputs(cfg: DictConfig, run_config, shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """The first input.count items → (x [N, C, *spatial] fp32 in [−1, 1], y [N] int64 or None), checked."""
    count, path = int(cfg.input.count), cfg.input.get("path")
    if path:
        x, y = _read_path(Path(str(path)).expanduser(), shape)
    else:
        x, y = _read_run_dataset(run_config, cfg.input.root, count)
    x, y = x[:count].float(), None if y is None else y[:count].long()
    if tuple(x.shape[1:]) != shape:
        raise DiffuseError(f"the inputs are items of shape {list(x.shape[1:])}; the run's are {list(shape)} "
                           f"([channels, *spatial])")
    if not torch.isfinite(x).all() or x.abs().max() > 1 + RANGE_SLACK:
        raise DiffuseError(f"the inputs must be finite and in [−1, 1] (the run's data range); got values in "
                           f"[{x.min().item():.3g}, {x.max().item():.3g}]")
    return x.clamp(-1, 1), y


def _read_path(path: Path, shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    if not path.exists():
        raise DiffuseError(f"input.path {path} does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise DiffuseError(f"input.path {path}: a file must be a samples.npz (arrays x, and y); a folder may "
                               f"hold images or .npy arrays")
        try:
            with np.load(path, allow_pickle=False) as data:
                x = torch.from_numpy(np.asarray(data["x"], dtype=np.float32))
                y = torch.from_numpy(np.asarray(data["y"], dtype=np.int64)) if "y" in data else None
        except Exception as e:  # noqa: BLE001 - a foreign or damaged file
            raise DiffuseError(f"cannot read input.path {path}: {' '.join(str(e).split())}") from None
        return x, y
    from diffuse.data.folder import FolderDataset
    folder = FolderDataset(path=path, dim=len(shape) - 1, resolution=shape[-1], channels=shape[0])
    return folder.get_batch(torch.arange(len(folder)), None)[0], None


def _read_run_dataset(run_config, root, count: int) -> tuple[Tensor, Tensor | None]:
    """The held-out items of the run's own dataset (the pixel data under a latent run's VAE), read from `root`
    (this command's input.root, as evaluate reads its reference data)."""
    node = run_config["dataset"]["data"] if is_latent_run(run_config) else run_config["dataset"]
    if "path" in node:
        raise DiffuseError("the run trained on a folder, which has no held-out items: give input.path (a folder "
                           "or a samples.npz)")
    dataset = reference_dataset(run_config, None, str(root))
    items = heldout_of(dataset, count) or dataset
    if items is dataset:
        log.info("the run's dataset has no held-out items: editing its first %d training items", count)
    n = min(count, len(items))
    return items.get_batch(torch.arange(n), torch.Generator().manual_seed(0))


def inpaint_method(method: str, follows_a_class: bool) -> str:
    """method=auto: replacement where the completions follow a class (the class steers the filled region, and
    reconstruction guidance on top overshoots it), reconstruction where they follow none (there only its gradient
    lets the known region steer what is filled in). docs/editing.md has the MNIST numbers behind it."""
    if method != "auto":
        return method
    chosen = "replacement" if follows_a_class else "reconstruction"
    log.info("method=auto: %s (the completions follow %s)", chosen, "a class" if follows_a_class else "no class")
    return chosen


class Edit:
    """One edit job: the session's network and sampler on the inputs (in latent space for latent runs)."""

    def __init__(self, cfg: DictConfig, session: SamplingSession, device: torch.device):
        self.cfg, self.session, self.device = cfg, session, device
        self.plan, self.sampler = session.plan, session.plan.sampler
        self.vae = latent_vae(session.run.state, device)
        self.data_shape = data_shape_of(session.run.config)

    # -- data and latent space --------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        return x if self.vae is None else encode_data(self.vae, x)

    def decode(self, z: Tensor) -> Tensor:
        return self.session.decode(z.float()).clamp(-1, 1)

    def labels(self, y: Tensor | None, n: int) -> Tensor | None:
        """The labels the outputs are drawn with ([n]), or None (unconditional, or no labels: the null class)."""
        classes = self.session.num_classes
        if not classes:
            return None
        choice = self.cfg.labels
        if str(choice) == "infer":
            raise DiffuseError(f"labels=infer reads each input's class from what is known of it: mode=inpaint or "
                               f"img2img, not {self.cfg.mode}")
        if str(choice) == "input":
            if y is None:
                log.info("the inputs carry no labels: the outputs are drawn for the null class (labels=K picks one)")
                return None
            if (y < 0).any() or (y >= classes).any():
                raise DiffuseError(f"the inputs' labels lie outside the run's {classes} classes")
            return y
        try:
            label = int(choice)
        except (TypeError, ValueError):
            raise DiffuseError(f"labels must be input, infer or a class index 0…{classes - 1}; got {choice!r}") \
                from None
        if not 0 <= label < classes:
            raise DiffuseError(f"labels={label} but the run has {classes} classes (0…{classes - 1})")
        return torch.full((n,), label, dtype=torch.long)

    def inferred_labels(self, z: Tensor, known: Tensor) -> Tensor | None:
        """labels=infer: each input's class from its known region (editing.infer_labels: the run's network as a
        diffusion classifier, editing.infer_passes(num_classes) passes per input), [n]; None for an unconditional
        run. Its noise draws with seeds after all the outputs' (seed + outputs + i for input i)."""
        classes = self.session.num_classes
        if not classes:
            log.info("labels=infer: the run is unconditional; nothing to infer")
            return None
        out, first = [], int(self.cfg.seed) + len(z) * int(self.cfg.num_samples)
        for rows in self.batches(len(z)):
            noise = NoiseSource(range(first + rows.start, first + rows.stop), self.device)
            mask = known[rows] if len(known) == len(z) else known
            out.append(editing.infer_labels(self._unguided, z[rows].to(self.device), mask.to(self.device),
                                            classes, noise).cpu())
        labels = torch.cat(out)
        log.info("labels=infer: classes %s (%d network passes per input)", labels.tolist()[:16],
                 editing.infer_passes(classes))
        return labels

    def _unguided(self, labels: Tensor) -> Denoiser:
        return Denoiser(self.session.model, self.plan.schedule, self.plan.prediction, y=labels, guidance_scale=0.0,
                        autocast_dtype=self.plan.autocast_dtype)

    def _labels_for(self, z: Tensor, known: Tensor, rows_y: Tensor | None, k: int) -> Tensor | None:
        if str(self.cfg.labels) == "infer":
            inferred = self.inferred_labels(z, known)
            return None if inferred is None else inferred.repeat_interleave(k)
        return self.labels(rows_y, len(z) * k)

    def denoiser(self, labels: Tensor | None, rows: slice = slice(None)) -> Denoiser:
        """The (guided) denoiser for the batch `rows` of `labels`; without labels, the null class unguided."""
        y = None if labels is None else labels[rows]
        scale = self.plan.guidance_scale if y is not None or self.session.num_classes == 0 else 0.0
        return Denoiser(self.session.model, self.plan.schedule, self.plan.prediction,
                        y=None if y is None else y.to(self.device), guidance_scale=scale,
                        autocast_dtype=self.plan.autocast_dtype)

    def batches(self, n: int):
        size = int(self.cfg.batch_size)
        for start in range(0, n, size):
            yield slice(start, min(n, start + size))

    # -- the job ----------------------------------------------------------------------------------------
    def run(self, run_dir: Path) -> dict:
        x, y = read_inputs(self.cfg, self.session.run.config, self.data_shape)
        mode = self.cfg.mode
        if mode in ("invert", "interpolate"):
            editing.check_invertible(self.sampler)
        start = time.perf_counter()
        result = getattr(self, mode)(x, y)
        seconds = time.perf_counter() - start
        outputs = result.pop("_count")
        log.info("%s: %d outputs × %d steps%s (%s), %s, %.1f s (%.2f s per output)", mode, outputs, self.plan.steps,
                 guidance_note(self.plan.guidance_scale), type(self.sampler).__name__, self.session.precision,
                 seconds, seconds / max(outputs, 1))
        run_dir.mkdir(parents=True, exist_ok=True)
        grid_rows, row_length = result.pop("_grid")
        frames = result.pop("_frames", None)
        paths = {"edits": run_dir / "edits.npz"}
        np.savez(paths["edits"], **{k: (v.numpy() if isinstance(v, Tensor) else np.asarray(v)) for k, v in result.items()})
        paths["grid"] = media.save_grid(grid_rows, run_dir / "grid.png", nrow=row_length, view=self.cfg.view)
        if self.cfg.animation.enabled and frames:
            anim = self.cfg.animation
            paths["animation"] = media.save_animation(frames, run_dir / f"animation.{anim.format}", nrow=row_length
                                                      if mode == "interpolate" else None, fps=int(anim.fps),
                                                      hold_last=float(anim.hold), view=self.cfg.view)
        report(*(f"{name}: {path}" for name, path in paths.items()))
        return {"checkpoint": str(self.session.run.path), "mode": mode, "outputs": outputs, "seconds": seconds,
                **{k: str(v) for k, v in paths.items()}}

    def _mask(self, n: int) -> Tensor:
        """bool [n, 1, *spatial] in data space (True = known)."""
        spatial = self.data_shape[1:]
        spec = str(self.cfg.mask)
        if spec in masks.PATTERNS or not Path(spec).expanduser().exists():  # not a file: a pattern, or one line
            return masks.named_mask(spec, spatial, batch=n, seed=int(self.cfg.seed))
        mask = masks.load_mask(spec, spatial)
        if mask.shape[0] not in (1, n):
            raise DiffuseError(f"mask {spec} holds {mask.shape[0]} masks for {n} inputs (give one, or one per input)")
        return mask.expand(n, *mask.shape[1:])

    def _recorder(self, states: list[Tensor]):
        """A sampler callback keeping about animation.frames states of a batch (decoded at the end)."""
        if not self.cfg.animation.enabled:
            return None
        every = max(1, (self.plan.steps * (int(self.cfg.resample) if self.cfg.method == "repaint" else 1))
                    // int(self.cfg.animation.frames))

        def keep(i, t, x, x0):
            if i % every == 0:
                states.append(x.detach().float().cpu())
        return keep

    def _repeated(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None, int]:
        k = int(self.cfg.num_samples)
        return x.repeat_interleave(k, 0), None if y is None else y.repeat_interleave(k, 0), k

    def _frames(self, per_batch: list[list[Tensor]]) -> list[Tensor] | None:
        """Decoded animation frames over all rows (batches joined), or None."""
        if not per_batch or not per_batch[0]:
            return None
        steps = min(len(states) for states in per_batch)
        return [self.decode(torch.cat([states[i] for states in per_batch])) for i in range(steps)]

    def inpaint(self, x: Tensor, y: Tensor | None) -> dict:
        n = len(x)
        data_mask = self._mask(n)
        z = self.encode(x)
        latent_mask = masks.to_grid(data_mask, z.shape[2:])
        rows_x, rows_y, k = self._repeated(z, y)
        rows_mask = latent_mask.repeat_interleave(k, 0)
        labels = self._labels_for(z, latent_mask, rows_y, k)
        method = inpaint_method(str(self.cfg.method), labels is not None)
        outs, anim = [], []
        for rows in self.batches(len(rows_x)):
            noise = NoiseSource(range(int(self.cfg.seed) + rows.start, int(self.cfg.seed) + rows.stop), self.device)
            states: list[Tensor] = []
            out = editing.inpaint(self.denoiser(labels, rows), self.sampler,
                                  rows_x[rows].to(self.device), rows_mask[rows], noise, method=method,
                                  jump_length=int(self.cfg.jump_length), resample=int(self.cfg.resample),
                                  reconstruction_weight=float(self.cfg.reconstruction_weight),
                                  callback=self._recorder(states))
            outs.append(out.cpu())
            anim.append(states)
        completed = editing.paste(self.decode(torch.cat(outs)), x.repeat_interleave(k, 0), data_mask.repeat_interleave(k, 0))
        shown = torch.where(data_mask, x, torch.full_like(x, -1.0))  # the input with the region to fill in blank
        grid = torch.cat([x[:, None], shown[:, None], completed.view(n, k, *x.shape[1:])], 1).flatten(0, 1)
        result = {"inputs": x, "masks": data_mask, "outputs": completed.view(n, k, *x.shape[1:]), "method": method,
                  "_count": len(completed), "_grid": (grid, k + 2), "_frames": self._frames(anim)}
        if self.vae is not None:
            result["latent_masks"] = latent_mask
        if labels is not None:
            result["labels"] = labels.view(n, k)
        return result

    def img2img(self, x: Tensor, y: Tensor | None) -> dict:
        n = len(x)
        z = self.encode(x)
        rows_x, rows_y, k = self._repeated(z, y)
        labels = self._labels_for(z, torch.ones(1, 1, *z.shape[2:], dtype=torch.bool), rows_y, k)
        outs, anim, t_start = [], [], 1.0
        for rows in self.batches(len(rows_x)):
            noise = NoiseSource(range(int(self.cfg.seed) + rows.start, int(self.cfg.seed) + rows.stop), self.device)
            states: list[Tensor] = []
            out, t_start = editing.sdedit(self.denoiser(labels, rows), self.sampler,
                                          rows_x[rows].to(self.device), float(self.cfg.strength), noise,
                                          callback=self._recorder(states))
            outs.append(out.cpu())
            anim.append(states)
        outputs = self.decode(torch.cat(outs)).view(n, k, *x.shape[1:])
        distance = (outputs - x[:, None]).flatten(2).norm(dim=2).mean().item()
        log.info("img2img at strength %g (from t = %.4g): mean L2 distance to the input %.4g", float(self.cfg.strength),
                 t_start, distance)
        grid = torch.cat([x[:, None], outputs], 1).flatten(0, 1)
        result = {"inputs": x, "outputs": outputs, "strength": float(self.cfg.strength), "t_start": t_start,
                  "_count": n * k, "_grid": (grid, k + 1), "_frames": self._frames(anim)}
        if labels is not None:
            result["labels"] = labels.view(n, k)
        return result

    def _encode_to_noise(self, z: Tensor, labels: Tensor | None) -> Tensor:
        out = []
        for rows in self.batches(len(z)):
            den = self.denoiser(labels, rows)
            out.append(editing.invert(den, self.sampler, z[rows].to(self.device)).cpu())
        return torch.cat(out)

    def _decode_from_noise(self, noise: Tensor, labels: Tensor | None) -> Tensor:
        grid = self.sampler.grid(self.plan.schedule)
        out = []
        for rows in self.batches(len(noise)):
            den = self.denoiser(labels, rows)
            out.append(self.sampler.run(den, noise[rows].to(self.device), grid, None, None).cpu())
        return torch.cat(out)

    def invert(self, x: Tensor, y: Tensor | None) -> dict:
        z = self.encode(x)
        labels = self.labels(y, len(x))
        noise = self._encode_to_noise(z, labels)
        decoded = self.decode(self._decode_from_noise(noise, labels))
        error = ((decoded - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12))
        log.info("invert: %d steps up and down, relative L2 reconstruction error %.4g (mean), %.4g (max)",
                 self.plan.steps, error.mean().item(), error.max().item())
        report(f"reconstruction_error: {error.mean().item():.6g}")
        columns = [x, decoded]
        if self.vae is None:  # the noise itself, in units of the prior's spread, ±3 across the grey range
            columns.insert(1, (noise / float(self.plan.schedule.prior_std)).clamp(-3, 3) / 3)
        grid = torch.stack(columns, 1).flatten(0, 1)
        result = {"inputs": x, "noise": noise, "outputs": decoded, "reconstruction_error": error,
                  "_count": len(x), "_grid": (grid, len(columns))}
        if labels is not None:
            result["labels"] = labels
        return result

    def interpolate(self, x: Tensor, y: Tensor | None) -> dict:
        if len(x) < 2:
            raise DiffuseError("interpolate walks from input 2k to input 2k+1: give at least 2 inputs (input.count)")
        pairs = len(x) // 2
        x = x[:2 * pairs]
        # labels=input: the null class, so that both ends decode back to their inputs whatever their classes;
        # labels=K: class K for the encodings and every frame
        labels = None if str(self.cfg.labels) == "input" else self.labels(None, 2 * pairs)
        noise = self._encode_to_noise(self.encode(x), labels)
        a, b = noise[0::2], noise[1::2]
        frames = int(self.cfg.frames)
        path = editing.slerp_path(a, b, frames)  # [F, P, …]
        walk = path.transpose(0, 1).flatten(0, 1)  # pair-major: [P·F, …]
        walk_labels = None if labels is None else labels[:1].expand(pairs * frames)
        decoded = self.decode(self._decode_from_noise(walk, walk_labels)).view(pairs, frames, *x.shape[1:])
        result = {"inputs": x, "frames": decoded, "weights": torch.tensor(editing.interpolation_weights(frames)),
                  "_count": pairs * frames, "_grid": (decoded.flatten(0, 1), frames),
                  "_frames": [decoded[:, f] for f in range(frames)]}
        if labels is not None:
            result["labels"] = labels
        return result
