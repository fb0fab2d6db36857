"""The GPU check: what a CUDA machine shows before anyone spends hours on it.

Every protocol config trains a few steps at its protocol size and batch with `amp: auto` (step time, images/s,
peak memory, fits 16 / 24 GB), then runs through train.py on random-content PNGs written in the real GTA5 /
Cityscapes layouts; eager vs deploy latency of both models at 512x1024; a 2-process DDP run through torchrun.
Contract: the JSON at `out` is rewritten after each part, so a killed check leaves what it did; one part's
failure is recorded in its entry and never hides the others. docs/benchmarks.md ("GPU check") describes the JSON.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from rtda.bench import reports
from rtda.bench.common import REPO_ROOT, THESIS_SIZE, BenchmarkError, build_model, without_pretrained
from rtda.bench.latency import autocast_context, time_variants
from rtda.bench.train_cost import benchmark_train_step
from rtda.bench.zoo import DEFAULT_CONFIGS as ZOO_CONFIGS
from rtda.config import Config, load_config
from rtda.datasets.fake_layout import write_layout_tree
from rtda.utils.env import environment
from rtda.utils.files import atomic_write_text

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
# the course's two models and every zoo network (rtda/bench/zoo.py), by their supervised Cityscapes config
LATENCY_MODELS = {"bisenet_r18": "cityscapes_bisenet.yaml", "deeplabv2_r101": "cityscapes_deeplabv2.yaml",
                  **{n.removeprefix("cityscapes_"): f"{n}.yaml" for n in ZOO_CONFIGS if n != "cityscapes_bisenet"}}
DDP_CONFIG = "gta5_bisenet_adv.yaml"  # DDP with a strategy-owned optimiser (the discriminator's)
FP16_CONFIG = "gta5_bisenet_adv.yaml"  # also timed under forced fp16: the GradScaler path a T4 takes, on CUDA


def protocol_configs() -> list[Path]:
    """configs/*.yaml: the protocol configs (not configs/synthetic/, not the _base_ pieces)."""
    return sorted((REPO_ROOT / "configs").glob("*.yaml"))


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
    settings.update(teacher_settings(cfg, roots))
    settings.update({"model.pretrained": "none", "train.iters": iters, "train.log_interval": 1,
                     "train.eval_interval": 0, "train.checkpoint_interval": 1000, "train.vis_images": 1})
    if tiny:
        settings.update(_tiny_settings(cfg))
    return [f"{k}={v}" for k, v in settings.items()]


def teacher_settings(cfg: Config, roots: dict) -> dict:
    """distill: its teacher keys pointed at the stand-in `write_standin_teachers` wrote; {} for other strategies."""
    if cfg.adapt.name != "distill":
        return {}
    config, checkpoint = roots["teachers"][cfg.adapt.teacher.config]
    return {"adapt.teacher.config": config, "adapt.teacher.checkpoint": checkpoint}


def write_standin_teachers(folder: Path, configs: list[Path], tiny: bool) -> dict[str, list[str]]:
    """For each teacher config a distill config names: an untrained stand-in under `folder` (the teacher's config,
    model.pretrained none and, with `tiny`, the check's target size; and a state-dict file of its model). The check
    times the student's step, whose cost does not depend on the teacher's weights. {teacher config: [yaml, pt]}."""
    from rtda.config import dump_config
    from rtda.models import build_untrained

    teachers: dict[str, list[str]] = {}
    for path in configs:
        cfg = load_config(path)
        name = cfg.adapt.teacher.config
        if cfg.adapt.name != "distill" or name in teachers:
            continue
        sizes = [f"data.target.size=[{TINY_HW[1]},{TINY_HW[0]}]"] if tiny else []
        teacher_cfg = load_config(REPO_ROOT / name, ["model.pretrained=none", *sizes])
        folder.mkdir(parents=True, exist_ok=True)
        config_file, checkpoint = folder / f"{Path(name).stem}.yaml", folder / f"{Path(name).stem}.pt"
        dump_config(teacher_cfg, config_file)
        torch.save(build_untrained(teacher_cfg.model).state_dict(), checkpoint)
        teachers[name] = [str(config_file), str(checkpoint)]
    return teachers


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
    cfg = load_config(path, [f"{k}={v}" for k, v in teacher_settings(cfg, roots).items()])  # distill: stand-in
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
        overrides = trainer_overrides(load_config(path), roots, trainer_iters, tiny)  # the config's own teacher key
        run_cfg = load_config(path, overrides + ["train.amp=auto"])
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
    """Eager, deploy and deploy under autocast (amp auto's dtype) of every model of LATENCY_MODELS whose config
    exists, batch 1, alternating rounds."""
    from rtda import models
    from rtda.utils.amp import amp_name, autocast_dtype

    amp = autocast_dtype("auto", device)
    out = {}
    for name, config in LATENCY_MODELS.items():
        if not (REPO_ROOT / "configs" / config).is_file():
            continue
        model_cfg = without_pretrained(load_config(REPO_ROOT / "configs" / config).model)
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
        stats = time_variants(forms, calls[1], calls[0])
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
    atomic_write_text(path, json.dumps(result, indent=1))  # a reader (or a killed check) sees a complete version


def _preflight(device: torch.device, tiny: bool) -> None:
    """One-line refusals: no CUDA, protocol sizes on a CPU, no cityscapesscripts."""
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


def _new_result(device: torch.device, tiny: bool) -> dict:
    return {"kind": "gpu-check", "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "tiny": tiny,
            "environment": gpu_environment(device), "fit_rule": FIT_RULE,
            "steps": {"warmup": 0 if tiny else GPU_CHECK_STEPS[0], "timed": 1 if tiny else GPU_CHECK_STEPS[1],
                      "trainer_iterations": 1 if tiny else GPU_CHECK_TRAINER_ITERS},
            "latency": {}, "ddp": None, "configs": {}, "skipped": []}


def _write_data(result: dict, data_dir: Path, configs: list[Path], tiny: bool) -> dict:
    """The random-content trees every train.py run of the check reads; returns their roots."""
    t0 = time.perf_counter()
    stored = TINY_STORED_HW if tiny else STORED_HW
    # enough images for the largest batch of one process, and for the DDP run's 2 per process
    batches = [2 if tiny else load_config(p).train.batch_size for p in configs]
    roots = write_layout_tree(data_dir, max([4, *batches]), 2, stored)
    roots["teachers"] = write_standin_teachers(data_dir / "teachers", configs, tiny)
    result["data"] = {"layouts": "GTA5 images/labels (palettised ids), Cityscapes leftImg8bit/gtFine labelIds",
                      "stored_hw": {k: list(v) for k, v in stored.items()},
                      "write_s": round(time.perf_counter() - t0, 1)}
    reports.print_data_written(result["data"])
    return roots


def _run_latency(result: dict, device: torch.device, tiny: bool) -> None:
    latency, error, log = _quiet_call(lambda: check_latency(device, TINY_HW if tiny else THESIS_SIZE,
                                                            (0, 2) if tiny else GPU_CHECK_LATENCY))
    result["latency"] = latency if latency is not None else {"error": error, "log_tail": log[-1500:]}
    reports.print_latency(latency, error)


def _run_configs(result: dict, out: Path | None, configs: list[Path], device: torch.device, roots: dict,
                 runs_dir: Path, tiny: bool, started: float, budget_s: float) -> None:
    """Each config in turn, until `budget_s` seconds after `started`; the rest are listed as skipped."""
    for path in configs:
        if time.perf_counter() - started > budget_s:
            result["skipped"].append(path.stem)
            continue
        entry = check_config(path, device, roots, runs_dir, tiny, (0, 1) if tiny else GPU_CHECK_STEPS,
                             1 if tiny else GPU_CHECK_TRAINER_ITERS)
        result["configs"][path.stem] = entry
        reports.print_config(path.stem, entry)
        _write_json(out, result)


def _overall_ok(result: dict) -> bool:
    return (all(e["ok"] for e in result["configs"].values()) and bool(result["ddp"]["ok"])
            and result.get("fp16", {"ok": True})["ok"] and "error" not in result["latency"]
            and not result["skipped"])


def gpu_check(out: Path | None, device: torch.device, configs: list[Path] | None = None, tiny: bool = False,
              budget_s: float = GPU_CHECK_BUDGET_S) -> dict:
    """The whole check; the JSON at `out` is rewritten after each part, so a killed check leaves what it did.

    `tiny` (CPU smoke test of this code): TINY_HW everywhere, batch <= 2, 1 step, 2 timed latency calls.
    """
    from rtda.utils.amp import autocast_dtype

    _preflight(device, tiny)
    started = time.perf_counter()
    configs = protocol_configs() if configs is None else configs
    result = _new_result(device, tiny)
    reports.print_start(result["environment"])
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        roots = _write_data(result, tmp / "data", configs, tiny)
        _run_latency(result, device, tiny)
        _write_json(out, result)
        _run_configs(result, out, configs, device, roots, tmp / "runs", tiny, started, budget_s)
        # the fp16 + GradScaler path (what amp auto picks on a T4), with the discriminator's optimiser under it
        if device.type != "cuda" or autocast_dtype("auto", device) != torch.float16:
            result["fp16"] = check_fp16(device, tiny)
            reports.print_fp16(FP16_CONFIG[:-5], result["fp16"])
            _write_json(out, result)
        # last: its own processes, so a crash or hang there cannot cost the configs' numbers
        result["ddp"] = check_ddp(device, roots, tmp / "ddp", tiny)
        reports.print_ddp(result["ddp"])
        _write_json(out, result)
    if result["skipped"]:
        print(f"  not run (time budget of {budget_s:.0f} s spent): {', '.join(result['skipped'])}", flush=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ok"] = _overall_ok(result)
    _write_json(out, result)
    reports.print_end(result, out)
    return result
