"""bench: what a latent text-to-image student holds in memory, full against LoRA (docs/method.md section 9), and what
ctm.teacher_dtype=bfloat16 and train.grad_checkpointing=true change.

Builds a Stable-Diffusion-shaped pipeline of random components (`--size tiny`: the tests' sizes; `small`: a UNet of
about 11M parameters on 16 x 16 latents), prepares a latent folder from random images, then runs each setting in a
fresh process (ru_maxrss is a per-process peak): a CTMRun for `--steps` distillation steps, reporting the student's
and the trained parameter counts, the bytes held by the teacher, student, target, EMAs and optimiser state (each
tensor once), the peak RSS of the process and the median time of a step (after the first).

    python bench/latent_memory.py --size small --steps 4 --json bench/results/latent_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # ctmkit and tests/ from the repository

LORA, BF16, CKPT = "ctm.lora_rank=4", "ctm.teacher_dtype=bfloat16", "train.grad_checkpointing=true"
SETTINGS = {"full": [], "lora": [LORA], "full_bf16": [BF16], "lora_bf16": [LORA, BF16], "full_ckpt": [CKPT],
            "lora_ckpt": [LORA, CKPT]}
SIZES = {"tiny": dict(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",
                                                                                            "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, attention_head_dim=2,
                      sample_size=8),
         "small": dict(block_out_channels=(64, 128, 256), layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
                       attention_head_dim=8, sample_size=16)}


def build(out: Path, size: str) -> tuple[Path, Path]:
    """A random pipeline of `size` and a prepared latent folder of 8 random images with prompts, under out."""
    pipe, lat = out / "pipe", out / "lat"
    if lat.is_dir():
        return pipe, lat
    import diffusers
    import transformers
    from PIL import Image

    from ctmkit.cli import main
    from tests.test_latent_teacher import MAX_LENGTH, write_clip_tokenizer
    write_clip_tokenizer(out / "words")
    tok = transformers.CLIPTokenizer.from_pretrained(out / "words", model_max_length=MAX_LENGTH)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=64, **SIZES[size])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, layers_per_block=1, norm_num_groups=4)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(pipe)
    side = SIZES[size]["sample_size"] * 2
    (out / "src").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, words in enumerate(["a cat", "a red dog", "the mat", "a dog on the mat"] * 2):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out / "src" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": words}))
    (out / "src" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    main(["prepare", "--pipeline", str(pipe), str(out / "src"), str(lat), "--quiet"], standalone_mode=False)
    return pipe, lat


def held_bytes(run) -> int:
    """Bytes of every tensor the run holds (teacher, student, target, EMAs, optimiser state), each tensor once."""
    seen: dict[int, int] = {}
    teacher = getattr(run.teacher, "teacher", run.teacher)
    for m in (run.net, run.target, teacher, *run.emas):
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    for opt in run.opts.values():
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.numel() > 1:
                    seen[v.data_ptr()] = v.numel() * v.element_size()
    return sum(seen.values())


def one(name: str, pipe: Path, lat: Path, steps: int, out: Path) -> dict:
    """One setting in this process: the run's counts and bytes, its peak RSS and step time."""
    from ctmkit.config import DistillConfig, load_config
    from ctmkit.data import load_data
    from ctmkit.train.ctm import CTMRun
    torch.set_num_threads(1)
    over = [f"train.steps={steps}", "train.batch_size=4", "ctm.num_scales=18", "ctm.max_k=4", "train.phema=[]",
            "train.log_every=1", "train.ckpt_every=100000", "ctm.student_precond=teacher", *SETTINGS[name]]
    cfg = load_config(DistillConfig, None, None, over, data=str(lat), teacher=f"diffusers:{pipe}")
    shutil.rmtree(out / f"run_{name}", ignore_errors=True)
    run = CTMRun(cfg, out / f"run_{name}", load_data(lat))
    res = {"setting": name, "student_params": sum(p.numel() for p in run.net.parameters()),
           "trained_params": sum(p.numel() for p in run.trained.parameters()),
           "trained_bytes": sum(p.numel() * p.element_size() for p in run.trained.parameters())}
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run.fit(progress=False)
    times = [json.loads(line)["time"] for line in (out / f"run_{name}" / "stats.jsonl").read_text().splitlines()]
    ckpt = sorted((out / f"run_{name}" / "checkpoints").glob("*.safetensors"))[-1]
    return {**res, "held_bytes": held_bytes(run), "checkpoint_bytes": ckpt.stat().st_size,
            "peak_rss_setup_mb": round(rss_setup, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "step_s": round(statistics.median(np.diff(times).tolist()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench/out/latent_memory"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", choices=sorted(SETTINGS), default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = a.out / a.size
    out.mkdir(parents=True, exist_ok=True)
    pipe, lat = build(out, a.size)
    if a.one:
        print(json.dumps(one(a.one, pipe, lat, a.steps, out)))
        return
    rows = []
    for name in SETTINGS:
        res = subprocess.run([sys.executable, __file__, "--size", a.size, "--steps", str(a.steps), "--out",
                              str(a.out), "--one", name], capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"size": a.size, "steps": a.steps, "device": "cpu, 1 thread", "rows": rows},
                                     indent=1))


if __name__ == "__main__":
    main()
