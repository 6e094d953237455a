"""Train convkit's demo model on this CPU: a tiny SDXL pipeline (the real diffusers and
transformers classes: UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection,
AutoencoderKL) that draws the world of ``convkit/tiny/world.py`` — one coloured circle or square
on a coloured background, captioned "a red circle on a blue background".

Stages (each resumable: it checkpoints every few minutes and on Ctrl-C/SIGTERM, and a re-run
continues from the last checkpoint with the same result as an uninterrupted run):

  vae        AutoencoderKL, 64 px -> 4 x 16 x 16 latents, on both styles; then the latent
             scaling factor (1 / std of the latents, as SD's 0.18215 was found)
  base       UNet + both text encoders, epsilon prediction, SDXL's noise schedule, caption
             dropout 10 % (zeroed embeddings, which is what the SDXL pipeline feeds for an
             empty negative prompt), min-SNR-5 loss weights, EMA 0.999
  custom     the "custom fine-tune": the base UNet trained further on the other style (outlined
             shapes on striped backgrounds), text encoders frozen
  lightning  the 4-step LoRA (rank 32 on every Linear/Conv of the UNet's down, mid and up
             blocks: what extract-lora carries), distilled from guided teachers: the base
             and the custom model each draw x0 from noise z in 25 Euler steps at guidance 5;
             one adapter learns, added to the base for the base's samples and to the custom
             model for the custom's, to reach the same x0 from z in 4 Euler steps (trailing
             spacing: t = 999, 749, 499, 249) at guidance 0. Euler on epsilon is DDIM, so
             along the student's ideal path every step sees
             x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e0 with e0 fixed by (z, x0): those four
             inputs and the target e0 are exact training pairs. The lightning UNet is the
             base plus the adapter's ΔW.
  export     fp16 weights into convkit/tiny/demo/ (base pipeline, custom UNet, lightning UNet,
             config) and a check render of every caption through diffusers'
             StableDiffusionXLPipeline, scored with world.measure

    python tools/train_demo.py --work /work/demo-train --stage all --threads 2
    python tools/train_demo.py --work /work/demo-train --stage base --minutes 60   # a slice

Every batch is a function of (stage seed, step) only, so resuming is exact for a given
thread count. Checkpoints are loaded with torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convkit.models import instantiate  # noqa: E402
from convkit.tiny import world  # noqa: E402

DEMO_DIR = ROOT / "convkit" / "tiny" / "demo"

CONFIGS = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 16, "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": [1, 2], "transformer_layers_per_block": [1, 1],
        "cross_attention_dim": 64, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    },
    "text_encoder": {
        "_class_name": "CLIPTextModel",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 49408,
        "hidden_act": "quick_gelu", "projection_dim": 32, "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8,
        "sample_size": 64, "scaling_factor": 1.0, "force_upcast": False,
    },
}
# the second text encoder: the first's shape, OpenCLIP's activation and pad id, a projection
CONFIGS["text_encoder_2"] = {**CONFIGS["text_encoder"], "_class_name": "CLIPTextModelWithProjection",
                             "hidden_act": "gelu", "pad_token_id": 0}
SCHEDULER = {  # SDXL's (stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json)
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
TOKENIZERS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
TIME_IDS = [world.SIZE, world.SIZE, 0, 0, world.SIZE, world.SIZE]

STAGES = {
    # steps, batch, lr, seed
    "vae": dict(steps=2500, batch=16, lr=1e-3, seed=11),
    "base": dict(steps=4000, batch=64, lr=3e-4, te_lr=1e-4, seed=22),
    "custom": dict(steps=800, batch=64, lr=1e-4, seed=33),
    "lightning": dict(steps=3500, batch=64, lr=3e-4, seed=44, rank=32, teacher_samples=2048,
                      teacher_steps=25, teacher_guidance=5.0),
}
BANK = 16384           # scenes per latent bank (per style)
EMA = 0.999
SAVE_EVERY_S = 300


# ----------------------------------------------------------------------------- plumbing


class Stop(Exception):
    pass


_stop = {"flag": False}


def _on_signal(signum, frame):
    _stop["flag"] = True


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def build(name: str, config: dict | None = None) -> torch.nn.Module:
    cfg = dict(config or CONFIGS[name])
    return instantiate(cfg["_class_name"], cfg)


def save_ckpt(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def images_to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
            else:
                ema[k].copy_(v)


def lr_at(step: int, base: float, warmup: int = 200) -> float:
    return base * min(1.0, (step + 1) / warmup)


class Loop:
    """A resumable training loop: checkpoint every SAVE_EVERY_S, on a signal and at the end."""

    def __init__(self, work: Path, stage: str, deadline: float | None):
        self.dir = work / stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / "ckpt.pt"
        self.deadline = deadline
        self.last_save = time.time()

    def should_stop(self) -> bool:
        return _stop["flag"] or (self.deadline is not None and time.time() > self.deadline)

    def maybe_save(self, state_fn, force: bool = False) -> None:
        if force or time.time() - self.last_save > SAVE_EVERY_S:
            save_ckpt(self.ckpt, state_fn())
            self.last_save = time.time()


# ----------------------------------------------------------------------------- text


class TextEncoders:
    """The SDXL pipeline's prompt encoding (StableDiffusionXLPipeline.encode_prompt, no
    clip_skip): penultimate hidden states of both encoders side by side, the pooled
    projection of the second."""

    def __init__(self, te1, te2):
        from convkit.tokenizers import clip_tokenizer

        self.te1, self.te2 = te1, te2
        self.tok1, self.tok2 = clip_tokenizer("clip_l"), clip_tokenizer("clip_g")

    def ids(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.tok1(captions, **kw).input_ids, self.tok2(captions, **kw).input_ids

    def encode(self, ids1, ids2) -> tuple[torch.Tensor, torch.Tensor]:
        o1 = self.te1(ids1, output_hidden_states=True)
        o2 = self.te2(ids2, output_hidden_states=True)
        emb = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        return emb, o2.text_embeds


def unet_call(unet, x, t, emb, pooled):
    time_ids = torch.tensor(TIME_IDS, dtype=x.dtype).repeat(x.shape[0], 1)
    return unet(x, t, encoder_hidden_states=emb,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


# ----------------------------------------------------------------------------- stages


def stage_vae(work: Path, deadline) -> None:
    p = STAGES["vae"]
    loop = Loop(work, "vae", deadline)
    vae = build("vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=p["lr"], weight_decay=0.0)
    ck = load_ckpt(loop.ckpt)
    step = 0
    if ck:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
        log(f"vae: resumed at step {step}")
    state = lambda: {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}  # noqa
    vae.train()
    t0, losses = time.time(), []
    while step < p["steps"]:
        if loop.should_stop():
            loop.maybe_save(state, force=True)
            raise Stop
        rng = np.random.default_rng([p["seed"], step])
        half = p["batch"] // 2
        a, _ = world.batch(rng, half, "base")
        b, _ = world.batch(rng, p["batch"] - half, "custom")
        x = images_to_tensor(np.concatenate([a, b]))
        g = torch.Generator().manual_seed(p["seed"] * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, p["lr"]) * (0.1 if step > 0.8 * p["steps"] else 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log(f"vae {step}/{p['steps']} loss {np.mean(losses[-50:]):.4f} "
                f"({(time.time() - t0) / len(losses):.2f} s/step)")
        loop.maybe_save(state)
    vae.eval()
    # the latent scaling factor: unit variance of sampled latents over fresh scenes of both
    # styles (how SD's 0.18215 and SDXL's 0.13025 were chosen)
    with torch.no_grad():
        zs = []
        for k in range(8):
            rng = np.random.default_rng([p["seed"], 10**9 + k])
            imgs, _ = world.batch(rng, 64, "base" if k % 2 == 0 else "custom")
            zs.append(vae.encode(images_to_tensor(imgs)).latent_dist.mean)
        sf = float(1.0 / torch.cat(zs).std())
    save_ckpt(loop.ckpt, {**state(), "done": True, "scaling_factor": sf})
    log(f"vae: done, scaling factor {sf:.5f}")


def _vae_done(work: Path):
    ck = load_ckpt(work / "vae" / "ckpt.pt")
    if not ck or not ck.get("done"):
        raise SystemExit("train the vae stage first")
    vae = build("vae")
    vae.load_state_dict(ck["model"])
    vae.eval()
    return vae, float(ck["scaling_factor"])


def latent_bank(work: Path, style: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """BANK scenes of ``style``: latent mean and std (unscaled) and captions; built once."""
    path = work / f"bank_{style}.pt"
    cap_path = work / f"bank_{style}.json"
    if path.exists() and cap_path.exists():
        d = torch.load(path, weights_only=True)
        return d["mean"], d["std"], json.loads(cap_path.read_text())
    vae, _ = _vae_done(work)
    means, stds, caps = [], [], []
    with torch.no_grad():
        for k in range(BANK // 256):
            rng = np.random.default_rng([7, 0 if style == "base" else 1, k])
            imgs, c = world.batch(rng, 256, style)
            post = vae.encode(images_to_tensor(imgs)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            caps += c
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"mean": mean, "std": std}, path)
    cap_path.write_text(json.dumps(caps))
    log(f"bank {style}: {len(caps)} scenes")
    return mean, std, caps


def _noise_schedule():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000)
    return s.alphas_cumprod.float()


def _diffusion_stage(work: Path, deadline, name: str, style: str, init: dict | None,
                     train_te: bool) -> None:
    p = STAGES[name]
    loop = Loop(work, name, deadline)
    _, sf = _vae_done(work)
    mean, std, caps = latent_bank(work, style)
    unet, te1, te2 = build("unet"), build("text_encoder"), build("text_encoder_2")
    if init:
        unet.load_state_dict(init["unet"])
        te1.load_state_dict(init["text_encoder"])
        te2.load_state_dict(init["text_encoder_2"])
    text = TextEncoders(te1, te2)
    groups = [{"params": list(unet.parameters()), "lr": p["lr"], "base": p["lr"]}]
    if train_te:
        groups.append({"params": list(te1.parameters()) + list(te2.parameters()),
                       "lr": p["te_lr"], "base": p["te_lr"]})
    else:
        te1.requires_grad_(False)
        te2.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    mods = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    ema = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in mods.items()}
    step = 0
    ck = load_ckpt(loop.ckpt)
    if ck:
        for n, m in mods.items():
            m.load_state_dict(ck["model"][n])
        ema = ck["ema"]
        opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
        log(f"{name}: resumed at step {step}")
    state = lambda: {"model": {n: m.state_dict() for n, m in mods.items()},  # noqa: E731
                     "ema": ema, "opt": opt.state_dict(), "step": step}
    ac = _noise_schedule()
    snr = ac / (1 - ac)
    unet.train()
    te1.train(train_te)
    te2.train(train_te)
    t0, losses = time.time(), []
    while step < p["steps"]:
        if loop.should_stop():
            loop.maybe_save(state, force=True)
            raise Stop
        g = torch.Generator().manual_seed(p["seed"] * 1_000_003 + step)
        idx = torch.randint(0, len(caps), (p["batch"],), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        t = torch.randint(0, 1000, (p["batch"],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        drop = torch.rand(p["batch"], generator=g) < 0.1
        ids1, ids2 = text.ids([caps[i] for i in idx.tolist()])
        with torch.set_grad_enabled(train_te):
            emb, pooled = text.encode(ids1, ids2)
        keep = (~drop).float()
        emb = emb * keep.view(-1, 1, 1)
        pooled = pooled * keep.view(-1, 1)
        pred = unet_call(unet, xt, t, emb, pooled)
        w = torch.clamp(snr[t], max=5.0) / snr[t]           # min-SNR-5, epsilon target
        loss = (w * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, grp["base"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for grp in groups for q in grp["params"]], 1.0)
        opt.step()
        step += 1
        decay = 0.0 if step < 200 else EMA
        for n, m in mods.items():
            ema_update(ema[n], m, decay)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log(f"{name} {step}/{p['steps']} loss {np.mean(losses[-50:]):.4f} "
                f"({(time.time() - t0) / len(losses):.2f} s/step)")
        loop.maybe_save(state)
    save_ckpt(loop.ckpt, {**state(), "done": True})
    log(f"{name}: done")


def _done_ema(work: Path, name: str) -> dict:
    ck = load_ckpt(work / name / "ckpt.pt")
    if not ck or not ck.get("done"):
        raise SystemExit(f"train the {name} stage first")
    return ck["ema"]


def stage_base(work: Path, deadline) -> None:
    _diffusion_stage(work, deadline, "base", "base", None, train_te=True)


def stage_custom(work: Path, deadline) -> None:
    _diffusion_stage(work, deadline, "custom", "custom", _done_ema(work, "base"), train_te=False)


@torch.no_grad()
def teacher_bank(work: Path, style: str) -> dict:
    """(caption index, z, x0) drawn by the ``style`` model (base or custom): Euler, trailing
    spacing, CFG. The custom model has the base's text encoders (they were frozen)."""
    p = STAGES["lightning"]
    path = work / "lightning" / f"teacher_{style}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    from diffusers import EulerDiscreteScheduler

    base = _done_ema(work, "base")
    unet, te1, te2 = build("unet"), build("text_encoder"), build("text_encoder_2")
    unet.load_state_dict(_done_ema(work, style)["unet"])
    te1.load_state_dict(base["text_encoder"])
    te2.load_state_dict(base["text_encoder_2"])
    for m in (unet, te1, te2):
        m.eval()
    text = TextEncoders(te1, te2)
    captions = world.all_captions()
    out_z, out_x0, out_c = [], [], []
    seed = p["seed"] * 7919 + (0 if style == "base" else 500_009)
    for k in range(p["teacher_samples"] // 64):
        g = torch.Generator().manual_seed(seed + k)
        ci = torch.randint(0, len(captions), (64,), generator=g)
        z = torch.randn(64, 4, 16, 16, generator=g)
        emb, pooled = text.encode(*text.ids([captions[i] for i in ci.tolist()]))
        sched = EulerDiscreteScheduler.from_config({**SCHEDULER, "timestep_spacing": "trailing"})
        sched.set_timesteps(p["teacher_steps"])
        x = z * sched.init_noise_sigma
        for t in sched.timesteps:
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            e = unet_call(unet, xin, t, torch.cat([emb, torch.zeros_like(emb)]),
                          torch.cat([pooled, torch.zeros_like(pooled)]))
            ec, eu = e.chunk(2)
            x = sched.step(eu + p["teacher_guidance"] * (ec - eu), t, x).prev_sample
        out_z.append(z)
        out_x0.append(x)
        out_c.append(ci)
        log(f"teacher {style} {k + 1}/{p['teacher_samples'] // 64}")
    d = {"z": torch.cat(out_z), "x0": torch.cat(out_x0), "caption": torch.cat(out_c)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_ckpt(path, d)
    return d


#: where a LoRA can act: every Linear and Conv2d inside the UNet's down, mid and up blocks —
#: what extract-lora carries (kohya's UNet targets: the transformer blocks' linears plus, for
#: LoCon, the resnets', downsamplers' and upsamplers' convs); conv_in/conv_out, the time and
#: add embeddings, norms and biases stay the base's.
LORA_SCOPE = ("down_blocks.", "mid_block.", "up_blocks.")


class SharedLoRA(torch.nn.Module):
    """One low-rank ΔW = up · down per module, attached by forward hooks to several UNets
    (the base and the custom model), so that one adapter is trained on both at once."""

    def __init__(self, unet: torch.nn.Module, rank: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.names: list[str] = []
        self.down, self.up = torch.nn.ModuleDict(), torch.nn.ModuleDict()
        for name, m in unet.named_modules():
            if not name.startswith(LORA_SCOPE):
                continue
            if isinstance(m, torch.nn.Linear):
                r = min(rank, m.in_features, m.out_features)
                down = torch.nn.Linear(m.in_features, r, bias=False)
                up = torch.nn.Linear(r, m.out_features, bias=False)
            elif isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                r = min(rank, fan_in, m.out_channels)
                down = torch.nn.Conv2d(m.in_channels, r, m.kernel_size, m.stride, m.padding,
                                       m.dilation, bias=False)
                up = torch.nn.Conv2d(r, m.out_channels, 1, bias=False)
            else:
                continue
            torch.nn.init.zeros_(up.weight)       # starts as the base model exactly
            key = name.replace(".", "__")
            self.names.append(name)
            self.down[key], self.up[key] = down, up

    def attach(self, unet: torch.nn.Module) -> None:
        for name in self.names:
            key = name.replace(".", "__")
            down, up = self.down[key], self.up[key]
            unet.get_submodule(name).register_forward_hook(
                lambda mod, inp, out, d=down, u=up: out + u(d(inp[0])))

    @staticmethod
    def delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """ΔW from the factors (fp32), in the module's weight shape."""
        d = down.float().reshape(down.shape[0], -1)
        dw = up.float().reshape(up.shape[0], -1) @ d
        return dw.reshape(up.shape[0], *down.shape[1:])

    def merged(self, unet_sd: dict, factors: dict) -> dict:
        """``unet_sd`` + ΔW of every module, with the factors of ``factors`` (a state dict of
        this module, e.g. its EMA)."""
        out = {k: v.clone() for k, v in unet_sd.items()}
        for name in self.names:
            key = name.replace(".", "__")
            w = out[f"{name}.weight"]
            dw = self.delta(factors[f"down.{key}.weight"], factors[f"up.{key}.weight"])
            out[f"{name}.weight"] = (w.float() + dw).to(w.dtype)
        return out


def stage_lightning(work: Path, deadline) -> None:
    """A 4-step LoRA distilled on the base and the custom model at once: one adapter, added to
    the base for the base teacher's samples and to the custom model for the custom teacher's.
    A full fine-tune distilled on the base alone rendered like the base at 25 steps (27 dB) but
    its difference, merged into the custom model, did not (15 dB, any rank): in a 3 M-parameter
    UNet the fine-tune and the distillation move the same weights. Real Lightning LoRAs carry
    over to SDXL fine-tunes because those stay close to the base; training the adapter on both
    makes the demo show the same release flow."""
    p = STAGES["lightning"]
    banks = {s: teacher_bank(work, s) for s in ("base", "custom")}
    loop = Loop(work, "lightning", deadline)
    base = _done_ema(work, "base")
    unets = {"base": build("unet"), "custom": build("unet")}
    unets["base"].load_state_dict(base["unet"])
    unets["custom"].load_state_dict(_done_ema(work, "custom")["unet"])
    lora = SharedLoRA(unets["base"], p["rank"], p["seed"])
    for u in unets.values():
        u.requires_grad_(False)
        u.train()
        lora.attach(u)
    te1, te2 = build("text_encoder"), build("text_encoder_2")
    te1.load_state_dict(base["text_encoder"])
    te2.load_state_dict(base["text_encoder_2"])
    te1.eval()
    te2.eval()
    text = TextEncoders(te1, te2)
    captions = world.all_captions()
    with torch.no_grad():
        emb_all, pooled_all = text.encode(*text.ids(captions))
    opt = torch.optim.AdamW(lora.parameters(), lr=p["lr"], weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in lora.state_dict().items()}
    step = 0
    ck = load_ckpt(loop.ckpt)
    if ck:
        lora.load_state_dict(ck["lora"])
        ema = ck["ema_lora"]
        opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
        log(f"lightning: resumed at step {step}")
    state = lambda: {"lora": lora.state_dict(), "ema_lora": ema,  # noqa: E731
                     "opt": opt.state_dict(), "step": step}
    ac = _noise_schedule()
    ts = torch.tensor([999, 749, 499, 249])        # 4 Euler steps, trailing spacing
    a0 = ac[999]
    half = p["batch"] // 2
    t0, losses = time.time(), []
    while step < p["steps"]:
        if loop.should_stop():
            loop.maybe_save(state, force=True)
            raise Stop
        g = torch.Generator().manual_seed(p["seed"] * 1_000_003 + step)
        loss = 0.0
        for style, unet in unets.items():
            bank = banks[style]
            idx = torch.randint(0, len(bank["z"]), (half,), generator=g)
            z, x0, ci = bank["z"][idx], bank["x0"][idx], bank["caption"][idx]
            t = ts[torch.randint(0, 4, (half,), generator=g)]
            e0 = (z - a0.sqrt() * x0) / (1 - a0).sqrt()      # the epsilon that maps z to x0
            a = ac[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * e0
            pred = unet_call(unet, xt, t, emb_all[ci], pooled_all[ci])
            # weight by how much the step moves x0: the same epsilon error costs sqrt((1-a)/a)
            w = ((1 - a) / a).view(-1).clamp(max=25.0)
            loss = loss + (w * ((pred - e0) ** 2).mean(dim=(1, 2, 3))).mean() / len(unets)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, p["lr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, lora, 0.0 if step < 100 else EMA)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log(f"lightning {step}/{p['steps']} loss {np.mean(losses[-50:]):.4f} "
                f"({(time.time() - t0) / len(losses):.2f} s/step)")
        loop.maybe_save(state)
    save_ckpt(loop.ckpt, {**state(), "done": True,
                          "ema": lora.merged(base["unet"], ema)})   # the lightning UNet
    log("lightning: done")


def stage_export(work: Path, deadline, out_dir: Path | None = None) -> None:
    """The trained weights as users meet such models (convkit/tiny/demo/, fp16): the base as an
    SGM single file with every component (what a "checkpoint for ComfyUI/Forge" is), the
    custom and lightning UNets as diffusers-named UNet-only files (as SDXL-Lightning ships
    its UNets); demo.json holds the configs, the sampling settings and how they were made."""
    from convkit import keymap
    from convkit.tiny import save_state_dict

    out_dir = out_dir or DEMO_DIR
    vae, sf = _vae_done(work)
    base = _done_ema(work, "base")
    custom = _done_ema(work, "custom")
    light = _done_ema(work, "lightning")
    out_dir.mkdir(parents=True, exist_ok=True)
    half = lambda sd: {k: v.half().contiguous() if v.is_floating_point() else v.contiguous()  # noqa
                       for k, v in sd.items()}
    cfgs = json.loads(json.dumps(CONFIGS))
    cfgs["vae"]["scaling_factor"] = sf
    sds = {"unet": base["unet"], "text_encoder": base["text_encoder"],
           "text_encoder_2": base["text_encoder_2"], "vae": vae.state_dict()}
    for comp, sd in sds.items():          # transformers keeps position_ids out of state dicts
        if comp.startswith("text_encoder"):
            sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
            sds[comp] = sd
    full = keymap.arch_to_single_file("sdxl", {c: half(sd) for c, sd in sds.items()},
                                      layout="sgm", configs=cfgs)
    meta = {"format": "pt", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.title": "convkit demo {}", "modelspec.license": "Apache-2.0",
            "modelspec.description": "convkit's demo model: tools/train_demo.py"}
    save_state_dict(full, out_dir / "base.safetensors",
                    {**meta, "modelspec.title": meta["modelspec.title"].format("base")})
    for name, sd in (("custom", custom["unet"]), ("lightning", light)):
        save_state_dict(half(sd), out_dir / f"{name}_unet.safetensors",
                        {**meta, "modelspec.title": meta["modelspec.title"].format(name)})
    spec = {"arch": "sdxl", "pipeline": "StableDiffusionXLPipeline", "components": cfgs,
            "scheduler": SCHEDULER, "tokenizers": TOKENIZERS, "time_ids": TIME_IDS,
            "size": world.SIZE, "sampling": {
                "base": {"sampler": "euler", "steps": 25, "guidance": 5.0},
                "lightning": {"sampler": "euler-trailing", "steps": 4, "guidance": 0.0}},
            "trained_by": "tools/train_demo.py", "stages": STAGES}
    (out_dir / "demo.json").write_text(json.dumps(spec, indent=1) + "\n")
    log(f"exported to {out_dir}: " + ", ".join(
        f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(out_dir.iterdir())))


STAGE_FNS = {"vae": stage_vae, "base": stage_base, "custom": stage_custom,
             "lightning": stage_lightning, "export": stage_export}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="checkpoint folder (kept between runs)")
    ap.add_argument("--stage", default="all", choices=[*STAGE_FNS, "all"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--minutes", type=float, help="stop (checkpointed) after this long")
    ap.add_argument("--smoke", action="store_true",
                    help="a few steps of every stage, exported into WORK/demo (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        global BANK, DEMO_DIR
        BANK, DEMO_DIR = 512, Path(args.work) / "demo"
        for st in STAGES.values():
            st["steps"] = 4
        STAGES["lightning"].update(teacher_samples=64, teacher_steps=3)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    deadline = time.time() + args.minutes * 60 if args.minutes else None
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = list(STAGE_FNS) if args.stage == "all" else [args.stage]
    try:
        for s in stages:
            ck = load_ckpt(work / s / "ckpt.pt") if s != "export" else None
            if ck and ck.get("done"):
                log(f"{s}: already done")
                continue
            STAGE_FNS[s](work, deadline)
    except Stop:
        log("stopped; checkpoint saved (run again to continue)")


if __name__ == "__main__":
    main()
