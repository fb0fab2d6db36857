"""The GPU check's console lines and the Markdown table docs/benchmarks.md records."""
from __future__ import annotations

from pathlib import Path


def gb(n: int) -> str:
    return f"{n / 2**30:.2f}"


def print_start(env: dict) -> None:
    print(f"gpu-check: torch {env['torch']} on {env['device_name']}"
          + (f" (capability {env['capability'][0]}.{env['capability'][1]}, "
             f"{gb(env['total_memory_bytes'])} GiB)" if "capability" in env else "")
          + f", amp auto = {env['amp_auto']}", flush=True)


def print_data_written(data: dict) -> None:
    print(f"  wrote random-content PNGs in the GTA5 and Cityscapes layouts ({data['write_s']} s)", flush=True)


def print_latency(latency: dict | None, error: str | None) -> None:
    for name, r in (latency or {}).items():
        forms = "  ".join(f"{k} {v['mean_ms']:.2f} ms ({v['fps']:.0f} FPS)" for k, v in r.items()
                          if isinstance(v, dict))
        print(f"  latency {name} {r['size'][0]}x{r['size'][1]} batch 1: {forms}", flush=True)
    if error:
        print(f"  latency FAILED: {error}", flush=True)


def print_config(name: str, entry: dict) -> None:
    if "step_s" in entry:
        fits = entry.get("fits", {})
        line = (f"step {entry['step_s'] * 1e3:7.1f} ms  {entry['images_per_s']:6.1f} img/s  peak "
                f"{gb(entry['peak_memory_bytes'])} GiB  fits 16GB {fits.get('16GB', '-')}, "
                f"24GB {fits.get('24GB', '-')}  (batch {entry['batch_size']}, {entry['amp']})")
    else:
        line = f"step FAILED: {entry['error']}"
    trainer = entry["trainer"]
    line += "  train.py " + ("ok" if trainer["ok"] else f"FAILED: {trainer['error']}")
    print(f"  {name:26s} {line}", flush=True)


def print_fp16(name: str, f: dict) -> None:
    print(f"  {name} under amp fp16: " + (f"step {f['step_s'] * 1e3:.1f} ms, peak "
          f"{gb(f['peak_memory_bytes'])} GiB" if f["ok"] else f"FAILED: {f['error']}"), flush=True)


def print_ddp(d: dict) -> None:
    print(f"  DDP {d['processes']} processes ({d['backend']}): "
          + ("ok" if d["ok"] else f"FAILED: {d['error']}") + f" ({d['wall_s']} s)", flush=True)


def print_end(result: dict, out: Path | None) -> None:
    print("\n" + gpu_check_markdown(result) + "\n")
    print(f"gpu-check {'passed' if result['ok'] else 'FAILED'} in {result['wall_s']} s"
          + (f"; JSON in {out}" if out else ""), flush=True)


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
                     f"{e['images_per_s']:.1f} | {gb(e['peak_memory_bytes'])} | {yes[fits.get('16GB')]} | "
                     f"{yes[fits.get('24GB')]} | {'ok' if e['trainer']['ok'] else 'failed'} |")
    lines += [f"| skipped (time budget) | {', '.join(result['skipped'])} | | | | | | | | |"] if result["skipped"] else []
    return "\n".join(lines)
