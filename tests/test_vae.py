"""The latent-diffusion VAE: SD shapes, SD's layout (against diffusers' AutoencoderKL), the loss terms against
closed forms, the attention block and its causal mask against brute force, the scale factor and the noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from diffuse.data.shapes import ShapesDataset
from diffuse.models.attention import MultiHeadAttention
from diffuse.models.vae import (SD_SCALE_FACTOR, VAE, VAEAttentionBlock, VAEDecoder, VAEEncoder, VAELoss,
                                kl_divergence, reparameterize)
from diffuse.storage import diffusers_format

TINY = dict(latent_channels=4, channels=8, channel_mult=(1, 2), num_res_blocks=1)


def tiny_vae(dim=2, in_channels=1, **kw) -> VAE:
    torch.manual_seed(0)
    return VAE(dim=dim, in_channels=in_channels, **{**TINY, **kw}).eval()


# ----- Stable Diffusion configuration -------------------------------------------------------------

@pytest.mark.slow
@torch.no_grad()
def test_sd_encoder_decoder_shapes_as_in_the_vae_setup():
    """The VAE setup's usage: 1×3×256×256 image + 1×4×32×32 noise → latent 1×4×32×32 → image 1×3×256×256."""
    torch.manual_seed(0)
    encoder, decoder = VAEEncoder().eval(), VAEDecoder().eval()
    image, noise = torch.randn(1, 3, 256, 256), torch.randn(1, 4, 32, 32)
    latent = encoder(image, noise)
    assert latent.shape == (1, 4, 32, 32)
    reconstruction = decoder(latent)
    assert reconstruction.shape == (1, 3, 256, 256)
    assert torch.isfinite(reconstruction).all()
    assert float(encoder.scale_factor) == float(decoder.scale_factor) == pytest.approx(0.18215)


def test_sd_parameter_count_is_sd_vae():
    """83,653,863 = the parameters of Stable Diffusion's AutoencoderKL (kl-f8)."""
    assert sum(p.numel() for p in VAE().parameters()) == 83_653_863


