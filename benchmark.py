"""Complexity, speed and training cost of a config's model, and the thesis tables from finished runs.

    python benchmark.py --config configs/cityscapes_bisenet.yaml [--size 512x1024] [--device cpu|cuda]
                        [--iters N] [--amp fp16|bf16] [--compile] [--json]
                        [--forms eager,deploy,compile,onnxruntime | all]   # + fp16,bf16,cudagraph,tensorrt on CUDA
    python benchmark.py --config configs/gta5_bisenet_adv.yaml --train-step [--size 360x640] [--batch-size 2]
    python benchmark.py --runs runs/ --table all [--format md|csv] [--plot miou_fps.png]

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

from config import Config, ConfigError, from_dict, load_config

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
    """What a timing depends on: versions, the device's name, threads and the machine's load."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {"torch": torch.__version__, "device": device.type, "device_name": name,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
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
    import models

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
    from models.export import ExportError, OnnxModel, export_onnx, require

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
        import models
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
    import models

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
    import runtime
    import train
    from adapt import build_strategy

    if size is not None:  # strategies read the sizes too (DACS checks that source and target agree)
        cfg = copy.deepcopy(cfg)
        cfg.data.source.size = cfg.data.target.size = [size[1], size[0]]
        if cfg.adapt.crop is not None:  # a recipe's crop cannot be larger than the images
            cfg.adapt.crop = [min(cfg.adapt.crop[0], size[1]), min(cfg.adapt.crop[1], size[0])]
    env = environment(device)  # the load before this process adds its own
    t = cfg.train
    runtime.seed_everything(cfg.seed, t.deterministic)  # as train.py does (it also sets cuDNN autotuning)
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
    amp_dtype = runtime.autocast_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ctx = train.StepContext(total, device, amp_dtype, scaler, lr_factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    src = random_batch(src_hw, batch, cfg.model.num_classes, device, True, gen)
    tgt = random_batch(tgt_hw, batch, cfg.model.num_classes, device, False, gen) if strategy.needs_target else None

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
# The augmentation probabilities of `data.augment` (the other keys of that section are their parameters).
AUGMENTATIONS = ("hflip", "scale_crop", "color_jitter", "blur", "brightness", "noise", "grayscale")
# Keys that do not change what a run learns: runs differing only in these (and the seed) are one row.
NOT_RESULT_KEYS = ("seed", "name", "train.workers", "train.log_interval", "train.checkpoint_interval",
                   "train.vis_images", "data.source.root", "data.target.root", "data.val.root")
MODEL_NAMES = {"deeplabv2": "DeepLabV2", "bisenet": "BiSeNet"}
BACKBONE_NAMES = {"resnet18": "R18", "resnet101": "R101"}


@dataclass
class Run:
    path: Path
    metrics: dict
    cfg: Config
    benchmark: dict | None  # RUN/benchmark.json, when one was left there

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
    return Run(folder, metrics, cfg, bench)


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
    a = cfg.adapt
    if a.name == "adversarial":
        return f"Adversarial ({'multi' if a.multi_level else 'single'}-level, λ={a.lambda_adv:g})"
    if a.name == "fda":
        return f"FDA (β={a.beta:g})"
    if a.name == "dacs":
        return "DACS"
    return "Source only"


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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs of the same config (up to the seed and bookkeeping keys) and data kind, in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        flat = _flatten(dataclasses.asdict(run.cfg))
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
        flats = [_flatten(dataclasses.asdict(groups[i][0].cfg)) for i in same]
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
            else:
                tables.append(_class_table(key, groups, classes, metric, synthetic))
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
    parser.add_argument("--plot-form", default="eager", metavar="FORM",
                        help="--plot: which timed form's FPS to draw (eager, deploy, onnxruntime, ..., or fastest)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.runs:
            return _main_runs(args)
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


if __name__ == "__main__":
    sys.exit(main())
