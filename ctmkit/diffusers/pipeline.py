"""`CTMPipeline`: a ctmkit CTM as a diffusers `DiffusionPipeline` (`CTMModel` + `CTMScheduler`), shipped in ctmkit so
that `CTMPipeline.from_pretrained(OUT)` loads an export of `ctmkit export` with no remote code.

Samples equal `ctmkit sample`'s: generator=torch.Generator().manual_seed(S) is `--seed S` (each sample i draws its
start and re-noising from its own seed, ctmkit.core.sampling.per_sample_normal), `sigmas` are `--ts`, a conditional
model without class_labels samples the classes in turn, and the images are ctmkit sample's samples (the data's
own space) mapped to [0, 1] by (s - lo) / (hi - lo) (ModelCard.to_unit).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from ..core.sampling import per_sample_normal
from ..eval.guide import guided_part
from ..nets.text_encoders import PromptEncoder
from ..nets.vae import LatentVAE
from .model import CTMModel
from .scheduler import CTMScheduler, noise_level

PROMPT_REFUSAL = ("prompt= needs a text-conditioned (latent) student; this pipeline's CTM samples pixels, "
                  "unconditional or class-conditional (class_labels=...)")
OUTPUT_TYPES = ("pil", "np", "pt")


class CTMPipeline(DiffusionPipeline):
    """Consistency Trajectory Model sampling (Kim et al., ICLR 2024): 1..K jumps of the CTM, with gamma-sampling's
    re-noising in between (`CTMScheduler`). A latent text-to-image CTM comes with its teacher's VAE, text encoder
    and tokenizer (the optional components)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, unet: CTMModel, scheduler: CTMScheduler, vae=None, text_encoder=None, tokenizer=None) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, class_labels: int | list[int] | torch.Tensor | None = None,
                 num_inference_steps: int | None = None, sigmas: list[float] | None = None,
                 gamma: float | None = None, prompt: str | list[str] | None = None,
                 guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, negative_prompt: str | None = None, num_images_per_prompt: int = 1):
        """batch_size images (default: one per class label given, else 1) in num_inference_steps jumps (default 1)
        on the default times, or along EDM `sigmas` t_0 > ... > t_K (as `ctmkit sample --ts`); `gamma` in [0, 1]
        (default: the scheduler's, 0); class_labels (int, list or Tensor; cycled to batch_size; default: every class
        in turn); guidance_scale W (`ctmkit sample --guidance W`; default: the model's own); generator: one
        torch.Generator whose seed S gives `ctmkit sample --seed S` (its seed counts, not its state), or one per
        image; output_type "pil", "np" (float32 [N, H, W, C] in [0, 1]) or "pt" (float32 [N, C, H, W] in [0, 1]).
        A latent text-to-image CTM takes prompt= (a string or a list) instead of batch_size / class_labels, with
        negative_prompt (the null condition; default "") and num_images_per_prompt N (prompt-major, as `ctmkit
        sample --prompt ... --n N`), and output_type "latent" too; its images are the VAE's uint8 pixels / 255.
        Returns ImagePipelineOutput(images) (a tuple without return_dict)."""
        card = self.unet.card
        if output_type not in OUTPUT_TYPES + (("latent",) if card.latent is not None else ()):
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if card.latent is not None:
            if batch_size is not None or class_labels is not None:
                raise ValueError("this CTM is text-to-image: give prompt= (and num_images_per_prompt=), not "
                                 "batch_size or class_labels")
            labels = self.prepare_prompts(prompt, negative_prompt, num_images_per_prompt)
            n = len(labels)
        else:
            if prompt is not None or negative_prompt is not None:
                raise ValueError(PROMPT_REFUSAL)
            if card.data.kind != "image":
                raise ValueError("this CTM samples vectors; diffusers pipelines are for images (use ctmkit sample)")
            labels = self.prepare_class_labels(batch_size, class_labels)
            n = len(labels) if labels is not None else (1 if batch_size is None else int(batch_size))
        net = guided_part(self.unet.ctm, guidance_scale, self.g)     # a scale the model cannot take: refused here
        x = self.jumps(net, n, labels, generator, num_inference_steps, sigmas, gamma)
        self.maybe_free_model_hooks()
        images = self.postprocess(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def jumps(self, net, n: int, labels, generator, num_inference_steps, sigmas, gamma) -> torch.Tensor:
        """n samples in model space: the scheduler's jumps of the (guided) network, with per-sample noise."""
        self.scheduler.set_timesteps(1 if num_inference_steps is None and sigmas is None else num_inference_steps,
                                     sigmas=sigmas, gamma=gamma)
        device, k = self._execution_device, len(self.scheduler)
        z = self.prepare_noise(generator, n, k, self.unet.card.shape).to(device)   # [N, K, ...]: start + re-noising
        labels = None if labels is None else labels.to(device)
        x = z[:, 0] * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            s = self.scheduler.jump_target(t)
            g = net(x, noise_level(t, x), noise_level(s, x), labels)
            x = self.scheduler.step(g, t, x, noise=z[:, i + 1] if i + 1 < k else None).prev_sample
        return x

    def prepare_prompts(self, prompt, negative_prompt: str | None, num_images_per_prompt: int):
        """The TextCond of N = num_images_per_prompt samples per prompt, prompt-major (sample i: prompt i // N),
        from the pipeline's text encoder (`ctmkit sample --prompt`'s encoding)."""
        if prompt is None:
            raise ValueError("this CTM is text-to-image: give prompt= (a string or a list of strings)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt= must be a string or a non-empty list of strings")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError("negative_prompt must be one string (the null condition of every prompt)")
        cond = PromptEncoder(self.tokenizer, self.text_encoder)(prompts, negative_prompt or "")
        return cond[torch.arange(len(prompts) * num_images_per_prompt) // num_images_per_prompt]

    def g(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels, w=None) -> torch.Tensor:
        """The network's g(x_t, t, s) (the part that guidance combines)."""
        return self.unet(x, t, s, labels, w).sample

    def prepare_class_labels(self, batch_size: int | None, class_labels) -> torch.Tensor | None:
        """int64 [N] labels: the given ones cycled to batch_size, or every class in turn (`ctmkit sample`'s
        default); None for an unconditional model."""
        classes = self.unet.card.num_classes
        if not classes:
            if class_labels is not None:
                raise ValueError("class_labels given, but this CTM is not class-conditional")
            return None
        given = torch.arange(classes) if class_labels is None else torch.as_tensor(class_labels).reshape(-1).long()
        if len(given) == 0 or bool(((given < 0) | (given >= classes)).any()):
            raise ValueError(f"class_labels must be classes 0..{classes - 1}, got {given.tolist()}")
        n = int(batch_size) if batch_size is not None else (len(given) if class_labels is not None else 1)
        if n < 1:
            raise ValueError(f"batch_size must be >= 1, got {n}")
        return given[torch.arange(n) % len(given)]

    @staticmethod
    def prepare_noise(generator, n: int, k: int, shape: tuple) -> torch.Tensor:
        """Standard normal [n, k, *shape] on the CPU: row i from seed S (`ctmkit sample --seed S`'s sample i) for
        one generator, from generator[i] for a list, from a seed drawn off torch's global generator for None."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"{len(generator)} generators for {n} images: give one per image, or one")
            return torch.stack([torch.randn((k, *shape), generator=g, device=g.device).cpu() for g in generator])
        seed = generator.initial_seed() if generator is not None else int(torch.randint(0, 2**62, ()))
        return per_sample_normal(n, (k, *shape), seed, 0)

    def postprocess(self, x: torch.Tensor, output_type: str):
        """Model-space images -> [0, 1] through the data's own space (ModelCard.to_unit), or a latent CTM's
        latents -> the VAE's uint8 pixels / 255 (`ctmkit sample --prompt`'s samples), as output_type."""
        latent = self.unet.card.latent
        if latent is None:
            images = self.unet.card.to_unit(x.float())
        elif output_type == "latent":
            return x
        else:
            images = LatentVAE(self.vae, latent["vae"]).decode(x).numpy().astype(np.float32) / 255
        if output_type == "np":
            return images
        if output_type == "pt":
            return torch.from_numpy(images).permute(0, 3, 1, 2).to(x.device)
        return self.numpy_to_pil(images)