@torch.no_grad()
def test_layout_matches_diffusers_autoencoderkl():
    """Loaded with diffusers' weights, our VAE gives diffusers' posterior and reconstruction: same layout."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  latent_channels=4, norm_num_groups=32).eval()
    ours = VAE(in_channels=3, latent_channels=4, channels=32, channel_mult=(1, 2), num_res_blocks=1).eval()
    mapped = diffusers_format.vae_weights(ref.state_dict(), SD_SCALE_FACTOR)  # the mapping latent.vae=FOLDER uses
    ours.load_state_dict(mapped, strict=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encoder.moments(x)
    torch.testing.assert_close(mean, dist.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar, dist.logvar, atol=1e-5, rtol=1e-5)
    recon, _, _ = ours(x, sample=False)
    torch.testing.assert_close(recon, ref(x, sample_posterior=False).sample, atol=1e-5, rtol=1e-5)


# ----- N-d, scale factor, noise -------------------------------------------------------------------

@pytest.mark.parametrize("dim,size", [(1, 16), (2, 12), (3, 8)])
@torch.no_grad()
def test_round_trip_shapes_in_every_dim(dim, size):
    vae = tiny_vae(dim=dim, in_channels=2, channel_mult=(1, 2, 2), scale_factor=0.5)
    x = torch.randn(3, 2, *[size] * dim)
    z = vae.encode(x)
    assert z.shape == vae.latent_shape(x.shape) == (3, 4, *[size // 4] * dim)
    assert vae.decode(z).shape == x.shape


@torch.no_grad()
def test_encode_multiplies_and_decode_divides_by_the_scale_factor():
    vae = tiny_vae(scale_factor=0.25)
    x, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 4, 4, 4)
    mean, logvar = vae.encoder.moments(x)
    z = vae.encode(x, noise)
    torch.testing.assert_close(z, (mean + torch.exp(0.5 * logvar) * noise) * 0.25)
    torch.testing.assert_close(vae.encode(x, sample=False), mean * 0.25)
    torch.testing.assert_close(vae.decode(z), vae.decoder.decode_unscaled(z / 0.25))
    # the training forward never sees the factor
    recon, m, lv = vae(x, noise)
    torch.testing.assert_close(recon, vae.decoder.decode_unscaled(mean + torch.exp(0.5 * logvar) * noise))
    torch.testing.assert_close((m, lv), (mean, logvar))
    vae.set_scale_factor(2.0)
    assert vae.scale_factor == 2.0 and "encoder.scale_factor" in vae.state_dict()
    torch.testing.assert_close(vae.encode(x, noise), z / 0.25 * 2.0)


@torch.no_grad()
def test_logvar_is_clamped():
    vae = tiny_vae(scale_factor=1.0)
    torch.nn.init.constant_(vae.encoder.quant_conv.bias, 100.0)  # pushes both halves far out
    torch.nn.init.zeros_(vae.encoder.quant_conv.weight)
    mean, logvar = vae.encoder.moments(torch.randn(1, 1, 4, 4))
    assert (logvar == 20.0).all() and (mean == 100.0).all()
    torch.nn.init.constant_(vae.encoder.quant_conv.bias, -100.0)
    assert (vae.encoder.moments(torch.randn(1, 1, 4, 4))[1] == -30.0).all()


@torch.no_grad()
def test_auto_scale_factor_is_one_over_the_latent_std():
    vae = tiny_vae(scale_factor="auto")
    x = torch.randn(6, 1, 8, 8)
    with pytest.raises(RuntimeError, match="never fitted"):
        vae.encode(x)
    batches = [x[:4], x[4:]]
    scale = vae.fit_scale_factor(batches, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    latents = []
    for b in batches:
        mean, logvar = vae.encoder.moments(b)
        latents.append(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g))
    expected = 1.0 / torch.cat(latents).double().std().item()
    assert scale == pytest.approx(expected, rel=1e-9)
    assert vae.scale_factor == pytest.approx(expected, rel=1e-6)
    assert float(vae.decoder.scale_factor) == pytest.approx(expected, rel=1e-6)
    # scaled latents of the fitting data have unit std
    g = torch.Generator().manual_seed(3)
    z = torch.cat([vae.encode(b, torch.randn(vae.latent_shape(b.shape), generator=g)) for b in batches])
    assert z.double().std().item() == pytest.approx(1.0, rel=1e-5)


@torch.no_grad()
def test_noise_argument_makes_encoding_deterministic():
    vae = tiny_vae(scale_factor=1.0)
    x = torch.randn(2, 1, 8, 8)
    noise = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(vae.encode(x, noise), vae.encode(x, noise.clone()), rtol=0, atol=0)
    torch.manual_seed(5)
    a = vae.encode(x)
    torch.manual_seed(5)
    b = vae.encode(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, vae.encode(x))  # fresh noise otherwise
    with pytest.raises(ValueError, match="noise has shape"):
        vae.encode(x, torch.randn(2, 4, 8, 8))


# ----- loss terms -------------------------------------------------------------------------------

def test_kl_matches_the_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = torch_kl(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl_divergence(mean, logvar), expected)
    # one coordinate by hand: μ = 1, σ² = e → ½(1 + e − 1 − 1) = (e − 1)/2
    one = kl_divergence(torch.ones(1, 1), torch.ones(1, 1))
    assert one.item() == pytest.approx((math.e - 1) / 2)
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max().item() == 0.0


class _FixedOutputs(torch.nn.Module):
    """A stand-in VAE whose forward returns given tensors and records the noise it was handed."""

    latent_channels = 2

    def __init__(self, recon, mean, logvar):
        super().__init__()
        self.recon, self.mean, self.logvar, self.noise = recon, mean, logvar, None

    def latent_shape(self, shape):
        return (shape[0], 2, 3)

    def forward(self, x, noise=None):
        self.noise = noise
        return self.recon, self.mean, self.logvar


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_reconstruction_and_kl_terms(kind):
    torch.manual_seed(0)
    x, recon = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    mean, logvar = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    beta = 0.3
    loss_fn = VAELoss(reconstruction=kind, kl_weight=beta)
    model = _FixedOutputs(recon, mean, logvar)
    loss = loss_fn(model, None, x, None, torch.Generator().manual_seed(1))
    # written out element by element
    d = 3 * 6
    rec = sum(abs(float(a - b)) if kind == "l1" else float(a - b) ** 2
              for a, b in zip(x.flatten(), recon.flatten())) / x.numel()
    kl = sum(0.5 * sum(float(m) ** 2 + math.exp(float(lv)) - 1 - float(lv)
                       for m, lv in zip(mean[i].flatten(), logvar[i].flatten())) for i in range(4)) / 4
    assert loss.item() == pytest.approx(rec + beta * kl / d, rel=1e-5)
    parts = loss_fn.pop_averages()
    assert parts["recon"] == pytest.approx(rec, rel=1e-5)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)
    assert parts["mse"] == pytest.approx(float((x - recon).pow(2).mean()), rel=1e-5)
    assert loss_fn.pop_averages() == {}
    # the posterior noise comes from the generator
    torch.testing.assert_close(model.noise, torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1)))


def test_loss_trains_a_tiny_vae_and_rejects_unknown_terms():
    vae = tiny_vae(scale_factor=1.0).train()
    loss_fn = VAELoss("l2", kl_weight=1e-4)
    x, _ = ShapesDataset(resolution=8, size=8).get_batch(torch.arange(8))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = loss_fn(vae, None, x, None, g)
    for _ in range(30):
        loss = loss_fn(vae, None, x, None, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()
    with pytest.raises(ValueError, match="l1, l2"):
        VAELoss("lpips")


# ----- attention --------------------------------------------------------------------------------

def _attention_by_hand(block: VAEAttentionBlock, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """x + W_o · softmax(Q Kᵀ / √d) V per head, with Q, K, V the projections of GroupNorm(x) tokens."""
    attn = block.attn
    b, c = x.shape[:2]
    tokens = block.norm(x).reshape(b, c, -1).transpose(1, 2)  # [B, N, C]
    n, heads = tokens.shape[1], attn.heads
    d = c // heads
    q = tokens @ attn.to_q.weight.T + attn.to_q.bias
    kv = tokens @ attn.to_kv.weight.T + attn.to_kv.bias
    k, v = kv[..., :c], kv[..., c:]
    out = torch.empty(b, n, c)
    for i in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            scores = q[i, :, sl] @ k[i, :, sl].T / math.sqrt(d)
            if causal:
                scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            out[i, :, sl] = scores.softmax(-1) @ v[i, :, sl]
    out = out @ attn.out.weight.T + attn.out.bias
    return x + out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("heads,shape", [(1, (2, 32, 4, 5)), (4, (2, 32, 3, 3)), (1, (1, 16, 7)),
                                         (2, (1, 8, 2, 3, 2))])
@pytest.mark.parametrize("causal", [False, True])
@torch.no_grad()
def test_attention_block_matches_direct_computation(heads, shape, causal):
    torch.manual_seed(0)
    block = VAEAttentionBlock(shape[1], heads=heads, causal=causal)
    for p in block.parameters():  # non-trivial norm affine too
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(*shape)
    torch.testing.assert_close(block(x), _attention_by_hand(block, x, causal), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_causal_mask_hides_later_positions():
    """Output at position i does not move when the inputs at j > i change (and does for j ≤ i)."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, heads=2, causal=True)
    x = torch.randn(2, 9, 16)
    base = attn(x)
    for i in range(9):
        changed = x.clone()
        changed[:, i + 1:] += torch.randn_like(changed[:, i + 1:]) * 10
        torch.testing.assert_close(attn(changed)[:, :i + 1], base[:, :i + 1], rtol=0, atol=1e-6)
    moved = x.clone()
    moved[:, 4] += 1.0
    assert not torch.allclose(attn(moved)[:, 4:], base[:, 4:])
    # without the mask the first position sees everything
    assert not torch.allclose(attn(moved, causal=False)[:, 0], attn(x, causal=False)[:, 0])


def test_reparameterize_uses_mean_and_std():
    mean, logvar, noise = torch.tensor([1.0, -2.0]), torch.log(torch.tensor([4.0, 0.25])), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(reparameterize(mean, logvar, noise), torch.tensor([3.0, -1.0]))
    torch.testing.assert_close(reparameterize(mean, logvar, noise, sample=False), mean)
