"""A config's model: parameters, FLOPs and the latency of its inference variants, and its console report."""
from __future__ import annotations

import dataclasses

import torch

from rtda.bench.common import THESIS_SIZE, build_model, model_label, without_pretrained
from rtda.bench.latency import VARIANT_HELP, measure_latency
from rtda.config import Config
from rtda.models.complexity import count_flops, count_parameters
from rtda.utils.env import environment


def benchmark_model(cfg: Config, size: tuple[int, int], device: torch.device, iters: int, warmup: int,
                    amp: str | None = None, compile_deploy: bool = False, source: str = "config",
                    forms: list[str] | None = None) -> dict:
    """Parameters, FLOPs and the latency of `cfg.model`'s forms (default eager and deploy) at `size` on
    `device`: one JSON-able dict."""
    from rtda import models

    env = environment(device)  # the load before this process adds its own
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size: let cuDNN pick its kernels during the warm-up
    model = build_model(without_pretrained(cfg.model), source).to(device).eval()
    small = torch.rand(1, 3, min(size[0], 64), min(size[1], 128), device=device) * 255
    params = count_parameters(model, small)
    deployed = models.deploy(model)
    params["deploy"] = sum(p.numel() for p in deployed.parameters())
    flops = count_flops(model, torch.zeros(1, 3, *size, device=device))  # the course counts a zero image
    if compile_deploy:
        deployed = torch.compile(deployed)
        warmup = max(warmup, 1)  # compilation happens in the first call; never time it
    latency = measure_latency(model, deployed, size, device, iters, warmup, amp, forms)
    return {"config": source, "config_name": cfg.name, "model_label": model_label(cfg.model),
            "model": dataclasses.asdict(cfg.model), "size": list(size), **env,
            "params": params, "flops": flops, "latency": latency,
            "forms": [n for n in latency if n in VARIANT_HELP],
            "deploy_options": {"amp": amp, "compile": compile_deploy}}


def complexity_from_config(model_cfg, size: tuple[int, int] = THESIS_SIZE, source: str = "config") -> dict:
    """Parameters and FLOPs alone (no timing): deterministic, so the tables may compute them anywhere."""
    model = build_model(without_pretrained(model_cfg), source).eval()
    small = torch.rand(1, 3, min(size[0], 64), min(size[1], 128)) * 255
    return {"size": list(size), "params": count_parameters(model, small),
            "flops": count_flops(model, torch.zeros(1, 3, *size))}



def print_model_report(r: dict) -> None:
    p, f, lat = r["params"], r["flops"], r["latency"]
    h, w = r["size"]
    print(f"{r['config']}: {r['model_label']} at {h}x{w}")
    print(f"  torch {r['torch']} on {r['device']} ({r['device_name']}), {r['threads']} threads, "
          f"load average {r['load_avg_1m']}")
    print(f"  params: total {p['total']:,}  trainable {p['trainable']:,}  used at inference {p['inference']:,}  "
          f"deploy form {p['deploy']:,}")
    print(f"  FLOPs (FlopCounterMode): {f['gmacs']:.2f} G MACs = {f['gflops']:.2f} GFLOPs (2 flops per multiply-add)")
    _print_fvcore(f)
    opts = r["deploy_options"]
    for name in r.get("forms", ["eager", "deploy"]):
        s = lat[name]
        extra = ""
        if name == "deploy" and (opts["amp"] or opts["compile"]):
            extra = " (" + ", ".join(filter(None, [opts["amp"] and f"autocast {opts['amp']}",
                                                   opts["compile"] and "torch.compile"])) + ")"
        line = (f"  {name:11s}{extra}: {s['mean_ms']:.1f} ± {s['std_ms']:.1f} ms  (p50 {s['p50_ms']:.1f}, "
                f"p90 {s['p90_ms']:.1f}, p99 {s['p99_ms']:.1f})  {s['fps']:.2f} FPS  "
                f"[course: {s['fps_mean']:.2f} ± {s['fps_std']:.2f} FPS]  over {s['iters']} calls")
        if "vs_deploy" in lat:
            line += f"  {lat['vs_deploy'][name]:.2f}x deploy"
        if name != "eager" and name in lat.get("parity", {}):
            par = lat["parity"][name]
            line += f"  | vs eager: max abs diff {par['max_abs_diff']:.1e}, argmax {100 * par['argmax_agreement']:.3f}%"
        print(line)
    for name, why in lat.get("skipped", {}).items():
        print(f"  {name:11s}: skipped, {why}")
    if "speedup" in lat:
        print(f"  deploy speed-up: {lat['speedup']:.2f}x")
    if len(r.get("forms", [])) > 2 and "vs_deploy" in lat:
        print(f"  fastest: {lat['fastest']}, {lat['vs_deploy'][lat['fastest']]:.2f}x the deploy form")



def _print_fvcore(f: dict) -> None:
    """The fvcore cross-check line(s), or one line saying how to get it."""
    fv = f.get("fvcore")
    if fv is None:
        print(f"  {f.get('fvcore_note', 'no fvcore cross-check')}")
        return
    print(f"  fvcore cross-check: {fv['gmacs']:.2f} G MACs")
    if fv["skipped_ops"]:
        print("  not counted by fvcore: " + ", ".join(f"{op} x{n}" for op, n in sorted(fv["skipped_ops"].items())))
