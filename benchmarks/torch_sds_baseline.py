"""PyTorch diffusers baseline for the SDS benchmarks (run on the GPU machine; never imported by the package).

The path threestudio / DreamCraft3D run: diffusers UNet2DConditionModel + AutoencoderKL in fp16, eager, SDPA
attention, random weights with the real SD 2.1-base and Zero123 shapes. One SDS step = VAE-encode the rendered
images (gradient to the images, VAE parameters frozen), noise to a random t, UNet forward for the conditional and
unconditional halves in one batch (no grad), grad = w(t) (eps_hat - eps), backward into the images.

    python benchmarks/torch_sds_baseline.py --out torch.json
    python benchmarks/torch_sds_baseline.py --compile_views 1 --out torch.json   # also torch.compile

``--compile_views``: after the eager cases, the same steps with what a careful PyTorch user tries first
(the UNet through ``torch.compile(mode="reduce-overhead")``, i.e. Inductor + CUDA graphs, and the VAE encoder
through ``torch.compile``), keys ``*_compiled_ms`` / ``*_compiled_pipelined_ms``; compilation is not timed.
"""

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from dreamcraft_jax.models.reference_configs import SD21_BASE_UNET, SD_VAE, ZERO123_UNET  # noqa: E402


def _kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def timed(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def timed_pipelined(fn, repeats, warmup=3):
    """ms per call of ``repeats`` calls issued back to back with one synchronisation at the end (the CPU queues
    kernels ahead of the GPU, as in a training loop): the same measure as the JAX side's ``pipelined_ms``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def make_models(unet_cfg, device):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_kwargs(unet_cfg)).to(device, torch.float16).eval().requires_grad_(False)
    vae = AutoencoderKL(**_kwargs(SD_VAE)).to(device, torch.float16).eval().requires_grad_(False)
    unet.set_attn_processor(__import__("diffusers.models.attention_processor", fromlist=["x"]).AttnProcessor2_0())
    return unet, vae


def compiled(unet, vae):
    """(unet, vae) with the UNet compiled with CUDA graphs and the VAE encoder compiled (the BENCHMARKS.md
    torch.compile anchor); shapes stay static (one graph per batch size, no dynamic-shape recompile)."""
    import copy

    torch._dynamo.config.automatic_dynamic_shapes = False
    vae = copy.copy(vae)  # a shallow copy: the eager model keeps its own encoder attribute
    vae.encoder = torch.compile(vae.encoder)
    return torch.compile(unet, mode="reduce-overhead"), vae


def sds_step_fn(unet, vae, n_views, res, context, image_channels_extra=None):
    alphas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device="cuda") ** 2
    alphas_cumprod = torch.cumprod(1 - alphas, 0)
    images = torch.rand(n_views, 3, res, res, device="cuda", dtype=torch.float16, requires_grad=True)

    def step():
        latents = vae.encode(images * 2 - 1).latent_dist.sample() * 0.18215
        t = torch.randint(20, 980, (n_views,), device="cuda")
        noise = torch.randn_like(latents)
        a = alphas_cumprod[t].view(-1, 1, 1, 1).half()
        with torch.no_grad():
            x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
            x_in = torch.cat([x_t, x_t])
            if image_channels_extra is not None:
                x_in = torch.cat([x_in, image_channels_extra.expand(x_in.shape[0], -1, -1, -1)], 1)
            eps = unet(x_in, torch.cat([t, t]), encoder_hidden_states=context).sample
            eps_c, eps_u = eps.chunk(2)
            grad = (1 - a) * (eps_u + 7.5 * (eps_c - eps_u) - noise)
        loss = 0.5 * F.mse_loss(latents.float(), (latents - grad).detach().float(), reduction="sum") / n_views
        loss.backward()
        images.grad = None

    return step


def time_compiled(res, prefix, unet, vae, args, size, ctx_dim, ctx_len, cond=None):
    """Adds ``{prefix}_views{n}_compiled_ms`` (and ``_pipelined_ms``, ``_compile_s``) for ``args.compile_views``."""
    import time

    if not args.compile_views:
        return
    unet_c, vae_c = compiled(unet, vae)
    res["compiled_mode"] = "torch.compile: UNet mode=reduce-overhead (CUDA graphs), VAE encoder default; fp16 + SDPA"
    for n in args.compile_views:
        ctx = torch.randn(2 * n, ctx_len, ctx_dim, device="cuda", dtype=torch.float16)
        step = sds_step_fn(unet_c, vae_c, n, size, ctx, cond)
        t0 = time.perf_counter()
        try:
            for _ in range(3):  # Inductor compiles, then CUDA graphs are recorded on the following calls
                step()
            torch.cuda.synchronize()
        except Exception as e:  # keep the eager numbers: record why compile failed
            res[f"{prefix}_views{n}_compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(res[f"{prefix}_views{n}_compiled_error"], flush=True)
            continue
        res[f"{prefix}_views{n}_compile_s"] = time.perf_counter() - t0
        res[f"{prefix}_views{n}_compiled_ms"] = timed(step, args.repeats)
        res[f"{prefix}_views{n}_compiled_pipelined_ms"] = timed_pipelined(step, args.repeats)
        print(f"{prefix} views {n} compiled: {res[f'{prefix}_views{n}_compiled_ms']:.2f} ms", flush=True)


def unet_flops(unet, x, t, context):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, encoder_hidden_states=context)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile_views", nargs="*", type=int, default=[],
                   help="view counts to also time with torch.compile (UNet with CUDA graphs, VAE encoder)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
           "device": torch.cuda.get_device_name(), "mode": "eager fp16 + SDPA, VAE frozen (grad to images only)"}

    def save():  # after each part: a run cut off by its time limit keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)

    unet, vae = make_models(SD21_BASE_UNET, "cuda")
    for n in (1, 4):
        ctx = torch.randn(2 * n, 77, 1024, device="cuda", dtype=torch.float16)
        step = sds_step_fn(unet, vae, n, 512, ctx)
        res[f"sd_sds_512_views{n}_ms"] = timed(step, args.repeats)
        res[f"sd_sds_512_views{n}_pipelined_ms"] = timed_pipelined(step, args.repeats)
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, 77, 1024, device="cuda", dtype=torch.float16)
    res["sd_unet_fwd_batch2_ms"] = timed(lambda: unet(x, torch.tensor([500, 500], device="cuda"),
                                                      encoder_hidden_states=ctx), args.repeats)
    res["sd_unet_fwd_batch2_flops"] = unet_flops(unet, x, torch.tensor([500, 500], device="cuda"), ctx)
    del unet, vae
    torch.cuda.empty_cache()
    unet, vae = make_models(ZERO123_UNET, "cuda")
    cond = torch.randn(1, 4, 32, 32, device="cuda", dtype=torch.float16)
    for n in (1, 4):
        ctx = torch.randn(2 * n, 1, 768, device="cuda", dtype=torch.float16)
        step = sds_step_fn(unet, vae, n, 256, ctx, cond)
        res[f"zero123_sds_256_views{n}_ms"] = timed(step, args.repeats)
        res[f"zero123_sds_256_views{n}_pipelined_ms"] = timed_pipelined(step, args.repeats)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, args.repeats)
    res["bf16_matmul_8192_tflops"] = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    print(json.dumps(res, indent=2), flush=True)
    save()
    if args.compile_views:  # compiled last: Inductor's compile time does not hold up the eager numbers
        time_compiled(res, "zero123_sds_256", unet, vae, args, 256, 768, 1, cond)
        save()
        del unet, vae
        torch.cuda.empty_cache()
        unet, vae = make_models(SD21_BASE_UNET, "cuda")
        time_compiled(res, "sd_sds_512", unet, vae, args, 512, 1024, 77)
        save()
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
