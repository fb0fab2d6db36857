"""Complexity, speed and training cost of a config's model, and the thesis tables from finished runs.

    python benchmark.py --config configs/cityscapes_bisenet.yaml [--size 512x1024] [--device cpu|cuda]
                        [--iters N] [--amp fp16|bf16] [--compile] [--json]
                        [--forms eager,deploy,compile,onnxruntime | all]   # + fp16,bf16,cudagraph,tensorrt on CUDA
    python benchmark.py --config configs/gta5_bisenet_adv.yaml --train-step [--size 360x640] [--batch-size 2]
    python benchmark.py --runs runs/ --table all [--format md|csv] [--plot miou_fps.png]
    python benchmark.py --gpu-check [--out runs/gpu_check.json]      # CUDA only; `make gpu-check`
    python benchmark.py --pretrain-synthetic runs/synthetic_pretrained/resnet18.pt   # the synthetic table's backbone

Conventions (docs/benchmarks.md has the measured numbers):
- FLOPs are fvcore's count, where one fused multiply-add is one flop, so they are multiply-accumulates
  (MACs); papers that count 2 ops per MAC report twice as much. Ops fvcore cannot count are listed.
- Latency is batch 1 in eval mode, the course protocol (random image, mean/std of ms and of per-call FPS)
  plus a warm-up and, on CUDA, a synchronisation after every timed call: batch-1 latency is the time until
  the result exists, and without the sync one would time kernel launches.
- The eager model (eval, no_grad, NCHW float32) and its deploy form (`models.deploy`: no aux heads, BN
  folded, channels_last; timed under inference_mode, optionally autocast / torch.compile) are timed in
  alternating rounds of the same run, so a change in machine load hits both alike. `--forms` adds more forms
  (FORM_HELP) to the same rounds: torch.compile, ONNX Runtime (the file `models.export` writes), and on CUDA
  autocast, CUDA graphs and ONNX Runtime's TensorRT provider; each form's logits on the timed image are
  compared with eager's (max abs difference, argmax agreement) before timing.
- Tables read `metrics.json` from run folders; latency is a property of the machine, so it only comes from a
  `benchmark.json` (this script's `--json` output) left in a run folder, never measured while tabulating.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtda.config import AUGMENTATIONS, NOT_RESULT_KEYS, Config, ConfigError, flatten, from_dict, load_config

THESIS_SIZE = (512, 1024)  # (H, W): the size of the course's FLOPs and latency numbers
DEFAULT_ITERS = {"cpu": 20, "cuda": 1000}  # 1000 is the course protocol; a CPU call takes 0.1-5 s
DEFAULT_WARMUP = {"cpu": 3, "cuda": 50}
TIMING_ROUNDS = 5  # eager and deploy alternate this many times


class BenchmarkError(ValueError):
    """A bad command-line value, config or run folder; the message is one line naming it."""


def parse_size(text: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024), height first."""
    h, sep, w = text.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise BenchmarkError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 512x1024")
    return int(h), int(w)


def environment(device: torch.device) -> dict:
    """What a timing depends on: versions, the device's name, threads and the machine's load; on the CPU also
    the kernel set torch dispatches to (AVX2, AVX512, ...), which changes both speed and rounding."""
    env = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env.update(device_name=_cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    return {**env, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------ complexity
def count_parameters(model: nn.Module, image: torch.Tensor) -> dict:
    """Total and trainable parameters, and those the eval forward of `image` actually uses.

    `inference` leaves out what only training calls (aux heads) and what nothing calls (an unused
    torchvision fc); it is found by hooking every module that owns parameters during one eval forward.
    """
    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda module, args, out: called.add(id(module))) for m in owners]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(image)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    used = {id(p): p for m in owners if id(m) in called for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "inference": sum(p.numel() for p in used.values())}


def count_flops(model: nn.Module, image: torch.Tensor) -> dict:
    """fvcore's count for one eval forward of `image`: MACs in total and by operator, and the skipped ops."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # fvcore scripts and traces with torch.jit, which torch now marks as deprecated: fvcore's business.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            from fvcore.nn import FlopCountAnalysis

            analysis = (FlopCountAnalysis(model, image).unsupported_ops_warnings(False)
                        .uncalled_modules_warnings(False).tracer_warnings("none"))
            total = analysis.total()
            by_operator = dict(analysis.by_operator())
            skipped = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    return {"macs": int(total), "gmacs": round(total / 1e9, 3), "by_operator": by_operator,
            "skipped_ops": skipped, "convention": "fvcore: one fused multiply-add = one flop (MACs)"}


# ------------------------------------------------------------------------------------------ latency
def time_calls(fn, image: torch.Tensor, iters: int, warmup: int = 0) -> list[float]:
    """Seconds per call of `fn(image)`, each call timed on its own (batch-1 latency, not throughput)."""
    cuda = isinstance(image, torch.Tensor) and image.device.type == "cuda"
    for _ in range(warmup):
        fn(image)
    if cuda:
        torch.cuda.synchronize(image.device)
    times = [0.0] * iters
    for i in range(iters):
        start = time.perf_counter()
        fn(image)
        if cuda:  # the result exists only once the device is done; this sync is the measurement
            torch.cuda.synchronize(image.device)
        times[i] = time.perf_counter() - start
    return times


def latency_stats(times: list[float]) -> dict:
    """Mean/std/percentiles in ms, FPS as 1 / mean latency, and the course's mean/std of per-call FPS."""
    t = np.asarray(times, dtype=np.float64)
    if t.size == 0:
        raise BenchmarkError("latency needs at least one timed call (--iters >= 1)")
    ms, fps = t * 1e3, 1.0 / t
    ddof = 1 if t.size > 1 else 0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"iters": int(t.size), "mean_ms": float(ms.mean()), "std_ms": float(ms.std(ddof=ddof)),
            "min_ms": float(ms.min()), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "fps": float(1e3 / ms.mean()), "fps_mean": float(fps.mean()), "fps_std": float(fps.std(ddof=ddof))}


def autocast_context(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])


# The forms of one model that `--forms` can time. Every form gets the same random image and is compared with
# the eager model's output (max abs difference of the logits, argmax agreement).
FORM_HELP = {
    "eager": "the model as trained (eval, no_grad, NCHW float32): the reference",
    "deploy": "models.deploy: no aux heads, BN folded, channels_last, inference_mode (+ --amp / --compile)",
    "compile": "torch.compile of the deploy form",
    "onnxruntime": "the deploy form exported by models.export (fixed shape), ONNX Runtime (CPU, or CUDA provider)",
    "fp16": "the deploy form under float16 autocast (CUDA)",
    "bf16": "the deploy form under bfloat16 autocast (CUDA)",
    "cudagraph": "the deploy form captured once in a CUDA graph and replayed (CUDA)",
    "tensorrt": "the ONNX file in ONNX Runtime's TensorRT provider, fp32 (CUDA, when the provider is present)",
    "tensorrt_fp16": "the same with TensorRT's fp16 kernels allowed",
}
CPU_FORMS = ("eager", "deploy", "compile", "onnxruntime")
CUDA_FORMS = CPU_FORMS + ("fp16", "bf16", "cudagraph", "tensorrt", "tensorrt_fp16")


@dataclass
class Form:
    """One way to run the model: `fn(x)` on its own prepared input `x`, under `grad_mode()` and `cast()`."""

    fn: object
    x: object
    grad_mode: object = torch.inference_mode
    cast: object = contextlib.nullcontext
    to_tensor: object = None  # output -> torch logits on the CPU, for the parity check (default: .float().cpu())

    def output(self) -> torch.Tensor:
        with self.grad_mode(), self.cast():
            out = self.fn(self.x)
        return self.to_tensor(out) if self.to_tensor else out.float().cpu()


def parse_forms(text: str | None, device: torch.device) -> list[str]:
    """`--forms eager,deploy,onnxruntime` (or `all`) -> the list, eager first; unknown or wrong-device names fail."""
    available = CUDA_FORMS if device.type == "cuda" else CPU_FORMS
    if not text:
        return ["eager", "deploy"]
    names = list(available) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in CUDA_FORMS:
            raise BenchmarkError(f"--forms {text!r}: unknown form {name!r}; expected some of "
                                 f"{', '.join(CUDA_FORMS)} (or all)")
        if name not in available:
            raise BenchmarkError(f"--forms {text!r}: {name!r} is a CUDA form; on CPU the forms are "
                                 f"{', '.join(CPU_FORMS)}")
    return ["eager"] + [n for n in dict.fromkeys(names) if n != "eager"]


def build_forms(model: nn.Module, deployed: nn.Module | None, names: list[str], image: torch.Tensor,
                amp: str | None = None, workdir: str | Path | None = None,
                compile_backend: str = "inductor") -> tuple[dict, dict]:
    """Forms `names` of `model` for `image`: ({name: Form}, {name: reason it was skipped}).

    `deployed` is the deploy form (with --amp / --compile applied to the `deploy` entry only); the other forms
    start from it. `workdir` holds the ONNX file of the ONNX Runtime forms.
    """
    from rtda import models

    device = image.device
    model.eval()
    plain = getattr(deployed, "_orig_mod", deployed)  # under --compile, the deploy form before compilation
    if not hasattr(plain, "graph") and any(n not in ("eager", "deploy") for n in names):
        plain = models.deploy(model)
    last = image.contiguous(memory_format=torch.channels_last)
    forms, skipped = {}, {}
    for name in names:
        if name == "eager":
            forms[name] = Form(model, image, torch.no_grad)
        elif name == "deploy":
            forms[name] = Form(deployed if deployed is not None else models.deploy(model), last,
                               cast=lambda: autocast_context(device, amp))
        elif name == "compile":
            forms[name] = Form(torch.compile(plain.graph(), backend=compile_backend), last)
        elif name in ("fp16", "bf16"):
            forms[name] = Form(plain, last, cast=lambda dtype=name: autocast_context(device, dtype))
        elif name == "cudagraph":
            forms[name] = Form(*_cuda_graph(plain.graph(), last, amp))
        elif name in ("onnxruntime", "tensorrt", "tensorrt_fp16"):
            form = _onnxruntime_form(plain, image, name, Path(workdir or "."))
            if isinstance(form, str):
                skipped[name] = form
            else:
                forms[name] = form
    return forms, skipped


def _cuda_graph(graph_module: nn.Module, image: torch.Tensor, amp: str | None):
    """A CUDA graph of `graph_module` on a static copy of `image`: (replay function, its static input)."""
    static_in = image.clone(memory_format=torch.channels_last)
    stream = torch.cuda.Stream(image.device)
    stream.wait_stream(torch.cuda.current_stream(image.device))
    with torch.cuda.stream(stream), torch.inference_mode(), autocast_context(image.device, amp):
        for _ in range(3):  # cuDNN picks its kernels before the capture
            graph_module(static_in)
    torch.cuda.current_stream(image.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), autocast_context(image.device, amp):
        static_out = graph_module(static_in)

    def replay(x):
        if x is not static_in:
            static_in.copy_(x)
        graph.replay()
        return static_out

    return replay, static_in


