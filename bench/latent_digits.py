"""bench (issue 29, item 8, part 1): a small latent text-to-image teacher trained here on digits, and its figures.

    OMP_NUM_THREADS=1 python bench/latent_digits.py                      # every stage (distill: see below)
    OMP_NUM_THREADS=1 python bench/latent_digits.py --stages evaluate    # one stage again (its output replaced;
                                                                         # the stages after it are not rerun)

Stages (resumable: without --stages every stage runs whose record OUT/stages/NAME.json is missing or pending;
--stages a,b runs those (again) and no other; each record holds its wall and CPU seconds; after every run
bench/results/latent_digits.json collects them all):

1. data      sklearn digits (1797, 8x8, values 0..16) upsampled x2 (nearest: each pixel a 2x2 block) to 16x16, grey
             in RGB uint8 PNGs (u = round(255 v / 16)), in OUT/images with a metadata.jsonl captioning each one
             "a handwritten <word>" (zero .. nine): the Hugging Face imagefolder convention `ctmkit prepare` reads.
2. vae       a small diffusers AutoencoderKL (2 blocks of 16 and 32 channels, no mid-block attention: 16x16x3 ->
             8x8x4 latents) trained on those images (L1 + L2 + 1e-4 x the per-element KL), its scaling_factor set to
             1 / std of the posterior means over the data, as Stable Diffusion fixed its 0.18215 (no shift factor:
             StableDiffusionPipeline does not apply one). OUT/vae.
3. text      a tiny random CLIPTextModel (2 layers, width 32) and a CLIPTokenizer whose vocabulary (bytes + the
             caption words whole) this script writes, model_max_length 8: offline, frozen, never trained. Random
             embeddings are distinct per prompt (the record keeps the smallest distance between two prompts' states).
             OUT/text.
4. unet      a small UNet2DConditionModel (blocks of 32 and 64 channels, cross-attention at 8x8, in the mid block
             and up at 8x8, attending to the CLIP states) trained with the epsilon DDPM loss on the VAE's scaled
             posterior means (the latents `ctmkit prepare` writes), captions dropped to the empty prompt 10 % of the
             time (so classifier-free guidance works); Stable Diffusion's noise schedule (scaled_linear betas 0.00085
             to 0.012, 1000 steps; sigma 0.029 to 14.6), AdamW 1e-3, EMA 0.999. Saved whole as a
             StableDiffusionPipeline (DDIMScheduler with SD's settings: steps_offset 1, set_alpha_to_one False,
             clip_sample False; safety_checker None) in OUT/pipeline, then checked: `load_teacher("diffusers:DIR")`
             reads it and `ctmkit sample --model diffusers:DIR --prompt "a handwritten seven"` runs.
5. prepare   `ctmkit prepare --pipeline OUT/pipeline OUT/images OUT/prepared`: the prepared latent folder that
             `ctmkit distill --data` will read.
6. evaluate  the teacher: diffusers' own StableDiffusionPipeline __call__ (its DDIM scheduler, 25 steps, eta 0) at
             guidance_scale 1 (no CFG) and --scales' others (CFG), and ctmkit's Heun on the same teacher at NFE 25
             (`ctmkit sample --model diffusers:DIR --prompts FILE --sampler heun --nfe 25 --guidance W`); --n
             samples per class each. Decoded uint8 RGB 16x16 -> grey (mean of RGB) -> 2x2 mean pool -> 8x8 ->
             u / 127.5 - 1 in [-1, 1] (the digits model space, v / 8 - 1, up to the PNG rounding) -> the digits
             metric of bench/guidance_digits.py: prompt adherence (the share of samples the digits classifier
             assigns to the prompted class) and the classifier-feature Frechet distance to the 1797 digits. The data
             PNGs and the VAE's reconstructions of them are scored the same way (the ceilings of the pipeline).
             Grids (a row per prompted digit) in OUT/eval/grids; the DDIM ones copied to --grids (committed).
7. distill   the CTM students: `ctmkit distill --teacher diffusers:OUT/pipeline --data OUT/prepared --out
             OUT/ctm_<full|loraR>_w<W>`, full and with `ctm.lora_rank=R`, for each --scales value W (W != 1 adds
             `ctm.guidance=W`: a guided student samples at its scale only; --distill adds settings to all), then
             `ctmkit sample --model RUN --prompts FILE --nfe K --guidance W` at K = 1, 2, 4 from the training EMA
             (`ctmkit ema RUN --reset`) and the post-hoc EMA of width --sigma-rel (`ctmkit ema RUN --sigma-rel X`),
             scored as the teacher; step time (stats.jsonl) and peak memory (a `*mem*` key of stats.jsonl when the
             trainer writes one, else the process's max RSS, which on a GPU does not see the device's memory) of
             full vs LoRA, and the acceptance checks (NFE 4 adherence >= 80 % of the teacher's DDIM 25 at the same
             W; LoRA peak memory below full at the same W). Session 11 ran it with
             `--distill train.steps=600 train.batch_size=32` on 2 threads (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPTS = [f"a handwritten {w}" for w in WORDS]
STAGES = ("data", "vae", "text", "unet", "prepare", "evaluate", "distill")
MAX_LENGTH = 8                  # tokenizer model_max_length: bos + "a handwritten seven" + eos + padding
SIZE = 16                       # image side (digits x2)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # tests.test_latent_teacher: the tiny CLIP tokenizer writer
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


# ----------------------------------------------------------------------------------------------------- helpers
def cpu_seconds() -> float:
    """CPU seconds of this process and of its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **QUIET,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def ctmkit(*args, log: Path | None = None) -> dict:
    """Run `python -m ctmkit ARGS` (its own process); returns rc, wall and CPU seconds and max RSS (MiB) of that
    process alone (os.wait4), and the last line of its error output."""
    cmd = [sys.executable, "-m", "ctmkit", *[str(a) for a in args]]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    with open(log or os.devnull, "w") as out:
        p = subprocess.Popen(cmd, stdout=out if log else None, stderr=subprocess.PIPE, env=env(), text=True)
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if err.strip():
        sys.stderr.write(err[-4000:])
    tail = [line for line in err.splitlines() if line.strip()]
    return {"rc": p.returncode, "wall_s": round(time.time() - t0, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "max_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "error": tail[-1] if (tail and p.returncode) else None}


def digits():
    from ctmkit.data.toy import load_digits_array
    return load_digits_array()            # float32 [1797, 8, 8] in 0..16, int64 [1797]


def to_metric(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Decoded uint8 RGB [N, 16, 16, 3] -> the digits metric's model space [N, 1, 8, 8] in [-1, 1]: the mean of the
    channels, 2x2 mean pooling (the exact inverse of the nearest x2 upsampling), u / 127.5 - 1."""
    x = torch.as_tensor(np.asarray(images)).float().mean(-1)[:, None]
    return torch.nn.functional.avg_pool2d(x, 2) / 127.5 - 1


def read_images(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The image folder's uint8 [N, 16, 16, 3] and labels [N], in metadata order."""
    from PIL import Image
    lines = [json.loads(s) for s in (out / "images" / "metadata.jsonl").read_text().splitlines() if s.strip()]
    ims = np.stack([np.asarray(Image.open(out / "images" / d["file_name"]).convert("RGB")) for d in lines])
    return ims, np.asarray([WORDS.index(d["text"].split()[-1]) for d in lines])


# ----------------------------------------------------------------------------------------------------- 1. data
def stage_data(args, out: Path) -> dict:
    from PIL import Image
    images, labels = digits()
    u = np.round(images * 255 / 16).astype(np.uint8).repeat(2, 1).repeat(2, 2)        # nearest x2: 16x16
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (im, y) in enumerate(zip(u, labels)):
        Image.fromarray(np.repeat(im[..., None], 3, -1)).save(folder / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": PROMPTS[y]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"images": len(u), "size": [SIZE, SIZE, 3], "per_class": np.bincount(labels).tolist(),
            "upsampling": "nearest x2", "captions": PROMPTS}


# ----------------------------------------------------------------------------------------------------- 2. vae
def stage_vae(args, out: Path) -> dict:
    import diffusers
    ims, _ = read_images(out)
    x = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255 * 2 - 1          # the pipelines' [-1, 1]
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False)
    opt = torch.optim.Adam(vae.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    vae.train()
    for step in range(args.vae_steps):
        xb = x[torch.randint(0, len(x), (args.batch,), generator=g)]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / post.mean[0].numel()                     # per latent element
        loss = (rec - xb).abs().mean() + ((rec - xb) ** 2).mean() + args.kl_weight * kl
        for grp in opt.param_groups:
            grp["lr"] = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 if step >= 0.8 * args.vae_steps else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f}", flush=True)
    vae.eval()
    with torch.no_grad():
        post = [vae.encode(x[i:i + 500]).latent_dist for i in range(0, len(x), 500)]
        mean = torch.cat([p.mean for p in post])
        std = float(mean.std())
        rec = torch.cat([vae.decode(mean[i:i + 500]).sample for i in range(0, len(x), 500)])
        post_std = float(torch.cat([p.std for p in post]).mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "vae")
    back = diffusers.AutoencoderKL.from_pretrained(out / "vae")
    assert abs(back.config.scaling_factor - 1.0 / std) < 1e-9
    return {"steps": args.vae_steps, "batch": args.batch, "kl_weight": args.kl_weight,
            "params": sum(p.numel() for p in vae.parameters()), "latent_shape": list(mean.shape[1:]),
            "latent_mean": round(float(mean.mean()), 4), "latent_std": round(std, 4),
            "scaling_factor": round(1.0 / std, 5), "posterior_std_mean": round(post_std, 4),
            "recon_l1": round(float((rec - x).abs().mean()), 4), "recon_mse": round(float(((rec - x) ** 2).mean()), 5)}


# ----------------------------------------------------------------------------------------------------- 3. text
def stage_text(args, out: Path) -> dict:
    import transformers

    from tests.test_latent_teacher import write_clip_tokenizer  # the tests' tiny CLIP BPE writer
    write_clip_tokenizer(out / "text" / "words", ["a", "handwritten", *WORDS])
    tok = transformers.CLIPTokenizer.from_pretrained(out / "text" / "words", model_max_length=MAX_LENGTH)
    for p in PROMPTS:                                   # every caption word is one token: bos a handwritten W eos
        ids = tok(p).input_ids
        assert len(ids) == 5 and tok.unk_token_id not in ids[1:-1], (p, ids)     # (CLIP's unk is its eos)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval()
    tok.save_pretrained(out / "text" / "tokenizer")
    text.save_pretrained(out / "text" / "text_encoder")
    with torch.no_grad():
        ids = tok(PROMPTS + [""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
        h = text(ids).last_hidden_state.flatten(1)
    d = torch.cdist(h, h) + torch.eye(len(h)) * 1e9
    return {"encoder": "CLIPTextModel (random, frozen)", "hidden_size": 32, "layers": 2, "max_length": MAX_LENGTH,
            "vocab_size": len(tok), "params": sum(p.numel() for p in text.parameters()),
            "min_distance_between_prompts": round(float(d.min()), 3),
            "mean_distance_between_prompts": round(float(d[d < 1e8].mean()), 3)}


# ----------------------------------------------------------------------------------------------------- 4. unet
def scheduler():
    import diffusers
    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   prediction_type="epsilon", num_train_timesteps=1000)


def stage_unet(args, out: Path) -> dict:
    import diffusers
    import transformers
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae").eval()
    tok = transformers.CLIPTokenizer.from_pretrained(out / "text" / "tokenizer")
    text = transformers.CLIPTextModel.from_pretrained(out / "text" / "text_encoder").eval()
    ims, labels = read_images(out)
    sf = vae.config.scaling_factor
    with torch.no_grad():
        x = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        z = torch.cat([vae.encode(x[i:i + 500]).latent_dist.mean for i in range(0, len(x), 500)]) * sf
        ids = tok(PROMPTS + [""], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                  return_tensors="pt").input_ids
        table = text(ids).last_hidden_state                   # [11, L, D]: the ten captions and the empty prompt
    labels = torch.from_numpy(labels)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16, cross_attention_dim=32, attention_head_dim=4)
    sched = scheduler()
    ac = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), 1e-3, weight_decay=0.0)
    ema = [p.detach().clone() for p in unet.parameters()]
    g = torch.Generator().manual_seed(0)
    unet.train()
    losses, t0 = [], time.time()
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(z), (args.batch,), generator=g)
        cond = torch.where(torch.rand(args.batch, generator=g) < args.caption_dropout, 10, labels[idx])
        z0, n = z[idx], torch.randn(args.batch, 4, SIZE // 2, SIZE // 2, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * n                # DDPMScheduler.add_noise
        loss = ((unet(zt, t, table[cond]).sample - n) ** 2).mean()
        for grp in opt.param_groups:
            grp["lr"] = 1e-3 * min(1.0, (step + 1) / 200)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p, 1 - args.ema)
        losses.append(loss.item())
        if step % 250 == 0 or step == args.unet_steps - 1:
            print(f"unet step {step} loss(250) {np.mean(losses[-250:]):.4f} {time.time() - t0:.0f}s", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    unet.eval()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    from ctmkit import load_teacher
    teacher = load_teacher(f"diffusers:{out / 'pipeline'}")
    check = ctmkit("sample", "--model", f"diffusers:{out / 'pipeline'}", "--prompt", "a handwritten seven",
                   "--n", 16, "--nfe", 25, "--guidance", 3, "--out", out / "check_seven.npz", "--force", "--quiet")
    if check["rc"]:
        raise SystemExit(f"ctmkit sample on the saved pipeline failed: {check['error']}")
    return {"steps": args.unet_steps, "batch": args.batch, "caption_dropout": args.caption_dropout, "ema": args.ema,
            "params": sum(p.numel() for p in unet.parameters()), "schedule": "scaled_linear 0.00085..0.012, 1000",
            "prediction": "epsilon", "train_s": round(time.time() - t0, 1),
            "loss_last_500": round(float(np.mean(losses[-500:])), 4),
            "teacher_card": {"shape": list(teacher.card.shape), "sigma_min": round(teacher.card.sigma_min, 4),
                             "sigma_max": round(teacher.card.sigma_max, 3),
                             "image_shape": teacher.card.latent["image_shape"]},
            "sample_check": {**check, "out": str(out / "check_seven.npz")}}


# ----------------------------------------------------------------------------------------------------- 5. prepare
def stage_prepare(args, out: Path) -> dict:
    r = ctmkit("prepare", "--pipeline", out / "pipeline", out / "images", out / "prepared", "--force", "--quiet",
               "--batch-size", 256)
    if r["rc"]:
        raise SystemExit(f"ctmkit prepare failed: {r['error']}")
    m = json.loads((out / "prepared" / "ctmkit_latents.json").read_text())
    return {**r, "count": m["count"], "prompts": m["prompts"], "latent_shape": m["latent_shape"]}


# ----------------------------------------------------------------------------------------------------- 6. evaluate
class Metric:
    """The digits metric of bench/guidance_digits.py: ClassifierFD trained on sklearn digits (its classifier's
    logits for adherence, its features for the Frechet distance to all 1797 digits)."""

    def __init__(self) -> None:
        from ctmkit.data import load_data
        from ctmkit.eval.quality import ClassifierFD
        self.q = ClassifierFD(load_data("digits"), n=1797)
        self.info = {"classifier_accuracy_on_data": self.q.info["classifier_accuracy"],
                     "fd_floor_data_halves": round(self.q.floor()[1], 3)}

    @torch.no_grad()
    def __call__(self, images, labels) -> dict:
        from ctmkit.metrics.frechet import frechet_distance, streamed_stats
        x, labels = to_metric(images), torch.as_tensor(np.asarray(labels))
        mu, s = streamed_stats(self.q.features(x[i:i + 500]) for i in range(0, len(x), 500))
        pred = torch.cat([self.q.net(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
        per = [round(float((pred[labels == k] == k).float().mean()), 3) for k in range(10)]
        return {"adherence": round(float((pred == labels).float().mean()), 4),
                "fd": round(frechet_distance(mu, s, self.q.mu_r, self.q.s_r), 3), "per_class": per, "n": len(x)}


def grid(images: np.ndarray, labels: np.ndarray, path: Path, per: int = 10) -> None:
    """The first `per` samples of each class, a row per class."""
    from ctmkit.eval.report import save_image_grid
    idx = np.concatenate([np.flatnonzero(labels == k)[:per] for k in range(10)])
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(x, path, nrow=per)


@torch.no_grad()
def ddim_samples(pipe_dir: Path, n: int, w: float, steps: int, seed: int) -> np.ndarray:
    """StableDiffusionPipeline's own loop (its DDIM scheduler, eta 0) at guidance_scale w: uint8 [10 n, H, W, 3],
    prompt-major."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for k, prompt in enumerate(PROMPTS):             # a prompt at a time: bounded memory, same noise per class
        res = pipe(prompt, num_images_per_prompt=n, guidance_scale=w, num_inference_steps=steps, eta=0.0,
                   generator=torch.Generator().manual_seed(seed * 1000 + k), output_type="np")
        images.append(np.round(res.images * 255).astype(np.uint8))        # the "pil" output's pixels
    return np.concatenate(images)


def timed(fn, *a):
    t0, c0 = time.time(), cpu_seconds()
    r = fn(*a)
    return r, round(time.time() - t0, 1), round(cpu_seconds() - c0, 1)


def stage_evaluate(args, out: Path) -> dict:
    import diffusers
    ev = out / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    metric, metric_s, _ = timed(Metric)
    labels = np.arange(10 * args.n) // args.n
    rows = []
    ims, lab = read_images(out)
    rows.append({"source": "data PNGs (16x16 -> 8x8)", **metric(ims, lab)})
    vae = diffusers.AutoencoderKL.from_pretrained(out / "pipeline" / "vae").eval()
    with torch.no_grad():
        x = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 500]).latent_dist.mean).sample for i in range(0, len(x), 500)])
    rec = ((rec / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows.append({"source": "VAE reconstruction (posterior mean)", **metric(rec, lab)})
    grid(rec, lab, ev / "grids" / "vae_reconstruction.png")
    for w in args.scales:
        images, wall, cpu = timed(ddim_samples, out / "pipeline", args.n, w, args.steps, args.seed)
        rows.append({"source": "teacher, diffusers DDIM (StableDiffusionPipeline)", "steps": args.steps, "nfe":
                     args.steps * (2 if w > 1 else 1), "guidance": w, **metric(images, labels), "wall_s": wall,
                     "cpu_s": cpu})
        grid(images, labels, ev / "grids" / f"teacher_ddim{args.steps}_w{w:g}.png")
        print(json.dumps(rows[-1]), flush=True)
    for w in args.scales:
        npz = ev / f"heun{args.heun_nfe}_w{w:g}.npz"
        r = ctmkit("sample", "--model", f"diffusers:{out / 'pipeline'}", "--prompts", out / "prompts.txt",
                   "--sampler", "heun", "--nfe", args.heun_nfe, "--guidance", w, "--n", args.n, "--seed", args.seed,
                   "--batch-size", 500, "--out", npz, "--force", "--quiet")
        if r["rc"]:
            raise SystemExit(f"ctmkit sample (Heun) failed: {r['error']}")
        with np.load(npz) as f:
            images = f["samples"]
        rows.append({"source": "teacher, ctmkit Heun (ctmkit sample)", "nfe": args.heun_nfe,
                     "nfe_per_sample": args.heun_nfe * (2 if w != 1 else 1), "guidance": w, **metric(images, labels),
                     "wall_s": r["wall_s"], "cpu_s": r["cpu_s"]})
        grid(images, labels, ev / "grids" / f"teacher_heun{args.heun_nfe}_w{w:g}.png")
        print(json.dumps(rows[-1]), flush=True)
    return {"n_per_class": args.n, "seed": args.seed, "scales": args.scales, "metric": metric.info,
            "metric_setup_s": metric_s, "conversion": "uint8 RGB 16x16 -> mean of RGB -> 2x2 mean pool -> "
            "u / 127.5 - 1 ([1, 8, 8] in [-1, 1])", "rows": rows}


# ----------------------------------------------------------------------------------------------------- 7. distill
def stats_facts(run: Path) -> dict:
    """Step time (seconds a step between the first and last stats.jsonl lines) and any memory key the trainer logs."""
    path = run / "stats.jsonl"
    if not path.is_file():
        return {}
    lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    if not lines:
        return {}
    facts = {k: v for k, v in lines[-1].items() if "mem" in k.lower()}
    if len(lines) > 1 and lines[-1]["step"] > lines[0]["step"]:
        facts["step_s"] = round((lines[-1]["time"] - lines[0]["time"]) / (lines[-1]["step"] - lines[0]["step"]), 4)
    return facts


def stage_distill(args, out: Path, teacher: dict | None) -> dict:
    """The CTM students of the latent teacher: full and LoRA, each distilled once per --scales value W (a student of
    the guided teacher, `ctm.guidance=W`, samples at its W only; W = 1 is plain conditional), then sampled with
    `ctmkit sample --model RUN --prompts FILE --nfe K --guidance W` at K = 1, 2, 4 from two sets of weights: the
    training EMA (train.ema) and the post-hoc EMA of width --sigma-rel (`ctmkit ema RUN --sigma-rel X`), scored as
    the teacher."""
    variants = {}
    for w in args.scales:
        for name, extra in (("full", []), (f"lora{args.lora_rank}", [f"ctm.lora_rank={args.lora_rank}"])):
            variants[f"{name}_w{w:g}"] = (w, [*extra, *([f"ctm.guidance={w:g}"] if w != 1 else [])])
    res: dict = {"variants": {}, "overrides": args.distill, "sigma_rel": args.sigma_rel}
    metric = None
    labels = np.arange(10 * args.n) // args.n
    for name, (w, extra) in variants.items():
        run = out / f"ctm_{name}"
        cmd = ["distill", "--teacher", f"diffusers:{out / 'pipeline'}", "--data", out / "prepared", "--out", run,
               "--quiet", *(["--resume"] if (run / "checkpoints").exists() else []), *args.distill, *extra]
        r = ctmkit(*cmd, log=out / f"distill_{name}.log")
        if r["rc"]:
            print(f"\n*** distill stage FAILED ({r['error']}) ***\n", flush=True)
            return {"status": "pending", "reason": r["error"], "command": "ctmkit " + " ".join(map(str, cmd))}
        v = {"command": "ctmkit " + " ".join(map(str, cmd)), "distill": r, **stats_facts(run), "rows": []}
        metric = metric or Metric()
        for weights, ema_args in (("training EMA", ["--reset"]), (f"post-hoc EMA {args.sigma_rel:g}",
                                                                  ["--sigma-rel", args.sigma_rel])):
            e = ctmkit("ema", run, *ema_args)
            if e["rc"]:
                v["rows"].append({"weights": weights, "guidance": w, "error": e["error"]})
                continue
            tag = "ema" if ema_args == ["--reset"] else f"phema{args.sigma_rel:g}"
            for k in (1, 2, 4):
                npz = out / "eval" / f"ctm_{name}_{tag}_nfe{k}.npz"
                s = ctmkit("sample", "--model", run, "--prompts", out / "prompts.txt", "--nfe", k, "--guidance", w,
                           "--n", args.n, "--seed", args.seed, "--batch-size", 500, "--out", npz, "--force", "--quiet")
                row = {"weights": weights, "nfe": k, "guidance": w}
                if s["rc"]:
                    v["rows"].append({**row, "error": s["error"]})
                    continue
                with np.load(npz) as f:
                    images = f["samples"]
                v["rows"].append({**row, **metric(images, labels), "wall_s": s["wall_s"]})
                grid(images, labels, out / "eval" / "grids" / f"ctm_{name}_{tag}_nfe{k}.png")
                print(json.dumps({"variant": name, **v["rows"][-1]}), flush=True)
        res["variants"][name] = v
    res["acceptance"] = acceptance(res["variants"], teacher)
    res["status"] = "done"
    return res


def acceptance(variants: dict, teacher: dict | None) -> dict:
    """Issue 29 item 8: NFE 4 adherence >= 0.8 x the teacher's DDIM 25 at the same W (each set of weights); the LoRA
    student's peak memory below the full one's at the same W."""
    ddim = {r["guidance"]: r["adherence"] for r in (teacher or {}).get("rows", []) if "DDIM" in r["source"]}
    checks = {}
    for name, v in variants.items():
        for r in v["rows"]:
            if r.get("nfe") == 4 and "adherence" in r and r["guidance"] in ddim:
                ratio = r["adherence"] / ddim[r["guidance"]]
                checks[f"{name} ({r['weights']}) nfe4"] = {"ratio": round(ratio, 3), "pass": ratio >= 0.8}
    for name, full in variants.items():
        lora = next((v for k, v in variants.items() if k.startswith("lora") and k.split("_")[1] ==
                     name.split("_")[1]), None) if name.startswith("full") else None
        if lora:
            key = next((k for k in full if "mem" in k.lower() and k in lora), None)     # the trainer's own, if any
            a, b = (full[key], lora[key]) if key else (full["distill"]["max_rss_mib"], lora["distill"]["max_rss_mib"])
            checks[f"lora_peak_memory_below_full_{name.split('_')[1]}"] = {"measure": key or "max_rss_mib", "full": a,
                                                                          "lora": b, "pass": b < a}
    return checks


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/latent_digits")
    ap.add_argument("--json", default="bench/results/latent_digits.json")
    ap.add_argument("--stages", default=None,
                    help=f"comma-separated stages to run (again), of {','.join(STAGES)}; default: every stage "
                         "without a finished record, in order")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--kl-weight", type=float, default=1e-4)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--n", type=int, default=100, help="samples per class in evaluate and distill")
    ap.add_argument("--scales", default="1,3", help="guidance scales (1: no CFG)")
    ap.add_argument("--steps", type=int, default=25, help="the pipeline's DDIM steps")
    ap.add_argument("--heun-nfe", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--sigma-rel", type=float, default=0.05,
                    help="distill: the post-hoc EMA width sampled beside the training EMA (`ctmkit ema --sigma-rel`)")
    ap.add_argument("--distill", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra settings for both `ctmkit distill` runs")
    ap.add_argument("--grids", default="bench/results/latent_digits",
                    help="where copies of the teacher's DDIM grids go (committed; every grid stays in OUT/eval/grids)")
    args = ap.parse_args()
    args.scales = [float(v) for v in args.scales.split(",")]
    os.environ.update(QUIET)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    named = [s for s in (args.stages or "").split(",") if s]
    bad = [s for s in named if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    out = Path(args.out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    records, ran = {}, []
    for stage in STAGES:
        path = out / "stages" / f"{stage}.json"
        done = path.is_file() and json.loads(path.read_text()).get("status") != "pending"
        if stage not in named and (args.stages is not None or done):
            if path.is_file():
                records[stage] = json.loads(path.read_text())
            continue
        print(f"== stage {stage}", flush=True)
        t0, c0 = time.time(), cpu_seconds()
        fn = globals()[f"stage_{stage}"]
        rec = fn(args, out, records.get("evaluate")) if stage == "distill" else fn(args, out)
        rec = {**rec, "stage_wall_s": round(time.time() - t0, 1), "stage_cpu_s": round(cpu_seconds() - c0, 1)}
        path.write_text(json.dumps(rec, indent=1))
        records[stage] = rec
        ran.append(stage)
        print(f"== stage {stage}: {rec['stage_wall_s']} s wall, {rec['stage_cpu_s']} s CPU", flush=True)
    if (out / "eval" / "grids").is_dir() and "evaluate" in ran:
        dst = Path(args.grids)
        dst.mkdir(parents=True, exist_ok=True)
        for png in sorted((out / "eval" / "grids").glob("teacher_ddim*.png")):
            (dst / png.name).write_bytes(png.read_bytes())
    result = {"bench": "latent_digits (issue 29 item 8: the teacher and its CTM students)", "out": str(out),
              "threads": torch.get_num_threads(), "stages": records}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
