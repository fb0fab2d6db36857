"""`benchmark.py zoo`: every network's parameters, FLOPs and latency in its forms, timed together in one run.

All (network, form) pairs take turns in the same alternating rounds (`time_variants`), so the ratios between them
hold on a loaded machine where absolute times drift. The first config is the reference of the ratio column.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from rtda.bench.common import REPO_ROOT, BenchmarkError, build_model, model_label, without_pretrained
from rtda.bench.latency import build_variants, time_variants
from rtda.config import load_config
from rtda.models.complexity import count_flops

# the supervised Cityscapes config of each network: the reference (BiSeNet-R18, the course's network) first
DEFAULT_CONFIGS = ("cityscapes_bisenet", "cityscapes_bisenetv2", "cityscapes_stdc1", "cityscapes_stdc2",
                   "cityscapes_ddrnet23_slim", "cityscapes_ddrnet23", "cityscapes_pidnet_s", "cityscapes_pidnet_m")


def default_configs() -> list[Path]:
    """The DEFAULT_CONFIGS that exist in configs/ (DeepLabV2 is left out: not a real-time network)."""
    return [p for p in (REPO_ROOT / "configs" / f"{n}.yaml" for n in DEFAULT_CONFIGS) if p.is_file()]


def benchmark_zoo(configs: list[Path], size: tuple[int, int], device: torch.device, iters: int, warmup: int,
                  forms: list[str]) -> dict:
    """{"rows": [{label, config, params_m, gmacs, parity, skipped}], "latency": {label: {form: stats}}} for the
    models of `configs` at `size`, every (model, form) timed in the same alternating rounds."""
    from rtda import models

    if not configs:
        raise BenchmarkError("benchmark.py zoo: no config to measure (--configs, or configs/cityscapes_<net>.yaml)")
    rows, variants = [], {}
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device) * 255
    with tempfile.TemporaryDirectory(prefix="benchmark-zoo-") as workdir:
        for path in configs:
            cfg = load_config(path)
            model = build_model(without_pretrained(cfg.model), str(path)).to(device).eval()
            label = model_label(cfg.model)
            if any(r["label"] == label for r in rows):  # the same network twice: its configs tell them apart
                label += f" ({cfg.name})"
            deployed = models.deploy(model)
            built, skipped = build_variants(model, deployed, forms, image, workdir=Path(workdir) / str(len(rows)))
            reference = built["eager"].output()
            parity = {}
            for form, variant in built.items():
                out = variant.output()
                parity[form] = float((out.argmax(1) == reference.argmax(1)).double().mean())
            flops = count_flops(model, torch.zeros(1, 3, *size, device=device))
            rows.append({"label": label, "config": str(path), "params_m": sum(p.numel() for p in
                                                                               deployed.parameters()) / 1e6,
                         "gmacs": flops["gmacs"], "parity": parity, "skipped": skipped})
            variants.update({(label, form): (v.fn, v.x, v.grad_mode, v.cast) for form, v in built.items()})
        timed = time_variants(variants, iters, warmup)
    latency: dict = {}
    for (label, form), stats in timed.items():
        latency.setdefault(label, {})[form] = stats
    return {"size": list(size), "device": str(device), "forms": forms, "iters": iters, "rows": rows,
            "latency": latency}


def format_zoo(result: dict) -> str:
    """The markdown table: params, MACs, mean latency per form, and each eager time as a ratio to the first row."""
    forms, rows, latency = result["forms"], result["rows"], result["latency"]
    reference = latency[rows[0]["label"]]["eager"]["mean_ms"]
    h, w = result["size"]
    lines = [f"| Network | Params (M, deploy) | G MACs at {h}x{w} | "
             + " | ".join(f"{f} (ms)" for f in forms) + f" | eager vs {rows[0]['label']} |",
             "|---|" + "---:|" * (len(forms) + 3)]
    for row in rows:
        times = latency[row["label"]]
        cells = [f"{times[f]['mean_ms']:.1f}" if f in times else "skipped" for f in forms]
        lines.append(f"| {row['label']} | {row['params_m']:.2f} | {row['gmacs']:.1f} | " + " | ".join(cells)
                     + f" | {times['eager']['mean_ms'] / reference:.2f}x |")
    skipped = [f"{r['label']} {form}: {why}" for r in rows for form, why in r["skipped"].items()]
    agreement = min((v for r in rows for v in r["parity"].values()), default=1.0)
    lines.append(f"\n{result['device']}, batch 1, {result['iters']} timed calls per form in alternating rounds; "
                 f"argmax agreement of every form with eager >= {agreement:.4f}"
                 + ("; skipped: " + "; ".join(skipped) if skipped else ""))
    return "\n".join(lines)