def _onnxruntime_form(deployed: nn.Module, image: torch.Tensor, name: str, workdir: Path):
    """An ONNX Runtime form of the deploy form, exported at the image's shape; a string says why it is skipped."""
    from rtda.models.export import ExportError, OnnxModel, export_onnx, require

    try:
        ort = require("onnxruntime", f"--forms {name}")
        require("onnx", f"--forms {name}")
    except ExportError as exc:
        raise BenchmarkError(str(exc)) from None
    cuda = image.device.type == "cuda"
    available = ort.get_available_providers()
    if name.startswith("tensorrt"):
        if "TensorrtExecutionProvider" not in available:
            return f"this onnxruntime has no TensorrtExecutionProvider (it has {', '.join(available)})"
        cache = workdir / "trt_cache"
        cache.mkdir(parents=True, exist_ok=True)
        providers = [("TensorrtExecutionProvider", {"device_id": image.device.index or 0,
                                                    "trt_fp16_enable": name == "tensorrt_fp16",
                                                    "trt_engine_cache_enable": True,
                                                    "trt_engine_cache_path": str(cache)}),
                     "CUDAExecutionProvider", "CPUExecutionProvider"]
    elif cuda:
        if "CUDAExecutionProvider" not in available:
            return f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)}): pip install onnxruntime-gpu"
        providers = [("CUDAExecutionProvider", {"device_id": image.device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    path = workdir / "model.onnx"
    if not path.is_file():
        cpu_copy = copy.deepcopy(deployed).cpu()
        try:
            export_onnx(cpu_copy, path, tuple(image.shape[-2:]))
        except ExportError as exc:
            raise BenchmarkError(f"--forms {name}: {exc}") from None
    try:
        onnx_model = OnnxModel(path, threads=torch.get_num_threads(), providers=providers)
    except ExportError as exc:
        return str(exc)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if onnx_model.providers[0] != wanted:  # ONNX Runtime falls back quietly when a provider cannot start
        return f"ONNX Runtime could not start {wanted} here and fell back to {onnx_model.providers[0]}"
    if not cuda:
        x = image.float().cpu().contiguous().numpy()
        return Form(onnx_model.run_numpy, x, to_tensor=lambda out: torch.from_numpy(out))
    # CUDA: bind the input and a preallocated output on the device (no host copies in the timed call)
    session = onnx_model.session
    x = image.float().contiguous()
    out = torch.empty(x.shape[0], onnx_model.num_classes, *x.shape[-2:], device=image.device)
    binding = session.io_binding()
    binding.bind_input(onnx_model.input_name, "cuda", image.device.index or 0, np.float32, list(x.shape), x.data_ptr())
    binding.bind_output(onnx_model.output_name, "cuda", image.device.index or 0, np.float32, list(out.shape),
                        out.data_ptr())

    def run(_):
        session.run_with_iobinding(binding)
        return out

    return Form(run, x)


def measure_latency(model: nn.Module, deployed: nn.Module | None, size: tuple[int, int], device: torch.device,
                    iters: int, warmup: int, amp: str | None = None, forms: list[str] | None = None,
                    compile_backend: str = "inductor") -> dict:
    """Latency of the eager model and its other forms (default: the deploy form, if given), timed in alternating
    rounds, with each form's parity to eager. Returns {form: latency_stats, ..., "speedup": eager / deploy,
    "vs_deploy": {form: deploy / form}, "parity": {form: {max_abs_diff, argmax_agreement}}, "skipped": {...}}."""
    import tempfile

    image = torch.rand(1, 3, *size, device=device) * 255  # the course protocol's random image
    names = forms or (["eager", "deploy"] if deployed is not None else ["eager"])
    with tempfile.TemporaryDirectory(prefix="benchmark-forms-") as workdir:
        built, skipped = build_forms(model, deployed, names, image, amp, workdir, compile_backend)
        reference = built["eager"].output()
        parity = {}
        for name, form in built.items():  # the first call of each form: compiles, plans, checks
            out = form.output()
            parity[name] = {"max_abs_diff": float((out - reference).abs().max()),
                            "argmax_agreement": float((out.argmax(1) == reference.argmax(1)).double().mean())}
        timed = {name: (f.fn, f.x, f.grad_mode, f.cast) for name, f in built.items()}
        result = time_forms(timed, iters, warmup)
    if "deploy" in result:
        result["speedup"] = result["eager"]["mean_ms"] / result["deploy"]["mean_ms"]
        result["vs_deploy"] = {n: result["deploy"]["mean_ms"] / result[n]["mean_ms"] for n in built}
    result["parity"] = parity
    result["fastest"] = min(built, key=lambda n: result[n]["mean_ms"])
    if skipped:
        result["skipped"] = skipped
    return result


def time_forms(forms: dict, iters: int, warmup: int) -> dict:
    """`forms`: name -> (callable, input, grad-mode context, autocast context factory). The forms take turns
    in TIMING_ROUNDS rounds of about iters / TIMING_ROUNDS calls each; returns name -> latency_stats."""
    rounds = max(1, min(TIMING_ROUNDS, iters))
    chunks = [iters // rounds + (r < iters % rounds) for r in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in forms}
    for r, chunk in enumerate(chunks):
        for name, (net, x, grad_mode, cast) in forms.items():
            with grad_mode(), cast():
                times[name] += time_calls(net, x, chunk, warmup if r == 0 else 0)
    return {name: latency_stats(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------ models
def build_model(model_cfg, source: str = "config"):
    """`models.build_model`, with an unknown model or a missing models package as one clear error."""
    try:
        from rtda import models
    except ImportError as exc:
        raise BenchmarkError(f"cannot import the models package ({exc})") from None
    try:
        return models.build_model(model_cfg)
    except (KeyError, ValueError, ConfigError) as exc:
        name = getattr(model_cfg, "name", None) or (model_cfg.get("name") if isinstance(model_cfg, dict) else None)
        raise BenchmarkError(f"{source}: cannot build model {name!r}: {exc}") from None


def _without_pretrained(model_cfg):
    # Complexity and speed do not depend on the weights, and nothing here should try to load them.
    return dataclasses.replace(model_cfg, pretrained="none")


def benchmark_model(cfg: Config, size: tuple[int, int], device: torch.device, iters: int, warmup: int,
                    amp: str | None = None, compile_deploy: bool = False, source: str = "config",
                    forms: list[str] | None = None) -> dict:
    """Parameters, FLOPs and the latency of `cfg.model`'s forms (default eager and deploy) at `size` on
    `device`: one JSON-able dict."""
    from rtda import models

    env = environment(device)  # the load before this process adds its own
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size: let cuDNN pick its kernels during the warm-up
    model = build_model(_without_pretrained(cfg.model), source).to(device).eval()
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
            "forms": [n for n in latency if n in FORM_HELP],
            "deploy_options": {"amp": amp, "compile": compile_deploy}}


def complexity_from_config(model_cfg, size: tuple[int, int] = THESIS_SIZE, source: str = "config") -> dict:
    """Parameters and FLOPs alone (no timing): deterministic, so the tables may compute them anywhere."""
    model = build_model(_without_pretrained(model_cfg), source).eval()
    small = torch.rand(1, 3, min(size[0], 64), min(size[1], 128)) * 255
    return {"size": list(size), "params": count_parameters(model, small),
            "flops": count_flops(model, torch.zeros(1, 3, *size))}


# ------------------------------------------------------------------------------------------ training cost
def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the caching allocator's peak since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def random_batch(size_hw: tuple[int, int], batch: int, num_classes: int, device: torch.device,
                 labelled: bool, generator: torch.Generator) -> dict:
    """A batch in the loaders' format (raw uint8 images, int64 train ids) of random content."""
    image = torch.randint(0, 256, (batch, 3, *size_hw), dtype=torch.uint8, generator=generator)
    out = {"image": image.to(device), "name": [f"random_{i}" for i in range(batch)]}
    if labelled:
        out["label"] = torch.randint(0, num_classes, (batch, *size_hw), generator=generator).to(device)
    return out


def benchmark_train_step(cfg: Config, device: torch.device, iters: int, warmup: int,
                         size: tuple[int, int] | None = None, batch_size: int | None = None,
                         source: str = "config") -> dict:
    """Time full training steps of `cfg` (its strategy included) on random batches of the protocol size.

    Built from train.py's pieces (optimiser, poly schedule, AMP scaler, StepContext) and adapt.build_strategy,
    so what is timed is what training runs. `size` (H, W) replaces both the source and target sizes.
    """
    from rtda import engine as train
    from rtda.adapt import build_strategy
    from rtda.utils.amp import autocast_dtype
    from rtda.utils.seed import seed_everything

    if size is not None:  # strategies read the sizes too (DACS checks that source and target agree)
        cfg = copy.deepcopy(cfg)
        cfg.data.source.size = cfg.data.target.size = [size[1], size[0]]
        if cfg.adapt.crop is not None:  # a recipe's crop cannot be larger than the images
            cfg.adapt.crop = [min(cfg.adapt.crop[0], size[1]), min(cfg.adapt.crop[1], size[0])]
    env = environment(device)  # the load before this process adds its own
    t = cfg.train
    seed_everything(cfg.seed, t.deterministic)  # as train.py does (it also sets cuDNN autotuning)
    batch = batch_size or t.batch_size
    src_hw = (cfg.data.source.size[1], cfg.data.source.size[0])  # config sizes are [W, H]
    tgt_hw = (cfg.data.target.size[1], cfg.data.target.size[0])
    model = build_model(_without_pretrained(cfg.model), source).to(device).train()
    try:
        strategy = build_strategy(cfg, model).to(device)
    except ValueError as exc:
        raise BenchmarkError(f"{source}: {exc}") from None
    optimizer = train.build_optimizer(model, cfg)
    total = warmup + iters
    lr_factor = train.poly_schedule(total, t.poly_power, t.warmup_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    amp_dtype = autocast_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ctx = train.StepContext(total, device, amp_dtype, scaler, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    src = random_batch(src_hw, batch, cfg.model.num_classes, device, True, gen)
    tgt = (random_batch(tgt_hw, batch, cfg.model.num_classes, device, cfg.data.target.pseudo_labels is not None, gen)
           if strategy.needs_target else None)  # pseudo-labelled target (FDA's SSL round): labels too

    def steps(first: int, count: int) -> None:
        # train.py's own step (no host sync: losses stay on the device).
        for it in range(first, first + count):
            ctx.iteration = it
            train.train_step(model, strategy, optimizer, scheduler, src, tgt, ctx)

    steps(0, warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    steps(warmup, iters)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / iters
    return {"config": source, "config_name": cfg.name, "model_label": model_label(cfg.model),
            "model": dataclasses.asdict(cfg.model), "adapt": cfg.adapt.name, "batch_size": batch,
            "source_size": list(src_hw), "target_size": list(tgt_hw) if tgt is not None else None,
            "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none", **env,
            "iters": iters, "warmup": warmup, "step_s": step_s, "images_per_s": batch / step_s,
            "peak_memory_bytes": peak_memory_bytes(device),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"}


# ------------------------------------------------------------------------------------------ runs -> tables
TABLES = ("cityscapes", "domain-shift", "augmentations", "adaptation")
MODEL_NAMES = {"deeplabv2": "DeepLabV2", "bisenet": "BiSeNet"}
BACKBONE_NAMES = {"resnet18": "R18", "resnet101": "R101"}


@dataclass
class Run:
    path: Path
    metrics: dict
    cfg: Config
    benchmark: dict | None  # RUN/benchmark.json, when one was left there
    resume_changes: list[dict] = field(default_factory=list)  # RUN/resume_log.jsonl: changes applied on resume

    @property
    def synthetic(self) -> bool:
        names = {self.cfg.data.source.name, self.cfg.data.val.name}
        return bool(self.metrics.get("synthetic")) or "synthetic" in names


@dataclass
class Stat:
    """A number over seeds: mean, sample std, count (None when no run has it)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values) -> Stat:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return cls(None, None, 0)
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        return cls(float(np.mean(vals)), std, len(vals))


@dataclass
class Table:
    key: str  # one of TABLES
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)  # cells: str, int, float, Stat or None
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)


def find_runs(roots: list[str | Path]) -> tuple[list[Run], list[str]]:
    """Every run folder under `roots` (a folder holding metrics.json or config.yaml), and one line per problem."""
    runs, problems = [], []
    for root in map(Path, roots):
        if not root.is_dir():
            problems.append(f"{root}: not a directory")
            continue
        folders = {p.parent for name in ("metrics.json", "config.yaml") for p in root.rglob(name)}
        if not folders:
            problems.append(f"{root}: no run folders (folders with metrics.json) found")
        for folder in sorted(folders):
            try:
                runs.append(load_run(folder))
            except BenchmarkError as exc:
                problems.append(str(exc))
    return runs, problems


def load_run(folder: Path) -> Run:
    path = folder / "metrics.json"
    if not path.is_file():
        raise BenchmarkError(f"{folder}: no metrics.json (unfinished run?), skipped")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"{path}: not readable JSON ({exc}), skipped") from None
    if not isinstance(metrics, dict):
        raise BenchmarkError(f"{path}: expected a JSON object, skipped")
    for keys in (("config",), ("classes",), ("final", "mIoU"), ("final", "IoU")):
        node = metrics
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise BenchmarkError(f"{path}: missing key `{'.'.join(keys)}` (schema: docs/architecture.md), skipped")
            node = node[k]
    try:
        cfg = from_dict(metrics["config"], source=f"{path}: config")
    except ConfigError as exc:
        raise BenchmarkError(f"{exc}, skipped") from None
    bench = None
    bench_path = folder / "benchmark.json"
    if bench_path.is_file():
        try:
            bench = json.loads(bench_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"{bench_path}: not readable JSON ({exc}); delete or regenerate it") from None
    changes = []
    log_path = folder / "resume_log.jsonl"
    if log_path.is_file():
        try:
            changes = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as exc:
            raise BenchmarkError(f"{log_path}: not readable JSON lines ({exc}), skipped") from None
    return Run(folder, metrics, cfg, bench, changes)


def _resume_notes(groups: list[list[Run]]) -> list[str]:
    """One note per run whose recipe changed on a resume (`--apply-changes`): its row is not one recipe."""
    notes = []
    for run in (r for g in groups for r in g if r.resume_changes):
        applied = "; ".join(f"iteration {e['iteration']}: " + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}"
                                                                       for k, v in e["changes"].items())
                            for e in run.resume_changes)
        notes.append(f"{run.path} was resumed with changes ({applied})")
    return notes


def source_domain(cfg: Config) -> str:
    """What the model was trained on: `cityscapes` or `gta5` (a synthetic domain counts as the one it mimics)."""
    src = cfg.data.source
    if src.name == "synthetic":
        return "cityscapes" if src.domain == "target" else "gta5"
    return src.name


def augment_label(cfg: Config) -> str:
    on = [f"{name} {getattr(cfg.data.augment, name):g}" for name in AUGMENTATIONS
          if getattr(cfg.data.augment, name) > 0]
    return " + ".join(on) or "none"


def method_label(cfg: Config) -> str:
    from rtda.adapt import STRATEGIES
    return STRATEGIES[cfg.adapt.name].label(cfg.adapt)


def model_label(model_cfg) -> str:
    name = MODEL_NAMES.get(model_cfg.name, model_cfg.name)
    return f"{name}-{BACKBONE_NAMES.get(model_cfg.backbone, model_cfg.backbone)}"


def tables_of(run: Run) -> list[str]:
    """The tables a run belongs in, from its config (never from its folder name)."""
    domain, adapt = source_domain(run.cfg), run.cfg.adapt.name
    augmented = augment_label(run.cfg) != "none"
    if domain == "cityscapes":
        return ["cityscapes"] if adapt == "none" else []
    if adapt != "none":
        return ["adaptation"]
    # The un-augmented source-only run is table 3 and the baseline row of table 4.
    return ["augmentations"] if augmented else ["domain-shift", "augmentations"]


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs of the same config (up to the seed and bookkeeping keys) and data kind, in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        flat = flatten(dataclasses.asdict(run.cfg))
        key = json.dumps({k: v for k, v in flat.items() if k not in NOT_RESULT_KEYS} | {"_synthetic": run.synthetic},
                         sort_keys=True)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _distinguish(labels: list[str], groups: list[list[Run]]) -> list[str]:
    """A suffix naming the differing config keys for rows that would otherwise look the same ("" if unique)."""
    suffixes = [""] * len(labels)
    for label in set(labels):
        same = [i for i, lab in enumerate(labels) if lab == label]
        if len(same) < 2:
            continue
        flats = [flatten(dataclasses.asdict(groups[i][0].cfg)) for i in same]
        differ = [k for k in flats[0] if k not in NOT_RESULT_KEYS and len({json.dumps(f.get(k)) for f in flats}) > 1]
        for i, flat in zip(same, flats):
            suffixes[i] = " [" + ", ".join(f"{k.rsplit('.', 1)[-1]}={flat[k]}" for k in differ[:3]) + "]"
    return suffixes


def _metric(run: Run, which: str) -> dict:
    return run.metrics.get(which) or run.metrics["final"]


def benchmark_json_for(model_cfg, runs: list[Run]) -> dict | None:
    """The benchmark.json of any run whose model section equals `model_cfg` (weights aside): speed is a
    property of the model and the machine, not of how the weights were trained."""
    model = dataclasses.asdict(_without_pretrained(model_cfg))
    return next((r.benchmark for r in runs
                 if r.benchmark and r.benchmark.get("model", {}) | {"pretrained": "none"} == model), None)


def complexity_for(group: list[Run], all_runs: list[Run], cache: dict, problems: list[str]) -> dict | None:
    """Params/FLOPs/latency for a row: a benchmark.json of a run with the same model, else params and
    FLOPs computed from the model config at the thesis size (latency then stays empty)."""
    found = benchmark_json_for(group[0].cfg.model, group + all_runs)
    if found is not None:
        return found
    key = json.dumps(dataclasses.asdict(_without_pretrained(group[0].cfg.model)), sort_keys=True)
    if key not in cache:
        try:
            cache[key] = complexity_from_config(group[0].cfg.model, source=str(group[0].path / "metrics.json"))
        except BenchmarkError as exc:
            problems.append(f"{exc}; params and FLOPs left empty")
            cache[key] = None
    return cache[key]


def build_tables(runs: list[Run], which: str = "all", metric: str = "final",
                 problems: list[str] | None = None) -> list[Table]:
    """The thesis tables (1-5) over `runs`, real and synthetic data in separate tables."""
    problems = problems if problems is not None else []
    wanted = TABLES if which == "all" else (which,)
    classes = next((r.metrics["classes"] for r in runs), [])
    usable = []
    for run in runs:
        if run.metrics["classes"] != classes:
            problems.append(f"{run.path}: classes differ from the other runs' ({len(run.metrics['classes'])} vs "
                            f"{len(classes)}), skipped")
        else:
            usable.append(run)
    cache: dict = {}
    tables = []
    for synthetic in (False, True):
        kind_runs = [r for r in usable if r.synthetic == synthetic]
        for key in wanted:
            groups = group_runs([r for r in kind_runs if key in tables_of(r)])
            if not groups:
                continue
            if key == "cityscapes":
                for model_name, number in (("deeplabv2", 1), ("bisenet", 2)):
                    model_groups = [g for g in groups if g[0].cfg.model.name == model_name]
                    if model_groups:
                        tables.append(_complexity_table(key, number, model_name, model_groups, usable, cache,
                                                        metric, synthetic, problems))
                        tables[-1].notes += _resume_notes(model_groups)
            else:
                tables.append(_class_table(key, groups, classes, metric, synthetic))
                tables[-1].notes += _resume_notes(groups)
    return tables


def _data_note(synthetic: bool) -> str:
    return " — SYNTHETIC data, not comparable with real-data numbers" if synthetic else ""


def _complexity_table(key, number, model_name, groups, all_runs, cache, metric, synthetic, problems) -> Table:
    table = Table(key, f"Table {number}: {MODEL_NAMES[model_name]} on Cityscapes{_data_note(synthetic)}",
                  ["Model", "Seeds", "mIoU", "Latency (ms)", "FPS", "FLOPs (G MACs)", "Params (M)", "Input"],
                  synthetic=synthetic)
    labels = [model_label(g[0].cfg.model) for g in groups]
    labels = [label + suffix for label, suffix in zip(labels, _distinguish(labels, groups))]
    devices = set()
    for label, group in zip(labels, groups):
        info = complexity_for(group, all_runs, cache, problems) or {}
        eager = info.get("latency", {}).get("eager")
        if eager:
            devices.add(f"{info.get('device_name')} ({info.get('threads')} threads, torch {info.get('torch')})")
        params = info.get("params", {}).get("inference")
        size = info.get("size")
        table.rows.append([label, len(group), Stat.of(_metric(r, metric)["mIoU"] for r in group),
                           eager["mean_ms"] if eager else None, eager["fps"] if eager else None,
                           info.get("flops", {}).get("gmacs"), params / 1e6 if params else None,
                           f"{size[0]}x{size[1]}" if size else None])
    table.notes.append("Latency: batch 1, eager model, from benchmark.json on " + "; ".join(sorted(devices))
                       if devices else "Latency: no benchmark.json in these runs (see docs/benchmarks.md)")
    return table


_CLASS_TABLE_TITLES = {
    "domain-shift": "Table 3: GTA5 → Cityscapes, source only",
    "augmentations": "Table 4: GTA5 → Cityscapes with augmentations",
    "adaptation": "Table 5: GTA5 → Cityscapes, domain adaptation",
}


def _class_table(key, groups, classes, metric, synthetic) -> Table:
    first = {"domain-shift": ["Model"], "augmentations": ["Model", "Augmentation"],
             "adaptation": ["Model", "Method", "Augmentation"]}[key]
    table = Table(key, _CLASS_TABLE_TITLES[key] + _data_note(synthetic), first + ["Seeds", "mIoU"] + list(classes),
                  synthetic=synthetic)
    if key == "augmentations":  # the baseline first
        groups = sorted(groups, key=lambda g: augment_label(g[0].cfg) != "none")
    names = [[model_label(g[0].cfg.model), method_label(g[0].cfg), augment_label(g[0].cfg)] for g in groups]
    names = [{"domain-shift": n[:1], "augmentations": [n[0], n[2]], "adaptation": n}[key] for n in names]
    suffixes = _distinguish([" | ".join(n) for n in names], groups)
    for name, suffix, group in zip(names, suffixes, groups):
        results = [_metric(r, metric) for r in group]
        table.rows.append([name[0] + suffix] + name[1:] + [len(group), Stat.of(m["mIoU"] for m in results)]
                          + [Stat.of(m["IoU"].get(c) for m in results) for c in classes])
    table.notes.append(f"IoU in %, `{metric}` metrics; mean ± sample std over seeds; — = class never present")
    return table


def _cell_text(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, Stat):
        if value.mean is None:
            return "—"
        return f"{value.mean:.1f} ± {value.std:.1f}" if value.std is not None else f"{value.mean:.1f}"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_markdown(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out += [f"### {t.title}", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
        out += ["| " + " | ".join(_cell_text(c) for c in row) + " |" for row in t.rows]
        out += [""] + [f"{note}." for note in t.notes] + [""]
    return "\n".join(out)


def format_csv(tables: list[Table]) -> str:
    """One block per table (blank line between): `table`, `data` columns, then a mean and a std column per Stat."""
    buf = io.StringIO()
    for i, t in enumerate(tables):
        if i:
            buf.write("\n")
        writer = csv.writer(buf, lineterminator="\n")
        header, stat_cols = ["table", "data"], set()
        for j, name in enumerate(t.columns):
            if any(isinstance(row[j], Stat) for row in t.rows):
                header += [name, f"{name} std"]
                stat_cols.add(j)
            else:
                header.append(name)
        writer.writerow(header)
        for row in t.rows:
            cells = [t.key, "synthetic" if t.synthetic else "real"]
            for j, value in enumerate(row):
                if j in stat_cols:
                    cells += [_csv_number(value.mean), _csv_number(value.std)]
                else:
                    cells.append(_csv_number(value) if isinstance(value, float) else ("" if value is None else value))
            writer.writerow(cells)
    return buf.getvalue()


def _csv_number(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}" if abs(x) < 1 else f"{x:.2f}"


# ------------------------------------------------------------------------------------------ plot
def plot_miou_fps(runs: list[Run], path: str | Path, metric: str = "final", problems: list[str] | None = None,
                  form: str = "eager") -> int:
    """mIoU against FPS, one labelled marker per config (mean over seeds); real and synthetic data in
    separate panels. FPS comes from benchmark.json (any run with the same model): its `form` entry (eager,
    deploy, onnxruntime, ... or `fastest`: the fastest form that file timed), named in each marker's label
    and on the axis. Returns the markers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = problems if problems is not None else []
    drawn, labels, devices = [], [], set()
    for group in group_runs(runs):
        cfg = group[0].cfg
        bench = benchmark_json_for(cfg.model, group + runs)
        latency = (bench or {}).get("latency", {})
        used = latency.get("fastest", "eager") if form == "fastest" else form
        timed = latency.get(used)
        if not isinstance(timed, dict) or "fps" not in timed:
            why = "no benchmark.json" if bench is None else f"its benchmark.json has no {used!r} form (rerun " \
                  f"benchmark.py with --forms {used})"
            problems.append(f"{group[0].path}: not plotted, {why} for model {model_label(cfg.model)}")
            continue
        devices.add(bench.get("device_name", "?"))
        label = model_label(cfg.model)
        if source_domain(cfg) == "gta5":
            label += f" · {method_label(cfg)}" + (f" · {augment_label(cfg)}" if augment_label(cfg) != "none" else "")
        else:
            label += " · trained on Cityscapes"
        drawn.append((group, timed["fps"]))
        labels.append(f"{label} [{used}]")
    points = {False: [], True: []}
    for (group, fps), label, suffix in zip(drawn, labels, _distinguish(labels, [g for g, _ in drawn])):
        points[group[0].synthetic].append((fps, Stat.of(_metric(r, metric)["mIoU"] for r in group), label + suffix))
    panels = [kind for kind in (False, True) if points[kind]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        for fps, miou, label in points[kind]:
            ax.errorbar(fps, miou.mean, yerr=miou.std or 0.0, fmt="o", capsize=3)
            ax.annotate(label, (fps, miou.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel("FPS (batch 1; the form in [brackets], fastest timed)" if form == "fastest"
                      else f"FPS (batch 1, {form} form)")
        ax.set_ylabel(f"mIoU (%, {metric})")
        ax.set_title("synthetic data" if kind else "real data")
        ax.grid(alpha=0.3)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no run with a benchmark.json", ha="center", va="center")
    if devices:
        fig.suptitle("mIoU vs speed on " + ", ".join(sorted(devices)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return sum(len(p) for p in points.values())


# ------------------------------------------------------------------- experiments: the synthetic adaptation table
# Experiment runners live here, above the trainer they drive (config/runtime <- datasets, models <- eval, adapt
# <- train <- benchmark).
SYNTHETIC = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
# Runs of one seed in the order they train: the two references, one of each method, then the variants.
# (FDA beta 0.09 is the one that fits 128x64: a band of floor(64 * 0.09) = 5 pixels; 0.01 swaps nothing there.)
BENCHMARK_CONFIGS = ("gta5_bisenet", "oracle_bisenet", "gta5_bisenet_fda_b0.09", "gta5_bisenet_dacs",
                     "gta5_bisenet_minent", "gta5_bisenet_adv", "gta5_bisenet_daformer_dacs", "gta5_bisenet_mic",
                     "gta5_bisenet_advent", "gta5_bisenet_adv_multi", "gta5_bisenet_fda_b0.01", "gta5_bisenet_fda_b0.05")
MBT = "FDA multi-band (mean softmax of the 3 betas)"
TABLE_ROWS = ("gta5_bisenet", "oracle_bisenet", "gta5_bisenet_adv", "gta5_bisenet_adv_multi", "gta5_bisenet_fda_b0.01",
              "gta5_bisenet_fda_b0.05", "gta5_bisenet_fda_b0.09", MBT, "gta5_bisenet_fda_ssl", "gta5_bisenet_dacs",
              "gta5_bisenet_minent", "gta5_bisenet_advent", "gta5_bisenet_daformer_dacs", "gta5_bisenet_mic")
FDA_BANDS = ("gta5_bisenet_fda_b0.01", "gta5_bisenet_fda_b0.05", "gta5_bisenet_fda_b0.09")


def run_benchmark(work_dir: Path, seeds: list[int], overrides: list[str], ssl: bool, table: Path | None,
                  jobs: int = 1, threads: int | None = None) -> str:
    """Every synthetic method against source-only and the oracle: each run is a `train.py` process, `jobs` at a
    time with `threads` torch threads each, in seed order (all rows of seed 0 first, so a partial benchmark is
    already a comparison). Finished runs (metrics.json) are reused and an interrupted one carries on from its
    last.pt, so the command resumes where it stopped; a failed run is reported with its log once the others
    have finished. Returns the markdown table, also written to work_dir/table.md (and between the markers of
    `table`) after every finished run."""
    from torch.utils.data import DataLoader

    from rtda.adapt import write_pseudo_labels
    from rtda.datasets import build_dataset
    from rtda.evaluation import evaluate, load_models, metrics_from_confusion
    from rtda.utils.distributed import init_distributed

    _check_work_dir(work_dir, overrides)
    results = _finished_runs(work_dir)

    def refresh():
        results.update(_finished_runs(work_dir))
        _write_table(work_dir, results, table)

    todo = [(name, seed, []) for seed in seeds for name in BENCHMARK_CONFIGS if (name, seed) not in results]
    failed = _train_runs(todo, overrides, work_dir, jobs, threads, refresh)
    ssl_runs = []
    for seed in seeds:
        if any((name, seed) not in results for name in FDA_BANDS):
            continue  # a band failed: reported below
        checkpoints = [str(results[name, seed]["run_dir"] / "last.pt") for name in FDA_BANDS]
        if (MBT, seed) not in results:  # multi-band transfer: score the three FDA models' mean softmax
            cfg = load_config(SYNTHETIC / "gta5_bisenet_fda_b0.09.yaml", [f"seed={seed}", *overrides])
            device = init_distributed().device
            loader = DataLoader(build_dataset(cfg.data.val, cfg, "val"), batch_size=cfg.eval.batch_size)
            confusion = evaluate(load_models(cfg, checkpoints, device), loader, device, cfg.model.num_classes)
            metrics = {"final": metrics_from_confusion(confusion), "seed": seed, "wall_time_s": 0.0}
            mbt_dir = work_dir / "fda_mbt" / f"seed{seed}"
            mbt_dir.mkdir(parents=True, exist_ok=True)
            (mbt_dir / "metrics.json").write_text(json.dumps({**metrics, "config_name": MBT}, indent=2))
        if ssl and ("gta5_bisenet_fda_ssl", seed) not in results:  # FDA's self-supervised round on MBT labels
            cfg = load_config(SYNTHETIC / "gta5_bisenet_fda_ssl.yaml", [f"seed={seed}", *overrides])
            labels = write_pseudo_labels(cfg, checkpoints, work_dir / "pseudo_labels" / f"seed{seed}")
            ssl_runs.append(("gta5_bisenet_fda_ssl", seed, [f"data.target.pseudo_labels={labels}"]))
    refresh()  # the multi-band rows; each SSL run refreshes again as it ends
    failed += _train_runs(ssl_runs, overrides, work_dir, jobs, threads, refresh)
    if failed:
        raise RuntimeError("\n".join(failed))
    return (work_dir / "table.md").read_text()


def _check_work_dir(work_dir: Path, overrides: list[str]) -> None:
    """Refuse a work dir whose runs trained on another version of the synthetic domains, or with other config
    overrides (say another model.pretrained): they would be reused as if they were this call's. A new work dir is
    stamped (generator.json) with the version and the overrides that change what a run learns."""
    from rtda.datasets.synthetic import GENERATOR_VERSION, version_name

    stamp = work_dir / "generator.json"
    wanted = sorted(o for o in overrides if o.split("=", 1)[0] not in NOT_RESULT_KEYS)
    wanted += [f"{key}:sha256={_file_sha256(Path(value))}" for key, value in (o.split("=", 1) for o in wanted)
               if key == "model.pretrained" and Path(value).is_file()]  # another file under the same name
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        found = recorded.get("generator")
    elif any(work_dir.glob("*/*/config.yaml")):
        recorded, found = {}, None  # runs from before the version was recorded
    else:
        work_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"generator": GENERATOR_VERSION, "overrides": wanted}) + "\n")
        return
    if found != GENERATOR_VERSION:
        raise BenchmarkError(f"--work-dir {work_dir}: its runs trained on synthetic domains of generator version "
                             f"{version_name(found)}, and this code generates version "
                             f"{GENERATOR_VERSION}; choose another --work-dir, or delete it (and the old data root, "
                             "which train.py refuses too) to retrain the table")
    if recorded.get("overrides", []) != wanted:
        had = " ".join(recorded.get("overrides", [])) or "none"
        raise BenchmarkError(f"--work-dir {work_dir}: its runs trained with the overrides {had}, and this call "
                             f"asks for {' '.join(wanted) or 'none'}; choose another --work-dir for these (or "
                             "delete it to retrain the table)")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _train_runs(runs: list[tuple[str, int, list[str]]], overrides: list[str], work_dir: Path, jobs: int,
                threads: int | None, after_each) -> list[str]:
    """Train each (synthetic config name, seed, extra overrides) as its own `train.py` process, `jobs` at a
    time, each with `threads` torch threads (default: the cores shared out; on 2 cores two one-thread runs side
    by side beat one two-thread run after the other, docs/results_synthetic.md), logging to
    work_dir/logs/NAME_seedN.log. Calls `after_each()` when a run ends; returns one line per failed run."""
    import subprocess

    jobs = max(1, jobs)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs = work_dir / "logs"
    pending, running, failed = list(runs), {}, []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, seed, extra = pending.pop(0)
                logs.mkdir(parents=True, exist_ok=True)
                log = logs / f"{name}_seed{seed}.log"
                command = [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(SYNTHETIC / f"{name}.yaml"),
                           f"seed={seed}", *overrides, *extra, "--work-dir", str(work_dir)]
                interrupted = _interrupted_run(work_dir, name, seed)
                if interrupted is not None:  # a session that ended mid-run: carry on from its last checkpoint
                    command += ["--resume", str(interrupted)]
                print(f"benchmark: {'resuming' if interrupted else 'training'} {name} seed {seed} (log: {log})",
                      file=sys.stderr)
                with log.open("w") as out:
                    running[subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out,
                                             stderr=subprocess.STDOUT)] = (name, seed, log)
            time.sleep(1.0)  # runs take minutes: polling each second costs nothing
            for proc in [p for p in running if p.poll() is not None]:
                name, seed, log = running.pop(proc)
                if proc.returncode:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                    failed.append(f"{name} seed {seed} failed (exit {proc.returncode}): {tail[0]} [log: {log}]")
                after_each()
    except KeyboardInterrupt:  # the runs got the Ctrl-C too: let each save its checkpoint before stopping
        for proc in running:
            proc.wait()
        raise
    return failed


def _interrupted_run(work_dir: Path, name: str, seed: int) -> Path | None:
    """The last.pt of the newest unfinished run (no metrics.json) of `name` with this seed, if there is one."""
    import yaml

    for run in sorted((work_dir / name).glob("*/last.pt"), key=lambda p: p.parent.name, reverse=True):
        config = run.parent / "config.yaml"
        if not (run.parent / "metrics.json").exists() and config.is_file():
            if (yaml.safe_load(config.read_text()) or {}).get("seed") == seed:
                return run
    return None


def _read_metrics(run_dir: Path) -> dict:
    return {**json.loads((Path(run_dir) / "metrics.json").read_text()), "run_dir": Path(run_dir)}


def _finished_runs(work_dir: Path) -> dict:
    results = {}
    for path in sorted(work_dir.glob("**/metrics.json")):
        m = _read_metrics(path.parent)
        results[m["config_name"], m["seed"]] = m
    return results


def _write_table(work_dir: Path, results: dict, table: Path | None) -> None:
    """Per row: mean ± sample std of the final mIoU over seeds, the gain over source-only, the share of the
    oracle - source-only gap that gain recovers, the seeds' values and the mean wall time of a run."""
    import statistics

    by_row = {row: sorted((seed, m) for (name, seed), m in results.items() if name == row) for row in TABLE_ROWS}
    means = {row: statistics.mean(m["final"]["mIoU"] for _, m in runs) for row, runs in by_row.items() if runs}
    base, oracle = means.get("gta5_bisenet"), means.get("oracle_bisenet")
    lines = ["| Run | Seeds | mIoU (mean ± std) | vs source-only | of the gap | per seed | train time per run (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in TABLE_ROWS:
        runs = by_row[row]
        if not runs:
            continue
        vals = [m["final"]["mIoU"] for _, m in runs]
        mean = means[row]
        std = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
        gain = f"{mean - base:+.1f}" if base is not None and row != "gta5_bisenet" else ""
        share = (f"{100 * (mean - base) / (oracle - base):.0f}%" if base is not None and oracle is not None
                 and oracle > base and row not in ("gta5_bisenet", "oracle_bisenet") else "")
        wall = statistics.mean(m["wall_time_s"] for _, m in runs)  # 0 for the multi-band mean: no training
        lines.append(f"| {row} | {len(vals)} | {mean:.1f}{std} | {gain} | {share} | "
                     f"{', '.join(f'{v:.1f}' for v in vals)} | {f'{wall:.0f}' if wall else ''} |")
    text = "\n".join(lines) + "\n"
    (work_dir / "table.md").write_text(text)
    if table is not None:
        _replace_section(table, text)


def _replace_section(path: Path, table_text: str) -> None:
    """Put the table between the markers of the "## Domain adaptation" section of `path`."""
    start, end = "<!-- adaptation-table:start -->", "<!-- adaptation-table:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path}: no {start} ... {end} markers to put the adaptation table between")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + table_text + rest[rest.index(end):])


def step_cost(configs: list[str], overrides: list[str], rounds: int, steps: int) -> str:
    """Training-step time of each config as a ratio to the first (source-only), timed in interleaved rounds on
    random batches with `benchmark_train_step`, so that a changing machine load hits every config alike."""
    import statistics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = {c: [] for c in configs}
    for _ in range(rounds):
        for config in configs:
            cfg = load_config(config, overrides)
            times[config].append(benchmark_train_step(cfg, device, steps, 1, source=config)["step_s"])
    base = statistics.median(times[configs[0]])
    lines = ["| Config | step (s, median) | ratio to " + Path(configs[0]).stem + " |", "|---|---|---|"]
    for config in configs:
        step = statistics.median(times[config])
        lines.append(f"| {Path(config).stem} | {step:.3f} | {step / base:.2f} |")
    return "\n".join(lines)



# ------------------------------------------------------------------------------------------ synthetic pretraining
# `python benchmark.py --pretrain-synthetic FILE` (`make benchmark-synthetic` makes it once): what ImageNet weights
# are to real UDA, for the synthetic table. Every protocol recipe starts from an ImageNet backbone, and from a random
# one the methods' teachers start from colour guesses (docs/results_synthetic.md). The stand-in is a different
# task on a different domain: the `randomised` scenes of datasets/synthetic.py (every part's colour drawn anew per
# image, camera, layout and finish spanning both benchmark domains and more; never the benchmark's source or
# target images) and, per cell of the backbone's last feature map, which classes cover >= 2% of it: image-level
# labels, a multi-label classifier on a 1x1 conv, no segmentation head. The backbone alone is kept.
PRETRAIN_DEFAULTS = {"steps": 2400, "images": 8000, "batch": 32, "lr": 2e-3, "weight_decay": 1e-2, "seed": 0}
PRETRAIN_MIN_SHARE = 0.02  # a class is present in a cell when it covers this share of the cell's pixels
PRETRAIN_CONFIG = SYNTHETIC / "gta5_bisenet.yaml"  # the backbone, its input norm and the read size


def pretrain_synthetic_backbone(out: Path, overrides: list[str] = (), steps: int = PRETRAIN_DEFAULTS["steps"],
                                images: int = PRETRAIN_DEFAULTS["images"], batch: int = PRETRAIN_DEFAULTS["batch"],
                                seed: int = PRETRAIN_DEFAULTS["seed"]) -> dict:
    """Pretrain the backbone of the synthetic rows (`PRETRAIN_CONFIG` with `overrides`) on `images` randomised
    scenes for `steps` AdamW steps of `batch`, and write its state dict (torchvision key names, what
    `model.pretrained: FILE` loads) to `out`, with the recipe and the last losses in `out` + `.json`. Rendered at
    data.synthetic's size and read at data.source.size, as the rows read theirs. Returns the recipe."""
    from rtda.datasets.labels import ID_TO_TRAIN_ID
    from rtda.datasets.synthetic import GENERATOR_VERSION, render_scene
    from rtda.datasets.transforms import resize_image
    from rtda.models.base import InputNorm
    from rtda.models.resnet import RESNETS, build_resnet, resnet_features

    cfg = load_config(PRETRAIN_CONFIG, list(overrides))
    for name, value in (("steps", steps), ("images", images), ("batch", batch)):
        if value < 1:
            raise BenchmarkError(f"--pretrain-synthetic: {name} {value}: expected a positive integer")
    width, height = cfg.data.source.size
    num_classes, gen = cfg.model.num_classes, cfg.data.synthetic
    torch.manual_seed(seed)  # the initialisation; the renders are their own pure functions of (seed, index)
    net = build_resnet(cfg.model.backbone, cfg.model.resnet_variant)
    norm = InputNorm(cfg.model.input_norm)
    head = nn.Conv2d(RESNETS[cfg.model.backbone][3], num_classes, 1)
    with torch.no_grad():  # the size of layer4's map: the label grid (eval, so no BN statistics move)
        grid = tuple(resnet_features(net.eval(), torch.zeros(1, 3, height, width))[1].shape[-2:])
    xs, ys = [], []
    for index in range(images):
        image, label = render_scene("randomised", index, gen.seed + seed, gen.height, gen.width)
        xs.append(resize_image(torch.from_numpy(image.copy()).permute(2, 0, 1), (height, width),
                               cfg.data.source.interpolation))
        train_ids = torch.from_numpy(ID_TO_TRAIN_ID[label].astype(np.int64))
        onehot = nn.functional.one_hot(train_ids.clamp(max=num_classes), num_classes + 1)[..., :num_classes]
        share = nn.functional.adaptive_avg_pool2d(onehot.permute(2, 0, 1)[None].float(), grid)[0]
        ys.append(share >= PRETRAIN_MIN_SHARE)
    x_all, y_all = torch.stack(xs), torch.stack(ys).float()
    params = [*net.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=PRETRAIN_DEFAULTS["lr"], weight_decay=PRETRAIN_DEFAULTS["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / steps) ** 0.9)  # poly, as train.py
    draw = torch.Generator().manual_seed(seed)
    net.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        pick = torch.randint(0, images, (batch,), generator=draw)
        x, y = x_all[pick], y_all[pick]
        if torch.rand((), generator=draw) < 0.5:  # a horizontal flip, the grid's labels with it
            x, y = x.flip(-1), y.flip(-1)
        _, features = resnet_features(net, norm(x))
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    last = torch.stack(losses[-50:]).mean().item()  # one host sync, at the end
    task = f"per-cell class presence (>= {PRETRAIN_MIN_SHARE:.0%} of a cell of a {grid[0]}x{grid[1]} grid)"
    recipe = {"task": task + " on randomised synthetic scenes", "generator": GENERATOR_VERSION,
              "backbone": cfg.model.backbone, "resnet_variant": cfg.model.resnet_variant,
              "input_norm": cfg.model.input_norm, "size": [width, height], "steps": steps, "images": images,
              "batch": batch, "seed": seed, "lr": PRETRAIN_DEFAULTS["lr"],
              "weight_decay": PRETRAIN_DEFAULTS["weight_decay"], "loss_first": losses[0].item(),
              "loss_last50": last, "wall_time_s": time.perf_counter() - start,
              # The same recipe on another machine gave other weights (most likely its CPU kernels rounding
              # differently), so the record names the machine's torch, CPU kernel set and threads.
              "machine": environment(torch.device("cpu"))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(net.state_dict(), partial)  # written whole, then renamed: never a half file under `out`
    recipe["sha256"] = _file_sha256(partial)  # so that a file pretrained again can be checked against a table's
    Path(str(out) + ".json").write_text(json.dumps(recipe, indent=2) + "\n")
    partial.replace(out)
    return recipe


# ------------------------------------------------------------------------------------------ GPU check
# `python benchmark.py --gpu-check [--out FILE.json]` (`make gpu-check`): what a CUDA machine shows before anyone
# spends hours on it. Every protocol config trains a few steps at its protocol size and batch with `amp: auto`
# (step time, images/s, peak memory, fits 16 / 24 GB), then runs through train.py on random-content PNGs
# written in the real GTA5 / Cityscapes layouts; eager vs deploy latency of both models at 512x1024; a
# 2-process DDP run through torchrun. docs/benchmarks.md ("GPU check") describes the JSON.
GPU_CHECK_BUDGET_S = 200.0  # no config starts after this many seconds, so that the check ends within 5 minutes
GPU_CHECK_DDP_TIMEOUT_S = 100.0  # the torchrun run normally takes well under a minute
GPU_CHECK_STEPS = (2, 3)  # (warm-up, timed) training steps per config
GPU_CHECK_TRAINER_ITERS = 2  # iterations of the train.py run per config on the written files
GPU_CHECK_LATENCY = (20, 200)  # (warm-up, timed) calls per form at 512x1024, batch 1
# What a card of each class leaves to PyTorch (the smallest common one: T4 15,360 MiB, L4 23,034 MiB), and the
# rule a run is judged by: peak max_memory_allocated * 1.1 (allocator fragmentation) + 0.5 GiB (CUDA context,
# cuDNN and cuBLAS handles) must fit in it.
CARD_BYTES = {"16GB": 15_360 * 2**20, "24GB": 23_034 * 2**20}
FIT_RULE = "1.1 * max_memory_allocated + 0.5 GiB <= 15,360 MiB (16GB: T4) / 23,034 MiB (24GB: L4)"
STORED_HW = {"gta5": (1052, 1914), "cityscapes": (1024, 2048)}  # (H, W) of the released files
TINY_HW = (32, 64)  # --tiny (a CPU smoke test of the check itself): every size the runs read ...
TINY_STORED_HW = {"gta5": (64, 128), "cityscapes": (64, 128)}  # ... and the files written
LATENCY_MODELS = {"bisenet_r18": "cityscapes_bisenet.yaml", "deeplabv2_r101": "cityscapes_deeplabv2.yaml"}
DDP_CONFIG = "gta5_bisenet_adv.yaml"  # DDP with a strategy-owned optimiser (the discriminator's)
FP16_CONFIG = "gta5_bisenet_adv.yaml"  # also timed under forced fp16: the GradScaler path a T4 takes, on CUDA
REPO_ROOT = Path(__file__).resolve().parents[1]


def protocol_configs() -> list[Path]:
    """configs/*.yaml: the protocol configs (not configs/synthetic/, not the _base_ pieces)."""
    return sorted((REPO_ROOT / "configs").glob("*.yaml"))


def write_layout_tree(root: Path, train_images: int, val_images: int, stored_hw: dict, seed: int = 0) -> dict:
    """Random-content images with blocky random label-id maps, in the released layouts; returns the roots.

    root/GTA5/{images,labels}/NNNNN.png (palettised label ids), root/Cityscapes/{leftImg8bit,gtFine}/{split}/{city}/
    (greyscale labelIds) and root/pseudo/{city}/{stem}.png (train ids, for the self-supervised FDA config).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, 768, dtype=np.uint8).tolist()

    def pair(hw):
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        blocks = rng.integers(0, 34, (hw[0] // 16 + 1, hw[1] // 16 + 1), dtype=np.uint8)
        return image, np.kron(blocks, np.ones((16, 16), np.uint8))[:hw[0], :hw[1]]

    def save(path: Path, img) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, compress_level=0 if img.mode == "RGB" else 1)  # noise does not compress: store it

    gta5, cityscapes, pseudo = root / "GTA5", root / "Cityscapes", root / "pseudo"
    for i in range(train_images):
        image, ids = pair(stored_hw["gta5"])
        label = Image.fromarray(ids)
        label.putpalette(palette)  # mode P whose indices are the label ids, as GTA5 ships them
        save(gta5 / "images" / f"{i + 1:05d}.png", Image.fromarray(image))
        save(gta5 / "labels" / f"{i + 1:05d}.png", label)
    for split, count, cities in (("train", train_images, ("aachen", "bremen")), ("val", val_images, ("frankfurt",))):
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_000019"
            image, ids = pair(stored_hw["cityscapes"])
            save(cityscapes / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", Image.fromarray(image))
            save(cityscapes / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", Image.fromarray(ids))
            if split == "train":
                train_ids = rng.integers(0, 19, ids.shape, dtype=np.uint8)
                train_ids[: ids.shape[0] // 4] = 255
                save(pseudo / city / f"{stem}.png", Image.fromarray(train_ids))
    return {"gta5": str(gta5), "cityscapes": str(cityscapes), "pseudo": str(pseudo)}


def _tiny_settings(cfg: Config) -> dict:
    """--tiny: every size TINY_HW, the recipe's crop capped to it, at most 2 images a batch, no loader workers."""
    h, w = TINY_HW
    settings = {f"data.{role}.size": f"[{w},{h}]" for role in ("source", "target", "val")}
    if cfg.adapt.crop is not None:
        settings["adapt.crop"] = f"[{min(cfg.adapt.crop[0], w)},{min(cfg.adapt.crop[1], h)}]"
    if cfg.adapt.name == "fda" and cfg.adapt.beta > 0 and int(min(h, w) * cfg.adapt.beta) == 0:
        settings["adapt.beta"] = 1 / min(h, w)  # FDA's band would be 0 pixels at the tiny size: make it 1
    settings.update({"train.batch_size": min(cfg.train.batch_size, 2), "train.workers": 0})
    return settings


def trainer_overrides(cfg: Config, roots: dict, iters: int, tiny: bool) -> list[str]:
    """Overrides that point a protocol config at the written tree and make it a short train.py run."""
    settings = {f"data.{role}.root": roots[getattr(cfg.data, role).name]
                for role in ("source", "target", "val")}
    if cfg.data.target.pseudo_labels is not None:
        settings["data.target.pseudo_labels"] = roots["pseudo"]
    settings.update({"model.pretrained": "none", "train.iters": iters, "train.log_interval": 1,
                     "train.eval_interval": 0, "train.checkpoint_interval": 1000, "train.vis_images": 1})
    if tiny:
        settings.update(_tiny_settings(cfg))
    return [f"{k}={v}" for k, v in settings.items()]


def memory_fits(peak_allocated: int) -> dict:
    need = 1.1 * peak_allocated + 0.5 * 2**30
    return {card: need <= capacity for card, capacity in CARD_BYTES.items()}


def gpu_environment(device: torch.device) -> dict:
    from rtda.utils.amp import amp_name, autocast_dtype

    env = environment(device)
    env.update({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                "amp_auto": amp_name(autocast_dtype("auto", device))})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"capability": list(torch.cuda.get_device_capability(device)),
                    "total_memory_bytes": int(props.total_memory), "gpus": torch.cuda.device_count()})
    return env


def _quiet_call(fn):
    """fn() with its stdout and stderr (tqdm, tables, warnings) kept; returns (result or None, error line, log)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            return fn(), None, buffer.getvalue()
    except Exception as exc:  # one config's failure must not hide the others' results
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:500], buffer.getvalue()


def check_config(path: Path, device: torch.device, roots: dict, work_dir: Path, tiny: bool = False,
                 steps: tuple[int, int] = GPU_CHECK_STEPS, trainer_iters: int = GPU_CHECK_TRAINER_ITERS) -> dict:
    """One protocol config: timed training steps at its size and batch (amp auto), then train.py on the files."""
    import gc
    import shutil

    from rtda import engine as train

    cfg = load_config(path)
    cfg.train.amp = "auto"
    warmup, iters = steps
    size = TINY_HW if tiny else None
    batch = min(cfg.train.batch_size, 2) if tiny else None
    entry: dict = {"config": str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)}
    started = time.perf_counter()
    r, error, log = _quiet_call(lambda: benchmark_train_step(cfg, device, iters, warmup, size, batch, str(path)))
    if r is not None:
        entry.update({k: r[k] for k in ("model_label", "adapt", "batch_size", "source_size", "target_size", "amp",
                                        "step_s", "images_per_s", "peak_memory_bytes")})
        if device.type == "cuda":
            entry["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
            entry["fits"] = memory_fits(r["peak_memory_bytes"])
    else:
        entry.update({"error": error, "log_tail": log[-1500:]})
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def run_trainer():
        run_cfg = load_config(path, trainer_overrides(cfg, roots, trainer_iters, tiny) + ["train.amp=auto"])
        run_dir = train.train(run_cfg, work_dir=work_dir)
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
            if metrics["iterations"] != trainer_iters:
                raise RuntimeError(f"{run_dir}: {metrics['iterations']} iterations, expected {trainer_iters}")
            return {"iterations": metrics["iterations"], "wall_time_s": metrics["wall_time_s"],
                    "val_mIoU": metrics["final"]["mIoU"]}
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)  # a DeepLabV2 + DACS checkpoint is half a GB

    t0 = time.perf_counter()
    result, error, log = _quiet_call(run_trainer)
    entry["trainer"] = ({"ok": True, **result} if result is not None
                        else {"ok": False, "error": error, "log_tail": log[-1500:]})
    entry["trainer"]["total_s"] = round(time.perf_counter() - t0, 1)
    entry["ok"] = "error" not in entry and entry["trainer"]["ok"]
    entry["wall_s"] = round(time.perf_counter() - started, 1)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def check_latency(device: torch.device, size: tuple[int, int] = THESIS_SIZE,
                  calls: tuple[int, int] = GPU_CHECK_LATENCY) -> dict:
    """Eager, deploy and deploy under autocast (amp auto's dtype) of both models, batch 1, alternating rounds."""
    from rtda import models
    from rtda.utils.amp import amp_name, autocast_dtype

    amp = autocast_dtype("auto", device)
    out = {}
    for name, config in LATENCY_MODELS.items():
        model_cfg = _without_pretrained(load_config(REPO_ROOT / "configs" / config).model)
        model = build_model(model_cfg, config).to(device).eval()
        deployed = models.deploy(model)
        image = torch.rand(1, 3, *size, device=device) * 255
        image_cl = image.contiguous(memory_format=torch.channels_last)
        forms = {"eager": (model, image, torch.no_grad, contextlib.nullcontext),
                 "deploy": (deployed, image_cl, torch.inference_mode, contextlib.nullcontext)}
        if amp is not None:
            amp_text = amp_name(amp)
            forms[f"deploy_{amp_text}"] = (deployed, image_cl, torch.inference_mode,
                                           lambda a=amp_text: autocast_context(device, a))
        stats = time_forms(forms, calls[1], calls[0])
        out[name] = {"size": list(size), "batch": 1, **stats,
                     **{f"speedup_{k}": stats["eager"]["mean_ms"] / stats[k]["mean_ms"] for k in stats if k != "eager"}}
        del model, deployed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def check_fp16(device: torch.device, tiny: bool = False) -> dict:
    """FP16_CONFIG's training steps with train.amp forced to fp16 (GradScaler on, two optimisers under it)."""
    cfg = load_config(REPO_ROOT / "configs" / FP16_CONFIG, ["train.amp=fp16"])
    warmup, iters = (0, 1) if tiny else GPU_CHECK_STEPS
    r, error, log = _quiet_call(lambda: benchmark_train_step(
        cfg, device, iters, warmup, TINY_HW if tiny else None, 2 if tiny else None, FP16_CONFIG))
    if r is None:
        return {"config": f"configs/{FP16_CONFIG}", "ok": False, "error": error, "log_tail": log[-1500:]}
    return {"config": f"configs/{FP16_CONFIG}", "ok": True,
            **{k: r[k] for k in ("amp", "batch_size", "source_size", "step_s", "images_per_s", "peak_memory_bytes")}}


def check_ddp(device: torch.device, roots: dict, work_dir: Path, tiny: bool = False,
              timeout: float = GPU_CHECK_DDP_TIMEOUT_S) -> dict:
    """train.py under `torchrun --nproc_per_node 2` (one GPU: both processes share it over gloo); checks the
    run finished, rank 0 alone made the run folder and the checkpoint holds both ranks' RNG states."""
    import signal
    import subprocess

    from rtda.utils.amp import amp_name, autocast_dtype
    from rtda.utils.files import load_checkpoint

    config = REPO_ROOT / "configs" / DDP_CONFIG
    cfg = load_config(config)
    iters = 1 if tiny else 2
    overrides = trainer_overrides(cfg, roots, iters, tiny) + ["train.batch_size=4", "train.amp=auto"]
    if not tiny:
        overrides += ["data.source.size=[640,360]", "data.target.size=[512,256]", "data.val.size=[512,256]",
                      "train.workers=2"]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    env = dict(os.environ)
    if device.type != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu: the ranks must not find a GPU either
        env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "train.py", "--config", str(config), *overrides, "--work-dir", str(work_dir)]
    entry = {"config": f"configs/{DDP_CONFIG}", "processes": 2, "gpus": gpus,
             "backend": "nccl" if gpus >= 2 else ("gloo, both processes on one GPU" if gpus else "gloo (CPU)"),
             "amp": amp_name(autocast_dtype("auto", device))}
    started = time.perf_counter()
    # its own process group, so that a hang is ended with the ranks, which would otherwise keep the GPU
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        returncode, log = None, f"{log}\ntimed out after {timeout:.0f} s"
    entry.update({"returncode": returncode, "wall_s": round(time.perf_counter() - started, 1)})
    problem = None if returncode == 0 else (f"torchrun exited with {returncode}" if returncode is not None
                                            else f"torchrun did not finish within {timeout:.0f} s")
    runs = sorted((work_dir / cfg.name).glob("*/metrics.json"))
    if problem is None and len(runs) != 1:
        problem = f"{len(runs)} run folders in {work_dir / cfg.name}, expected 1 (rank 0's)"
    if problem is None:
        metrics = json.loads(runs[0].read_text())
        ranks = len(load_checkpoint(runs[0].parent / "last.pt")["rng"])
        entry.update({"iterations": metrics["iterations"], "rng_states": ranks})
        if metrics["iterations"] != iters or ranks != 2:
            problem = f"{metrics['iterations']} iterations and {ranks} RNG states, expected {iters} and 2"
    entry["ok"] = problem is None
    if problem:
        entry.update({"error": problem, "log_tail": log[-3000:]})
    return entry


def _write_json(path: Path | None, result: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)  # a reader (or a killed check) sees the last complete version


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f}"


def gpu_check_markdown(result: dict) -> str:
    """The per-config part of a gpu-check result as the markdown table docs/benchmarks.md records."""
    env = result["environment"]
    lines = [f"{env['device_name']}, torch {env['torch']} (CUDA {env.get('cuda')}), amp auto = {env['amp_auto']}, "
             f"{result['started']}", "",
             "| Config | Model + strategy | Batch | Source HxW | Step (ms) | Images/s | Peak memory (GiB) "
             "| Fits 16 GB | Fits 24 GB | train.py |", "|---|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "**no**", None: "—"}
    for name, e in result["configs"].items():
        if "step_s" not in e:
            lines.append(f"| `{name}` | failed: {e['error']} | | | | | | | | |")
            continue
        fits = e.get("fits", {})
        lines.append(f"| `{name}` | {e['model_label']} + {e['adapt']} | {e['batch_size']} | "
                     f"{e['source_size'][0]}x{e['source_size'][1]} | {e['step_s'] * 1e3:.1f} | "
                     f"{e['images_per_s']:.1f} | {_gb(e['peak_memory_bytes'])} | {yes[fits.get('16GB')]} | "
                     f"{yes[fits.get('24GB')]} | {'ok' if e['trainer']['ok'] else 'failed'} |")
    lines += [f"| skipped (time budget) | {', '.join(result['skipped'])} | | | | | | | | |"] if result["skipped"] else []
    return "\n".join(lines)


def gpu_check(out: Path | None, device: torch.device, configs: list[Path] | None = None, tiny: bool = False,
              budget_s: float = GPU_CHECK_BUDGET_S) -> dict:
    """The whole check; the JSON at `out` is rewritten after each part, so a killed check leaves what it did.

    `tiny` (CPU smoke test of this code): TINY_HW everywhere, batch <= 2, 1 step, 2 timed latency calls.
    """
    import importlib.util
    import tempfile

    from rtda.utils.amp import autocast_dtype

    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--gpu-check needs a CUDA GPU, and torch {torch.__version__} sees none "
                             "(torch.cuda.is_available() is False); run it on a CUDA machine")
    if device.type != "cuda" and not tiny:
        raise BenchmarkError("--gpu-check --device cpu: the protocol sizes take hours on a CPU; add --tiny for "
                             "a smoke test of the check itself")
    if importlib.util.find_spec("cityscapesscripts") is None:
        raise BenchmarkError("--gpu-check: the package cityscapesscripts is missing (datasets/labels.py reads the "
                             "official label table from it): pip install cityscapesscripts, or, offline, carry the "
                             "wheels `make gpu-wheels` downloads (docs/benchmarks.md)")
    started = time.perf_counter()
    configs = protocol_configs() if configs is None else configs
    result = {"kind": "gpu-check", "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "tiny": tiny,
              "environment": gpu_environment(device), "fit_rule": FIT_RULE,
              "steps": {"warmup": 0 if tiny else GPU_CHECK_STEPS[0], "timed": 1 if tiny else GPU_CHECK_STEPS[1],
                        "trainer_iterations": 1 if tiny else GPU_CHECK_TRAINER_ITERS},
              "latency": {}, "ddp": None, "configs": {}, "skipped": []}
    env = result["environment"]
    print(f"gpu-check: torch {env['torch']} on {env['device_name']}"
          + (f" (capability {env['capability'][0]}.{env['capability'][1]}, "
             f"{_gb(env['total_memory_bytes'])} GiB)" if "capability" in env else "")
          + f", amp auto = {env['amp_auto']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        stored = TINY_STORED_HW if tiny else STORED_HW
        # enough images for the largest batch of one process, and for the DDP run's 2 per process
        batches = [2 if tiny else load_config(p).train.batch_size for p in configs]
        roots = write_layout_tree(tmp / "data", max([4, *batches]), 2, stored)
        result["data"] = {"layouts": "GTA5 images/labels (palettised ids), Cityscapes leftImg8bit/gtFine labelIds",
                          "stored_hw": {k: list(v) for k, v in stored.items()},
                          "write_s": round(time.perf_counter() - t0, 1)}
        print(f"  wrote random-content PNGs in the GTA5 and Cityscapes layouts ({result['data']['write_s']} s)",
              flush=True)

        latency, error, log = _quiet_call(lambda: check_latency(device, TINY_HW if tiny else THESIS_SIZE,
                                                                (0, 2) if tiny else GPU_CHECK_LATENCY))
        result["latency"] = latency if latency is not None else {"error": error, "log_tail": log[-1500:]}
        for name, r in (latency or {}).items():
            forms = "  ".join(f"{k} {v['mean_ms']:.2f} ms ({v['fps']:.0f} FPS)" for k, v in r.items()
                              if isinstance(v, dict))
            print(f"  latency {name} {r['size'][0]}x{r['size'][1]} batch 1: {forms}", flush=True)
        if error:
            print(f"  latency FAILED: {error}", flush=True)
        _write_json(out, result)

        for path in configs:
            if time.perf_counter() - started > budget_s:
                result["skipped"].append(path.stem)
                continue
            entry = check_config(path, device, roots, tmp / "runs", tiny, (0, 1) if tiny else GPU_CHECK_STEPS,
                                 1 if tiny else GPU_CHECK_TRAINER_ITERS)
            result["configs"][path.stem] = entry
            if "step_s" in entry:
                fits = entry.get("fits", {})
                line = (f"step {entry['step_s'] * 1e3:7.1f} ms  {entry['images_per_s']:6.1f} img/s  peak "
                        f"{_gb(entry['peak_memory_bytes'])} GiB  fits 16GB {fits.get('16GB', '-')}, "
                        f"24GB {fits.get('24GB', '-')}  (batch {entry['batch_size']}, {entry['amp']})")
            else:
                line = f"step FAILED: {entry['error']}"
            trainer = entry["trainer"]
            line += "  train.py " + ("ok" if trainer["ok"] else f"FAILED: {trainer['error']}")
            print(f"  {path.stem:26s} {line}", flush=True)
            _write_json(out, result)

        # the fp16 + GradScaler path (what amp auto picks on a T4), with the discriminator's optimiser under it
        if device.type != "cuda" or autocast_dtype("auto", device) != torch.float16:
            result["fp16"] = check_fp16(device, tiny)
            f = result["fp16"]
            print(f"  {FP16_CONFIG[:-5]} under amp fp16: " + (f"step {f['step_s'] * 1e3:.1f} ms, peak "
                  f"{_gb(f['peak_memory_bytes'])} GiB" if f["ok"] else f"FAILED: {f['error']}"), flush=True)
            _write_json(out, result)

        # last: its own processes, so a crash or hang there cannot cost the configs' numbers
        result["ddp"] = check_ddp(device, roots, tmp / "ddp", tiny)
        d = result["ddp"]
        print(f"  DDP {d['processes']} processes ({d['backend']}): "
              + ("ok" if d["ok"] else f"FAILED: {d['error']}") + f" ({d['wall_s']} s)", flush=True)
        _write_json(out, result)
    if result["skipped"]:
        print(f"  not run (time budget of {budget_s:.0f} s spent): {', '.join(result['skipped'])}", flush=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ok"] = (all(e["ok"] for e in result["configs"].values()) and bool(result["ddp"]["ok"])
                    and result.get("fp16", {"ok": True})["ok"] and "error" not in result["latency"]
                    and not result["skipped"])
    _write_json(out, result)
    print("\n" + gpu_check_markdown(result) + "\n")
    print(f"gpu-check {'passed' if result['ok'] else 'FAILED'} in {result['wall_s']} s"
          + (f"; JSON in {out}" if out else ""), flush=True)
    return result


# ------------------------------------------------------------------------------------------ CLI
def _print_model_report(r: dict) -> None:
    p, f, lat = r["params"], r["flops"], r["latency"]
    h, w = r["size"]
    print(f"{r['config']}: {r['model_label']} at {h}x{w}")
    print(f"  torch {r['torch']} on {r['device']} ({r['device_name']}), {r['threads']} threads, "
          f"load average {r['load_avg_1m']}")
    print(f"  params: total {p['total']:,}  trainable {p['trainable']:,}  used at inference {p['inference']:,}  "
          f"deploy form {p['deploy']:,}")
    print(f"  FLOPs (fvcore, MACs): {f['gmacs']:.2f} G")
    if f["skipped_ops"]:
        print("  not counted by fvcore: " + ", ".join(f"{op} x{n}" for op, n in sorted(f["skipped_ops"].items())))
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


def _print_train_report(r: dict) -> None:
    h, w = r["source_size"]
    print(f"{r['config']}: {r['model_label']} + {r['adapt']}, "
          f"batch {r['batch_size']} at {h}x{w}, amp {r['amp']}")
    print(f"  torch {r['torch']} on {r['device']} ({r['device_name']}), {r['threads']} threads, "
          f"load average {r['load_avg_1m']}")
    print(f"  step {r['step_s']:.3f} s  ({r['images_per_s']:.2f} images/s over {r['iters']} steps after "
          f"{r['warmup']} warm-up)")
    print(f"  peak memory ({r['peak_memory_kind']}): {r['peak_memory_bytes'] / 2**30:.2f} GiB")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", help="a config YAML: benchmark its model (or its training step)")
    mode.add_argument("--runs", nargs="+", metavar="DIR", help="folders of finished runs to tabulate")
    mode.add_argument("--adaptation-table", action="store_true", help="train every synthetic method, source-only "
                      "and the oracle for --seeds, then tabulate them (resumable: finished runs are reused)")
    mode.add_argument("--step-cost", nargs="+", metavar="CONFIG", help="training-step time of configs as a ratio "
                      "to the first, in interleaved --rounds of --iters steps")
    mode.add_argument("--pretrain-synthetic", metavar="FILE.pt", help="pretrain the synthetic rows' backbone on "
                      "randomised scenes (the benchmark's stand-in for ImageNet weights) and write it to FILE.pt; "
                      f"--iters: steps (default {PRETRAIN_DEFAULTS['steps']}), --batch-size (default "
                      f"{PRETRAIN_DEFAULTS['batch']})")
    mode.add_argument("--gpu-check", action="store_true", help="CUDA: every protocol config's step time and "
                      "memory, train.py on the real layouts, latency of both models, a 2-process DDP run")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--size", help="HEIGHTxWIDTH; model: default 512x1024; --train-step: default the "
                                       "config's source/target sizes")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--iters", type=int, help="timed calls (default 1000 on cuda, 20 on cpu; "
                                                  "--train-step: 10 / 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 50 on cuda, 3 on cpu; "
                                                   "--train-step: 3 / 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--amp", choices=("fp16", "bf16"), help="autocast the deploy form (cuda only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the deploy form")
    parser.add_argument("--forms", metavar="A,B,...", help="forms to time in alternating rounds, each with its "
                        "parity to eager (default eager,deploy; `all` = every form of the device): "
                        + "; ".join(f"{k}: {v}" for k, v in FORM_HELP.items()))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--train-step", action="store_true", help="time full training steps instead")
    parser.add_argument("--batch-size", type=int, help="--train-step: override train.batch_size")
    parser.add_argument("--table", choices=(*TABLES, "all"), default="all")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--metric", choices=("final", "best"), default="final",
                        help="which metrics.json result to tabulate (best = selected on val)")
    parser.add_argument("--plot", metavar="FILE.png", help="--runs: also draw mIoU against FPS")
    parser.add_argument("--work-dir", default="runs/benchmark_adaptation",
                        help="--adaptation-table: run folders and table.md")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="--adaptation-table: seeds")
    parser.add_argument("--jobs", type=int, default=1, help="--adaptation-table: trainings side by side, each a "
                        "train.py process with --threads torch threads (default: the cores shared out)")
    parser.add_argument("--ssl", action="store_true", help="--adaptation-table: also FDA's self-supervised round "
                        "on multi-band pseudo-labels")
    parser.add_argument("--into", type=Path, metavar="FILE.md", help="--adaptation-table: also write the table "
                        "between the adaptation-table markers of this file (docs/results_synthetic.md)")
    parser.add_argument("--rounds", type=int, default=3, help="--step-cost: interleaved rounds")
    parser.add_argument("--out", metavar="FILE.json", help="--gpu-check: where the JSON goes "
                                                            "(default: runs/gpu_check.json)")
    parser.add_argument("--tiny", action="store_true", help="--gpu-check: tiny sizes, 1 step (with --device cpu: "
                        "a smoke test of the check itself)")
    parser.add_argument("--data", action="store_true", help="time the data loaders (source, target) with and "
                        "without the prepared cache instead; --iters: items per measurement (default 32)")
    parser.add_argument("--workers", type=int, help="--data: DataLoader workers (default: train.workers, at most "
                                                    "the cores available)")
    parser.add_argument("--plot-form", default="eager", metavar="FORM",
                        help="--plot: which timed form's FPS to draw (eager, deploy, onnxruntime, ..., or fastest)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for name in ("out", "tiny"):
            if getattr(args, name) and not args.gpu_check:
                raise BenchmarkError(f"--{name} is an option of --gpu-check")
        if args.data:
            return _main_data(args)
        if args.runs:
            return _main_runs(args)
        if args.adaptation_table or args.step_cost or args.pretrain_synthetic:
            return _main_experiments(args)
        if args.gpu_check:
            return _main_gpu_check(args)
        return _main_config(args)
    except (BenchmarkError, ConfigError) as exc:
        print(f"benchmark.py: {exc}", file=sys.stderr)
        return 2


def _main_runs(args) -> int:
    runs, problems = find_runs(args.runs)
    tables = build_tables(runs, args.table, args.metric, problems)
    print((format_csv if args.format == "csv" else format_markdown)(tables), end="")
    if not tables:
        problems.append(f"no run fits table {args.table!r}")
    if args.plot:
        drawn = plot_miou_fps(runs, args.plot, args.metric, problems, args.plot_form)
        print(f"wrote {args.plot} ({drawn} markers)", file=sys.stderr)
    for line in problems:
        print(f"benchmark.py: {line}", file=sys.stderr)
    return 0 if tables else 1


def _main_experiments(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)  # 1 is fastest when several runs share a busy machine
    if args.step_cost:
        print(step_cost(args.step_cost, args.overrides, args.rounds, args.iters or 2))
    elif args.pretrain_synthetic:
        recipe = pretrain_synthetic_backbone(Path(args.pretrain_synthetic), args.overrides,
                                             steps=args.iters or PRETRAIN_DEFAULTS["steps"],
                                             batch=args.batch_size or PRETRAIN_DEFAULTS["batch"])
        print(f"wrote {args.pretrain_synthetic} ({recipe['steps']} steps in {recipe['wall_time_s']:.0f} s, loss "
              f"{recipe['loss_first']:.3f} -> {recipe['loss_last50']:.3f}; sha256 {recipe['sha256'][:16]}...; "
              f"recipe in {args.pretrain_synthetic}.json)")
    else:
        try:
            print(run_benchmark(Path(args.work_dir), args.seeds, args.overrides, args.ssl, args.into, args.jobs,
                                args.threads))
        except (FileNotFoundError, RuntimeError, ValueError) as exc:  # data, checkpoint, divergence
            raise BenchmarkError(str(exc)) from None
    return 0


def _main_gpu_check(args) -> int:
    device = torch.device(args.device or "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = gpu_check(Path(args.out or "runs/gpu_check.json"), device, tiny=args.tiny)
    return 0 if result["ok"] else 1


def _main_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is available")
    if args.amp and device.type != "cuda":
        raise BenchmarkError(f"--amp {args.amp}: autocast is a CUDA option; use --device cuda")
    size = parse_size(args.size) if args.size else None
    for name in ("iters", "warmup", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise BenchmarkError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_step:
        iters = args.iters or (10 if device.type == "cuda" else 3)
        warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
        result = benchmark_train_step(cfg, device, iters, warmup, size, args.batch_size, source=args.config)
        report = _print_train_report
    else:
        iters = args.iters or DEFAULT_ITERS[device.type]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP[device.type]
        forms = parse_forms(args.forms, device)
        result = benchmark_model(cfg, size or THESIS_SIZE, device, iters, warmup, args.amp, args.compile,
                                 source=args.config, forms=forms)
        report = _print_model_report
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
    return 0


# ------------------------------------------------------------------------------------- data loading (--data)
# `benchmark.py --data --config FILE`: items/s of the config's source and target loaders as the trainer builds
# them (source augmentations included), read from the PNGs and from a cache prepared for the same files in a
# temporary folder (deleted at the end), in alternating rounds of one run. Per core: one process reading items
# one after another with one torch thread; per worker: a DataLoader with W persistent workers and the config's
# batch size (batches are collated in the workers, as in training), its items/s / W.
DATA_ITEMS = 32
DATA_ROUNDS = 2  # uncached and cached alternate this many times


def _items_per_s_in_process(dataset) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        return len(dataset) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _items_per_s_per_worker(dataset, workers: int, batch_size: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=True)
    for _ in loader:  # start the workers and warm the page cache
        pass
    start = time.perf_counter()
    for _ in loader:
        pass
    rate = len(dataset) / (time.perf_counter() - start)
    del loader
    return rate / workers


def _cache_format_choice(cached, count: int) -> dict:
    """ms per item to get the resized image (and label) out of either candidate cache format, on the same items:
    the memory-mapped uint8 arrays (what datasets/cache.py writes) and pre-resized PNGs decoded with pyspng
    (PIL without it). The PNGs are decoded from memory, which favours them; the arrays still win by far."""
    import io as _io

    from PIL import Image

    from rtda.datasets.io import spng as _spng

    entries = [e for e in (cached._image_entry, cached._label_entry) if e is not None]
    encoded = []
    for index in range(count):
        for entry in entries:
            buffer = _io.BytesIO()
            Image.fromarray(entry.read(index)).save(buffer, format="png", compress_level=1)
            encoded.append(buffer.getvalue())
    start = time.perf_counter()
    for index in range(count):
        for entry in entries:
            entry.read(index)
    array_ms = 1000 * (time.perf_counter() - start) / count
    start = time.perf_counter()
    for data in encoded:
        _spng.load(data) if _spng is not None else np.asarray(Image.open(_io.BytesIO(data)))
    png_ms = 1000 * (time.perf_counter() - start) / count
    return {"array_ms": array_ms, "png_ms": png_ms, "png_decoder": "pyspng" if _spng is not None else "PIL",
            "array_mb": sum(e.item_nbytes for e in entries) / 1e6, "png_mb": sum(map(len, encoded)) / count / 1e6}


def benchmark_data(cfg: Config, items: int = DATA_ITEMS, workers: int | None = None,
                   roles: tuple[str, ...] = ("source", "target")) -> dict:
    """Loader throughput of `roles` from the files and from the prepared cache, on the same first `items` files."""
    import tempfile

    from rtda.datasets import build_dataset
    from rtda.datasets.cache import prepare_dataset
    from rtda.datasets.io import has_pyspng

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = workers or max(1, min(cfg.train.workers, cores))
    uncached_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=None))
    batch_size = max(1, min(cfg.train.batch_size, items))
    result = {"config": cfg.name, "items": items, "workers": workers, "batch_size": batch_size, "cores": cores,
              "pyspng": has_pyspng(),
              "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2), "roles": {}}
    for role in roles:
        full = build_dataset(getattr(cfg.data, role), uncached_cfg, role)
        plain = full.subset(min(items, len(full)))
        with tempfile.TemporaryDirectory(prefix="benchmark-data-") as folder:
            cached = full.subset(len(plain))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not prepared yet": about to be
                cached.attach_cache(folder)
            start = time.perf_counter()
            prepare_dataset(cached, role, workers, progress=False)
            prepare_s = time.perf_counter() - start
            cached.attach_cache(folder)
            formats = _cache_format_choice(cached, min(8, len(cached)))
            if not all(cached.cached.values() if plain.labels is not None else [cached.cached["images"]]):
                raise BenchmarkError(f"{role}: the cache prepared in {folder} is not used ({cached.cached})")
            rates = {"uncached": {"per_core": [], "per_worker": []}, "cached": {"per_core": [], "per_worker": []}}
            for form in (plain, cached):  # untimed pass: both read warm files
                for index in range(len(form)):
                    form[index]
            for _ in range(DATA_ROUNDS):
                for name, form in (("uncached", plain), ("cached", cached)):
                    rates[name]["per_core"].append(_items_per_s_in_process(form))
                    rates[name]["per_worker"].append(_items_per_s_per_worker(form, workers, batch_size))
        summary = {name: {k: float(np.median(v)) for k, v in r.items()} for name, r in rates.items()}
        h, w = plain.size_hw
        result["roles"][role] = {
            "form": plain.describe_form(), "size": f"{w}x{h}", "items": len(plain),
            "augment": plain.augment is not None, **summary,
            "speedup_per_core": summary["cached"]["per_core"] / summary["uncached"]["per_core"],
            "speedup_per_worker": summary["cached"]["per_worker"] / summary["uncached"]["per_worker"],
            "prepare_items_per_s": len(plain) / prepare_s, "cache_format": formats}
    return result


def _print_data_report(r: dict) -> None:
    print(f"{r['config']}: data loading, {r['items']} items per role, {r['workers']} DataLoader workers "
          f"(batch {r['batch_size']}), "
          f"{r['cores']} cores, load average {r['load_avg_1m']}, torch {r['torch']}, "
          f"pyspng {'yes' if r['pyspng'] else 'no'}")
    print(f"{'role':8s}{'size':>10s}  {'uncached items/s':>22s}  {'cached items/s':>22s}  {'cached / uncached':>20s}")
    print(f"{'':18s}  {'per core':>10s}{'per worker':>12s}  {'per core':>10s}{'per worker':>12s}  "
          f"{'per core':>9s}{'per worker':>11s}")
    for role, x in r["roles"].items():
        print(f"{role:8s}{x['size']:>10s}  {x['uncached']['per_core']:10.1f}{x['uncached']['per_worker']:12.1f}  "
              f"{x['cached']['per_core']:10.1f}{x['cached']['per_worker']:12.1f}  "
              f"{x['speedup_per_core']:8.1f}x{x['speedup_per_worker']:10.1f}x")
    for role, x in r["roles"].items():
        f = x["cache_format"]
        print(f"  {role}: {x['form']}{', with the source augmentations' if x['augment'] else ''}; "
              f"prepare wrote {x['prepare_items_per_s']:.1f} items/s; cache format, ms per item (one core): "
              f"memory-mapped array {f['array_ms']:.2f} ({f['array_mb']:.2f} MB), pre-resized PNG with "
              f"{f['png_decoder']} {f['png_ms']:.2f} ({f['png_mb']:.2f} MB)")


def _main_data(args) -> int:
    from rtda.datasets import DatasetError

    if args.runs or not args.config:
        raise BenchmarkError("--data needs --config")
    for name in ("iters", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchmarkError(f"--{name} {value}: expected a positive integer")
    cfg = load_config(args.config, args.overrides)
    from rtda.datasets.io import PYSPNG_HINT, has_pyspng

    if not has_pyspng():
        print(f"benchmark.py: note: {PYSPNG_HINT}", file=sys.stderr)
    try:
        result = benchmark_data(cfg, args.iters or DATA_ITEMS, args.workers)
    except DatasetError as exc:
        raise BenchmarkError(str(exc)) from None
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_data_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
