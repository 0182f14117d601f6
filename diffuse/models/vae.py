"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"), laid out as Stable Diffusion's VAE and N-dimensional by `dim`.

Encoder  x [B, C, *S] → conv_in → per level: residual blocks (+ strided downsampling but at the last) →
         middle: residual, attention, residual → GroupNorm, SiLU, conv → 2·latent channels → 1×1 "quant"
         conv → mean, log-variance (clamped to [−30, 20]) → z = μ + σ·noise → z · scale_factor
Decoder  z → z / scale_factor → 1×1 "post-quant" conv → conv_in → middle → per level (deepest first):
         residual blocks (+ nearest ×2 upsampling but at the last) → GroupNorm, SiLU, conv → x̂ [B, C, *S]

With the defaults (128/256/512/512 channels, 2 residual blocks per level, 4 latent channels) this is SD's
VAE: ×8 downsampling, 3×256×256 → 4×32×32, 83.65M parameters. The parameter names differ from diffusers'
AutoencoderKL but map one to one (tests/test_vae.py loads diffusers' weights into ours and compares).

scale_factor: SD's 0.18215 brings its latents to about unit variance, which the diffusion prior assumes.
`"auto"` instead fits 1/std of the training latents once (`fit_scale_factor`), as the LDM code does; until
then the buffer holds NaN and `encode`/`decode` refuse to run. The factor is a buffer, so it lives in the
checkpoint with the weights.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffuse.dims import check_dim
from diffuse.errors import DiffuseError
from diffuse.rules import BOOL, Choice, Int, Ints
from diffuse.models.attention import MultiHeadAttention
from diffuse.models.blocks import Upsample, conv_nd, group_norm

SD_SCALE_FACTOR = 0.18215
LOGVAR_RANGE = (-30.0, 20.0)


def vae_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) with the eps=1e-6 of the LDM/SD autoencoder (fewer groups for narrow layers)."""
    norm = group_norm(channels)
    norm.eps = 1e-6
    return norm


class VAEResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv3, GroupNorm → SiLU → conv3, plus the input (1×1-projected if widths differ)."""

    def __init__(self, dim: int, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = vae_norm(in_ch)
        self.conv1 = conv_nd(dim, in_ch, out_ch, 3, padding=1)
        self.norm2 = vae_norm(out_ch)
        self.conv2 = conv_nd(dim, out_ch, out_ch, 3, padding=1)
        self.skip = conv_nd(dim, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class VAEAttentionBlock(nn.Module):
    """x + Attention(GroupNorm(x)) over all spatial positions of a [B, C, *spatial] map.

    SD uses one head of width C; `causal` masks position j > i in the flattened (row-major) order.
    """

    def __init__(self, channels: int, heads: int = 1, causal: bool = False):
        super().__init__()
        self.norm = vae_norm(channels)
        self.attn = MultiHeadAttention(channels, heads, causal=causal)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, N = prod(spatial), C]
        return x + self.attn(tokens).transpose(1, 2).reshape(x.shape)


class VAEDownsample(nn.Module):
    """SD's downsampling: pad one pixel at the end of every spatial axis, then a stride-2 3-conv, padding 0."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.dim = dim
        self.conv = conv_nd(dim, channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1) * self.dim))  # (0, 1, 0, 1) in 2-D: right and bottom only


class VAEMiddle(nn.Module):
    """Residual block, self-attention, residual block at the lowest resolution."""

    def __init__(self, dim: int, channels: int, attention: bool, heads: int):
        super().__init__()
        self.res1 = VAEResidualBlock(dim, channels, channels)
        self.attn = VAEAttentionBlock(channels, heads) if attention else nn.Identity()
        self.res2 = VAEResidualBlock(dim, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class VAELevel(nn.Module):
    """Residual blocks at one resolution, then an optional resampling (down in the encoder, up in the decoder)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.resample(x)


def _scale_buffer(scale_factor: float | str) -> Tensor:
    if scale_factor == "auto":
        return torch.tensor(float("nan"))  # not fitted yet
    if isinstance(scale_factor, str) or not float(scale_factor) > 0:
        raise ValueError(f"scale_factor must be a positive number or 'auto'; got {scale_factor!r}")
    return torch.tensor(float(scale_factor))


def _check_scale(scale: Tensor) -> None:
    if torch.isnan(scale):
        raise RuntimeError("the VAE's scale_factor is 'auto' but was never fitted: call fit_scale_factor "
                           "(`diffuse train-vae` does it at the end of training)")


class VAEEncoder(nn.Module):
    """x [B, in_channels, *S] → z [B, latent_channels, *S / 2^(levels−1)], scaled by scale_factor."""

    config_rules = {"dim": Choice(1, 2, 3), "in_channels": Int(1), "channels": Int(1), "channel_mult": Ints(1),
                    "num_res_blocks": Int(1), "latent_channels": Int(1), "attention": BOOL, "attn_heads": Int(1),
                    "scale_factor": None}  # scale_factor: a number or auto (fitted by train-vae)

    def __init__(self, dim: int = 2, in_channels: int = 3, latent_channels: int = 4, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2, attention: bool = True,
                 attn_heads: int = 1, scale_factor: float | str = SD_SCALE_FACTOR):
        super().__init__()
        self.dim = check_dim(dim)
        self.conv_in = conv_nd(dim, in_channels, channels * channel_mult[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = channels * channel_mult[0]
        for level, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(VAEResidualBlock(dim, ch, channels * mult))
                ch = channels * mult
            last = level == len(channel_mult) - 1
            self.down.append(VAELevel(blocks, None if last else VAEDownsample(dim, ch)))
        self.mid = VAEMiddle(dim, ch, attention, attn_heads)
        self.norm_out = vae_norm(ch)
        self.conv_out = conv_nd(dim, ch, 2 * latent_channels, 3, padding=1)
        self.quant_conv = conv_nd(dim, 2 * latent_channels, 2 * latent_channels, 1)
        self.register_buffer("scale_factor", _scale_buffer(scale_factor))

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance [B, latent_channels, *latent] of the (unscaled) posterior q(z | x)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def forward(self, x: Tensor, noise: Tensor | None = None, sample: bool = True) -> Tensor:
        """z = (μ + σ·noise) · scale_factor; noise None → fresh N(0, I); sample=False → μ · scale_factor."""
        _check_scale(self.scale_factor)
        mean, logvar = self.moments(x)
        return reparameterize(mean, logvar, noise, sample) * self.scale_factor


class VAEDecoder(nn.Module):
    """z [B, latent_channels, *L] (scaled) → x̂ [B, out_channels, *L · 2^(levels−1)]."""

    def __init__(self, dim: int = 2, out_channels: int = 3, latent_channels: int = 4, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2, attention: bool = True,
                 attn_heads: int = 1, scale_factor: float | str = SD_SCALE_FACTOR):
        super().__init__()
        self.dim = check_dim(dim)
        ch = channels * channel_mult[-1]
        self.post_quant_conv = conv_nd(dim, latent_channels, latent_channels, 1)
        self.conv_in = conv_nd(dim, latent_channels, ch, 3, padding=1)
        self.mid = VAEMiddle(dim, ch, attention, attn_heads)
        self.up = nn.ModuleList()  # deepest level first, the order they run in
        for level in reversed(range(len(channel_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(VAEResidualBlock(dim, ch, channels * channel_mult[level]))
                ch = channels * channel_mult[level]
            self.up.append(VAELevel(blocks, Upsample(dim, ch) if level > 0 else None))
        self.norm_out = vae_norm(ch)
        self.conv_out = conv_nd(dim, ch, out_channels, 3, padding=1)
        self.register_buffer("scale_factor", _scale_buffer(scale_factor))

    def decode_unscaled(self, z: Tensor) -> Tensor:
        """The network proper, on a latent in the encoder's own units (μ + σ·noise, not yet scaled)."""
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: Tensor) -> Tensor:
        _check_scale(self.scale_factor)
        return self.decode_unscaled(z / self.scale_factor)


def reparameterize(mean: Tensor, logvar: Tensor, noise: Tensor | None = None, sample: bool = True) -> Tensor:
    """z = μ + exp(logvar / 2)·noise (Kingma & Welling 2014); the mean itself when sample=False."""
    if not sample:
        return mean
    if noise is None:
        noise = torch.randn_like(mean)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but the latent is {tuple(mean.shape)}")
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per sample, summed over the latent: ½ Σ (μ² + σ² − 1 − log σ²). → [B]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VAE(nn.Module):
    """Encoder + decoder sharing one scale factor.

    encode(x, noise=None, sample=True) → z (scaled); decode(z) → x̂;
    forward(x, noise=None, sample=True) → (x̂, μ, log σ²) for training (unscaled, so the loss never sees the
    scale factor).
    """

    def __init__(self, dim: int = 2, in_channels: int = 3, latent_channels: int = 4, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2, attention: bool = True,
                 attn_heads: int = 1, scale_factor: float | str = SD_SCALE_FACTOR):
        super().__init__()
        kw = dict(dim=dim, latent_channels=latent_channels, channels=channels, channel_mult=tuple(channel_mult),
                  num_res_blocks=num_res_blocks, attention=attention, attn_heads=attn_heads,
                  scale_factor=scale_factor)
        self.encoder = VAEEncoder(in_channels=in_channels, **kw)
        self.decoder = VAEDecoder(out_channels=in_channels, **kw)
        self.dim, self.in_channels, self.latent_channels = dim, in_channels, latent_channels
        self.downsample_factor = downsample_factor(channel_mult)

    @property
    def scale_factor(self) -> float:
        return float(self.encoder.scale_factor)

    def set_scale_factor(self, value: float) -> None:
        for part in (self.encoder, self.decoder):
            part.scale_factor.fill_(float(value))

    def latent_size(self, size: int) -> int:
        """Latent side length for a data side length: each downsampling gives ⌊(s + 1 − 3)/2⌋ + 1 = ⌊s/2⌋.
        Only sizes divisible by downsample_factor decode back to the same size."""
        for _ in range(int(math.log2(self.downsample_factor))):
            size //= 2
        return size

    def latent_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """[B, C, *S] of data → [B, latent_channels, *latent] (a leading batch size is kept as is)."""
        return (data_shape[0], self.latent_channels, *(self.latent_size(s) for s in data_shape[2:]))

    def encode(self, x: Tensor, noise: Tensor | None = None, sample: bool = True) -> Tensor:
        return self.encoder(x, noise, sample)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.encoder.moments(x)
        recon = self.decoder.decode_unscaled(reparameterize(mean, logvar, noise, sample))
        return recon, mean, logvar

    @torch.no_grad()
    def fit_scale_factor(self, batches: Iterable[Tensor], generator: torch.Generator | None = None) -> float:
        """scale_factor = 1 / std of the unscaled latents z ~ q(z|x) over `batches` of data (LDM's
        `scale_by_std`: one std over every element, unbiased). Sets it on encoder and decoder; returns it."""
        total, total_sq, count = 0.0, 0.0, 0
        for x in batches:
            mean, logvar = self.encoder.moments(x)
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else None)
            z = reparameterize(mean, logvar, noise.to(mean.device, mean.dtype)).double()
            total, total_sq, count = total + float(z.sum()), total_sq + float(z.pow(2).sum()), count + z.numel()
        if count < 2:
            raise ValueError("fit_scale_factor needs at least two latent values")
        var = (total_sq - total**2 / count) / (count - 1)
        scale = 1.0 / math.sqrt(var)
        self.set_scale_factor(scale)
        return scale


def downsample_factor(channel_mult) -> int:
    """The VAE's spatial downsampling: ×2 between consecutive levels of channel_mult."""
    return 2 ** (len(channel_mult) - 1)


def check_vae_fits_data(vae_dim: int, vae_channels: int, factor: int, dim: int, channels: int, resolution: int,
                        vae: str = "the VAE") -> None:
    """One rule for a VAE and the data it encodes (train-vae, latent runs, the latent dataset): the same dim and
    channels, and a resolution its ×factor downsampling divides, else it would not decode back to that size."""
    if int(vae_dim) != int(dim):
        raise DiffuseError(f"{vae} is {vae_dim}-D but the data is {dim}-D (dim={dim})")
    if int(vae_channels) != int(channels):
        raise DiffuseError(f"{vae} takes {vae_channels} channels but the data has {channels} (dataset.channels)")
    if int(resolution) % int(factor):
        raise DiffuseError(f"dataset.resolution={resolution} is not divisible by {vae}'s downsampling ×{factor}: "
                           "it would not decode back to the same size")


RECONSTRUCTIONS = ("l1", "l2")


class VAELoss:
    """Reconstruction + β·KL, per data element: mean |x − x̂| (l1) or (x − x̂)² (l2), plus
    kl_weight · KL(q(z|x) ‖ N(0, I)) / (elements per sample).

    These are LDM's reconstruction and KL terms (there summed per sample; SD: l1, β = 1e-6) without its
    perceptual (LPIPS) and adversarial ones, divided by the number of data elements: β means the same as
    there while the loss stays O(1) for gradient clipping.
    It has the Trainer's loss signature `(model, schedule, x0, y, generator)`: schedule and y are unused, the
    posterior noise comes from `generator` (so a resumed run draws the same noise). It keeps running sums of
    its parts for the logs: `pop_averages()` → {recon, mse, kl} since the last call.
    """

    def __init__(self, reconstruction: str = "l1", kl_weight: float = 1e-6):
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}; got {reconstruction!r}")
        self.reconstruction, self.kl_weight = reconstruction, float(kl_weight)
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def terms(self, x: Tensor, recon: Tensor, mean: Tensor, logvar: Tensor) -> dict[str, Tensor]:
        """Scalar parts (fp32): recon (the chosen norm, per element), mse, kl (per sample), loss."""
        diff = recon.float() - x.float()
        mse = diff.pow(2).mean()
        rec = diff.abs().mean() if self.reconstruction == "l1" else mse
        kl = kl_divergence(mean.float(), logvar.float()).mean()
        elements = x[0].numel()
        return {"recon": rec, "mse": mse, "kl": kl, "loss": rec + self.kl_weight * kl / elements}

    def __call__(self, model, schedule, x0: Tensor, y: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        raw = model.module if hasattr(model, "module") else model  # DDP-wrapped or not
        noise = None
        if generator is not None:
            noise = torch.randn(raw.latent_shape(x0.shape), generator=generator, device=x0.device)
        recon, mean, logvar = model(x0, noise)
        parts = self.terms(x0, recon, mean, logvar)
        for name in ("recon", "mse", "kl"):
            self._sums[name] = self._sums.get(name, 0) + parts[name].detach()
        self._count += 1
        return parts["loss"]

    def pop_averages(self) -> dict[str, float]:
        out = {name: float(total) / self._count for name, total in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return out
