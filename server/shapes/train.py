"""Train the shapes prior: `python -m server.shapes.train --steps 2000`.

A pixel-space, text-conditioned diffusers `UNet2DConditionModel` (32x32 RGB, epsilon prediction,
cosine schedule) with a small `CLIPTextModel` trained jointly. Colour must bind to shape quickly,
so besides cross-attention at 16x16 and 8x8 the pooled text embedding is added to the time
embedding (`addition_embed_type="text"`) and modulates every ResNet block (scale-shift norm): a
global property like colour then reaches the 32x32 layers directly. Min-SNR-5 loss weighting speeds
up convergence. The camera is conditioning too: the direction each image was seen from is projected
into the time embedding (`class_embed_type="projection"`), so in 3-D each view is judged as the object
looks from that camera rather than as whatever view of it the image resembles most; it is dropped for
10 % of images, so the prior also samples without one. Training resumes from `<run-dir>/checkpoint.pt`
(full state) when present, else from the shipped weights (EMA weights, fresh optimiser), so it can
continue across sessions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from server.priors.base import VIEW_DIRECTION_DIM, view_directions
from server.render.cameras import orbit_c2w
from server.shapes.dataset import load_or_build, sample_caption
from server.shapes.primitives import COLOURS, SHAPES, all_captions
from server.shapes.tokenizer import build_clip_tokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IMAGE_SIZE = 32
TEXT_DIM = 64
UNCOND_PROBABILITY = 0.1
NO_CAMERA_PROBABILITY = 0.1
# The camera projection starts at zero beside a trained network: at the network's learning rate it had
# barely moved after 500 steps (samples drawn with and without cameras were the same pictures).
CAMERA_LR_SCALE = 10.0
# A flipped image of a primitive (all are symmetric in y = 0) is its view from azimuth -a: y negated.
MIRROR = torch.tensor([1.0, -1.0, 1.0])
MIN_SNR_GAMMA = 5.0
HIGH_NOISE_BOOST = 5.0


def unet_config() -> dict:
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="projection",
        projection_class_embeddings_input_dim=VIEW_DIRECTION_DIM,
    )


def new_unet() -> UNet2DConditionModel:
    """The UNet with its camera projection's last layer at zero: adding the camera changes nothing
    until training teaches it, so a camera-free model's weights continue unchanged."""
    unet = UNet2DConditionModel(**unet_config())
    torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
    torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
    return unet


def dataset_view_directions(views: np.ndarray) -> torch.Tensor:
    """[N, 3] the direction each training image was seen from, as the prior computes it from a c2w."""
    c2w = torch.from_numpy(np.stack([orbit_c2w(e, a, r) for e, a, r, _ in views]))
    return view_directions(c2w, len(views), torch.device("cpu"))


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
    )


