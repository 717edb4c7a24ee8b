"""The VAE of a latent text-to-image pipeline (docs/method.md section 9): images <-> the scaled latents the
diffusion runs on, as the diffusers pipelines convert them.

Encoding (`ctmkit prepare --pipeline`): uint8 images [B, H, W, C] -> x = 2 (x / 255) - 1 in [-1, 1] (the pipelines'
VaeImageProcessor, not ctmkit's own data normaliser) -> the posterior's mean E(x) -> z = (E(x) - shift) * scaling.
The mean, not a sample: data prepared once would freeze one posterior draw, extra noise with none of the
augmentation of drawing anew; the mean is deterministic (a folder equals encoding by hand) and its decode is the
autoencoder's reconstruction.
Decoding (`ctmkit sample`): z -> z / scaling + shift -> vae.decode -> x / 2 + 1/2 clamped to [0, 1] -> round(255 x),
uint8 [B, H, W, C]: StableDiffusionPipeline's `output_type="pil"` pixels.

diffusers is an optional extra, imported only when a VAE is loaded; weights are read from local files only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from .diffusers_unet import import_diffusers


class LatentVAE:
    """An AutoencoderKL with the pipeline's scaling and shift factors (`facts`: the card's latent["vae"])."""

    def __init__(self, vae, facts: dict) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.scaling, self.shift = float(facts["scaling_factor"]), float(facts["shift_factor"])

    @classmethod
    def from_pipeline(cls, folder: Path, facts: dict) -> LatentVAE:
        """`folder/vae` (an AutoencoderKL), float32 on the CPU."""
        try:
            vae = import_diffusers().AutoencoderKL.from_pretrained(Path(folder) / "vae", local_files_only=True)
        except UserError:
            raise
        except Exception as e:    # a foreign folder: any failure is the user's files, said in one line
            raise UserError(f"diffusers teacher '{folder}': cannot load vae/ ({str(e).splitlines()[0]})") from None
        return cls(vae.float(), facts)

    def to(self, device) -> LatentVAE:
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """uint8 images [B, H, W, C] -> scaled latents z [B, c, h, w] float32 (the posterior mean; see above)."""
        x = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents z [B, c, h, w] -> uint8 images [B, H, W, C] on the CPU."""
        x = self.vae.decode(z.to(self.device).float() / self.scaling + self.shift).sample
        return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
