"""Batch-1 latency of a model's inference variants ("forms" on the command line: `--forms`).

Contract: every variant gets the same random image, is compared with the eager model's logits (max abs
difference, argmax agreement) before timing, and the variants are timed in alternating rounds of one run, so a
change in machine load hits them alike. On CUDA every timed call ends with a synchronisation: latency is the
time until the result exists. docs/benchmarks.md defines the numbers and records them.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rtda.bench.common import BenchmarkError

DEFAULT_ITERS = {"cpu": 20, "cuda": 1000}  # 1000 is the course protocol; fewer on a CPU, where a call is slow
DEFAULT_WARMUP = {"cpu": 3, "cuda": 50}
TIMING_ROUNDS = 5  # eager and deploy alternate this many times
# The INT8 form's calibration: random images fix its scales, not its graph or kernels, so its speed is that of a
# file calibrated on real images; its accuracy is not, hence the label in VARIANT_HELP.
INT8_RANDOM_CALIBRATION = 8


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


# The inference variants of one model that `--forms` can time. Every variant gets the same random image and is
# compared with the eager model's output (max abs difference of the logits, argmax agreement).
VARIANT_HELP = {
    "eager": "the model as trained (eval, no_grad, NCHW float32): the reference",
    "deploy": "models.deploy: no aux heads, BN folded, channels_last, inference_mode (+ --amp / --compile)",
    "compile": "torch.compile of the deploy form",
    "onnxruntime": "the deploy form exported by models.export (fixed shape), ONNX Runtime (CPU, or CUDA provider)",
    "onnxruntime_int8": "that ONNX file quantised to INT8 by models.quantize (static QDQ, per-channel) calibrated "
                        f"on {INT8_RANDOM_CALIBRATION} random images: a timing only (its parity is no accuracy "
                        "figure; `export --int8` calibrates on val images and reports one)",
    "fp16": "the deploy form under float16 autocast (CUDA)",
    "bf16": "the deploy form under bfloat16 autocast (CUDA)",
    "cudagraph": "the deploy form captured once in a CUDA graph and replayed (CUDA)",
    "tensorrt": "the ONNX file in ONNX Runtime's TensorRT provider, fp32 (CUDA, when the provider is present)",
    "tensorrt_fp16": "the same with TensorRT's fp16 kernels allowed",
}
CPU_VARIANTS = ("eager", "deploy", "compile", "onnxruntime", "onnxruntime_int8")
CUDA_VARIANTS = CPU_VARIANTS + ("fp16", "bf16", "cudagraph", "tensorrt", "tensorrt_fp16")


@dataclass
class Variant:
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


def parse_variants(text: str | None, device: torch.device) -> list[str]:
    """`--forms eager,deploy,onnxruntime` (or `all`) -> the list, eager first; unknown or wrong-device names fail."""
    available = CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    if not text:
        return ["eager", "deploy"]
    names = list(available) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in CUDA_VARIANTS:
            raise BenchmarkError(f"--forms {text!r}: unknown form {name!r}; expected some of "
                                 f"{', '.join(CUDA_VARIANTS)} (or all)")
        if name not in available:
            raise BenchmarkError(f"--forms {text!r}: {name!r} is a CUDA form; on CPU the forms are "
                                 f"{', '.join(CPU_VARIANTS)}")
    return ["eager"] + [n for n in dict.fromkeys(names) if n != "eager"]


def build_variants(model: nn.Module, deployed: nn.Module | None, names: list[str], image: torch.Tensor,
                amp: str | None = None, workdir: str | Path | None = None,
                compile_backend: str = "inductor") -> tuple[dict, dict]:
    """Variants `names` of `model` for `image`: ({name: Variant}, {name: reason it was skipped}).

    `deployed` is the deploy form (with --amp / --compile applied to the `deploy` entry only); the other variants
    start from it. `workdir` holds the ONNX file of the ONNX Runtime variants.
    """
    from rtda import models

    device = image.device
    model.eval()
    plain = getattr(deployed, "_orig_mod", deployed)  # under --compile, the deploy form before compilation
    if not hasattr(plain, "graph") and any(n not in ("eager", "deploy") for n in names):
        plain = models.deploy(model)
    last = image.contiguous(memory_format=torch.channels_last)
    variants, skipped = {}, {}
    for name in names:
        if name == "eager":
            variants[name] = Variant(model, image, torch.no_grad)
        elif name == "deploy":
            variants[name] = Variant(deployed if deployed is not None else models.deploy(model), last,
                               cast=lambda: autocast_context(device, amp))
        elif name == "compile":
            variants[name] = Variant(torch.compile(plain.graph(), backend=compile_backend), last)
        elif name in ("fp16", "bf16"):
            variants[name] = Variant(plain, last, cast=lambda dtype=name: autocast_context(device, dtype))
        elif name == "cudagraph":
            variants[name] = Variant(*_cuda_graph(plain.graph(), last, amp))
        elif name in ("onnxruntime", "onnxruntime_int8", "tensorrt", "tensorrt_fp16"):
            variant = _onnxruntime_variant(plain, image, name, Path(workdir or "."))
            if isinstance(variant, str):
                skipped[name] = variant
            else:
                variants[name] = variant
    return variants, skipped


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


def _ort_providers(ort, name: str, device: torch.device, workdir: Path) -> list | str:
    """ONNX Runtime's providers for variant `name` on `device`, best first; a string says why it is skipped."""
    available = ort.get_available_providers()
    if name.startswith("tensorrt"):
        if "TensorrtExecutionProvider" not in available:
            return f"this onnxruntime has no TensorrtExecutionProvider (it has {', '.join(available)})"
        cache = workdir / "trt_cache"
        cache.mkdir(parents=True, exist_ok=True)
        return [("TensorrtExecutionProvider", {"device_id": device.index or 0,
                                               "trt_fp16_enable": name == "tensorrt_fp16",
                                               "trt_engine_cache_enable": True,
                                               "trt_engine_cache_path": str(cache)}),
                "CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            return f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(available)}): pip install onnxruntime-gpu"
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _bound_variant(onnx_model, image: torch.Tensor) -> Variant:
    """CUDA: the input and a preallocated output bound on the device (no host copies in the timed call)."""
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

    return Variant(run, x)


def _onnxruntime_variant(deployed: nn.Module, image: torch.Tensor, name: str, workdir: Path):
    """An ONNX Runtime variant of the deploy form, exported at the image's shape; a string says why it is skipped."""
    from rtda.models.export import ExportError, OnnxModel, export_onnx, require

    try:
        ort = require("onnxruntime", f"--forms {name}")
        require("onnx", f"--forms {name}")
    except ExportError as exc:
        raise BenchmarkError(str(exc)) from None
    providers = _ort_providers(ort, name, image.device, workdir)
    if isinstance(providers, str):
        return providers
    path = workdir / "model.onnx"
    if not path.is_file():
        cpu_copy = copy.deepcopy(deployed).cpu()
        try:
            export_onnx(cpu_copy, path, tuple(image.shape[-2:]))
        except ExportError as exc:
            raise BenchmarkError(f"--forms {name}: {exc}") from None
    if name == "onnxruntime_int8":
        path = _int8_file(path, image)
    try:
        onnx_model = OnnxModel(path, threads=torch.get_num_threads(), providers=providers)
    except ExportError as exc:
        return str(exc)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if onnx_model.providers[0] != wanted:  # ONNX Runtime falls back quietly when a provider cannot start
        return f"ONNX Runtime could not start {wanted} here and fell back to {onnx_model.providers[0]}"
    if image.device.type != "cuda":
        x = image.float().cpu().contiguous().numpy()
        return Variant(onnx_model.run_numpy, x, to_tensor=lambda out: torch.from_numpy(out))
    return _bound_variant(onnx_model, image)


def _int8_file(float_path: Path, image: torch.Tensor) -> Path:
    """The INT8 quantisation of `float_path` next to it, calibrated on INT8_RANDOM_CALIBRATION random images."""
    from rtda.models.export import ExportError
    from rtda.models.quantize import quantize_file

    path = float_path.with_name("model_int8.onnx")
    if not path.is_file():
        generator = torch.Generator().manual_seed(0)
        images = ((torch.rand(1, 3, *image.shape[-2:], generator=generator) * 255).numpy()
                  for _ in range(INT8_RANDOM_CALIBRATION))
        try:
            quantize_file(float_path, path, images, {"calibration_split": "random images (benchmark timing only)"})
        except ExportError as exc:
            raise BenchmarkError(f"--forms onnxruntime_int8: {exc}") from None
    return path


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
        built, skipped = build_variants(model, deployed, names, image, amp, workdir, compile_backend)
        reference = built["eager"].output()
        parity = {}
        for name, variant in built.items():  # the first call of each variant: compiles, plans, checks
            out = variant.output()
            parity[name] = {"max_abs_diff": float((out - reference).abs().max()),
                            "argmax_agreement": float((out.argmax(1) == reference.argmax(1)).double().mean())}
        timed = {name: (f.fn, f.x, f.grad_mode, f.cast) for name, f in built.items()}
        result = time_variants(timed, iters, warmup)
    if "deploy" in result:
        result["speedup"] = result["eager"]["mean_ms"] / result["deploy"]["mean_ms"]
        result["vs_deploy"] = {n: result["deploy"]["mean_ms"] / result[n]["mean_ms"] for n in built}
    result["parity"] = parity
    result["fastest"] = min(built, key=lambda n: result[n]["mean_ms"])
    if skipped:
        result["skipped"] = skipped
    return result


def time_variants(variants: dict, iters: int, warmup: int) -> dict:
    """`variants`: name -> (callable, input, grad-mode context, autocast context factory). The variants take turns
    in TIMING_ROUNDS rounds of about iters / TIMING_ROUNDS calls each; returns name -> latency_stats."""
    rounds = max(1, min(TIMING_ROUNDS, iters))
    chunks = [iters // rounds + (r < iters % rounds) for r in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r, chunk in enumerate(chunks):
        for name, (net, x, grad_mode, cast) in variants.items():
            with grad_mode(), cast():
                times[name] += time_calls(net, x, chunk, warmup if r == 0 else 0)
    return {name: latency_stats(t) for name, t in times.items()}