def export_weights(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer_dir: Path, folder: Path, info: dict
) -> None:
    """Write a diffusers-style folder (unet/ text_encoder/ tokenizer/ scheduler/) atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet_half = UNet2DConditionModel.from_config(unet.config)
    unet_half.load_state_dict(unet.state_dict())
    unet_half.to(torch.float16).save_pretrained(tmp / "unet")
    text_encoder.save_pretrained(tmp / "text_encoder")
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    DDIMScheduler.from_config(noise_scheduler().config, set_alpha_to_one=True).save_pretrained(
        tmp / "scheduler"
    )
    (tmp / "training.json").write_text(json.dumps(info, indent=2))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


class EMA:
    def __init__(self, modules: list[torch.nn.Module]):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(0.999, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for p, s in zip([p for m in modules for p in m.parameters()], self.shadow, strict=True):
            p.copy_(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps to run in this call")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--images", type=int, default=30000, help="size of the rendered training set")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--export-every", type=int, default=1000)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer = build_clip_tokenizer(all_captions(), tokenizer_dir)
    data = load_or_build(
        run_dir / f"data_{args.images}_{IMAGE_SIZE}_{args.data_seed}.npz",
        args.images,
        IMAGE_SIZE,
        args.data_seed,
    )
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8 [N,3,S,S]
    directions = dataset_view_directions(data.views)

    torch.manual_seed(0)
    unet = new_unet()
    text_encoder = CLIPTextModel(text_config(tokenizer))
    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    camera = list(unet.class_embedding.parameters())
    rest = [p for p in params if all(p is not c for c in camera)]
    optimizer = torch.optim.AdamW(
        [{"params": rest, "lr_scale": 1.0}, {"params": camera, "lr_scale": CAMERA_LR_SCALE}],
        lr=args.lr,
        weight_decay=1e-2,
        foreach=True,
    )
    ema = EMA(modules)
    step, seconds = 0, 0.0
    camera_since = 0
    rng = np.random.default_rng(args.data_seed + 1)

    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.shadow, ema.updates = state["ema"], state["ema_updates"]
        step, seconds, rng = state["step"], state["seconds"], state["rng"]
        camera_since = state.get("camera_since_step", 0)
        print(f"resumed from {checkpoint} at step {step}", flush=True)
    elif (args.out / "training.json").exists():
        shipped = UNet2DConditionModel.from_pretrained(args.out / "unet").float().state_dict()
        missing, unexpected = unet.load_state_dict(shipped, strict=False)
        if unexpected or any(not key.startswith("class_embedding.") for key in missing):
            raise SystemExit(f"{args.out} holds another UNet (missing {missing}, unexpected {unexpected})")
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(args.out / "text_encoder").state_dict())
        info = json.loads((args.out / "training.json").read_text())
        step, seconds = info["steps"], info["train_seconds"]
        camera_since = step if missing else info.get("camera_since_step", 0)
        ema = EMA(modules)
        # The EMA restarts where the camera came in: one at 0.999 would hide it for thousands of steps.
        ema.updates = step - camera_since
        print(f"continuing from the shipped EMA weights at step {step} (fresh optimiser)", flush=True)

    scheduler = noise_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Min-SNR-5, and up to 5x more weight where the noise dominates (SNR < 1): there an epsilon error
    # is the x0 error times sqrt(SNR), so the silhouette, and the camera that decides it, barely count
    # in plain epsilon loss; distillation lives at those noise levels.
    loss_weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr * torch.clamp(1.0 / snr, 1.0, HIGH_NOISE_BOOST)
    colour_names = list(COLOURS)

    def info() -> dict:
        return {
            "steps": step,
            "train_seconds": round(seconds, 1),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "images": args.images,
            "image_size": IMAGE_SIZE,
            "data_seed": args.data_seed,
            "shapes": list(SHAPES),
            "colours": colour_names,
            "threads": args.threads,
            "command": "python -m server.shapes.train",
            "parameters": sum(p.numel() for p in params),
            "camera_since_step": camera_since,
        }

    def save_checkpoint() -> None:
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.shadow,
                "ema_updates": ema.updates,
                "step": step,
                "seconds": seconds,
                "rng": rng,
                "camera_since_step": camera_since,
            },
            tmp,
        )
        tmp.replace(checkpoint)

    def export() -> None:
        live = [p.detach().clone() for p in params]
        ema.copy_to(modules)
        export_weights(unet, text_encoder, tokenizer_dir, args.out, info())
        with torch.no_grad():
            for p, v in zip(params, live, strict=True):
                p.copy_(v)
        print(f"exported EMA weights at step {step} to {args.out}", flush=True)

    # SIGTERM / Ctrl-C finish the current step, then checkpoint and export: no progress is lost.
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    end = step + args.steps
    window: list[float] = []
    tick = time.perf_counter()
    while step < end and not stop:
        idx = rng.integers(0, len(images), args.batch_size)
        captions = [
            ""
            if rng.random() < UNCOND_PROBABILITY
            else sample_caption(rng, colour_names[data.colour_ids[i]], SHAPES[data.shape_ids[i]])
            for i in idx
        ]
        x0 = images[idx].float() / 127.5 - 1.0
        flip = torch.from_numpy(rng.random(args.batch_size) < 0.5)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)  # primitives are mirror-symmetric
        camera = directions[idx] * torch.where(flip[:, None], MIRROR, 1.0)
        camera[torch.from_numpy(rng.random(args.batch_size) < NO_CAMERA_PROBABILITY)] = 0.0
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, args.batch_size))
        x_t = scheduler.add_noise(x0, noise, t)
        context = text_encoder(ids).last_hidden_state
        eps = unet(x_t, t, encoder_hidden_states=context, class_labels=camera).sample
        loss = (loss_weight[t].float() * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        warmup = min(1.0, (step + 1) / 200)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup * group["lr_scale"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        step += 1
        window.append(loss.item())
        if step % 50 == 0:
            now = time.perf_counter()
            seconds += now - tick
            print(f"step {step} loss {np.mean(window):.4f} {(now - tick) / 50:.2f} s/step", flush=True)
            tick, window = now, []
        if step % args.checkpoint_every == 0:
            save_checkpoint()
        if step % args.export_every == 0:
            export()
    save_checkpoint()
    export()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
