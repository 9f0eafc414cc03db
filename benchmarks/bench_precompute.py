"""Time the demo precompute: cold (empty cache, Gemma GGUF conversion included), warm (all cached),
extraction throughput batched vs a naive one-item-at-a-time loop, and the Ray engine beside the
local one (issue 12) with a projection of the paper's setting.

The cold and warm runs are real `python -m convergence_core precompute --preset demo` processes
(interpreter start and imports included) with ``CONVERGENCE_CACHE`` pointing at a fresh temporary
folder, exactly what `make demo` does on a new checkout. Per-model numbers come from the run's
manifest (load time, extraction time, items/s). Prints a table and writes
benchmarks/results/precompute.json.

    .venv/bin/python benchmarks/bench_precompute.py [--naive-items 48] [--repeats 3] [--cache DIR]
    .venv/bin/python benchmarks/bench_precompute.py --engines-only [--engine-items 239]

Targets (issue 4): cold <= 180 s, warm <= 10 s on the 2-core CPU machine.

Engines (issue 12; ``--engines-only`` runs just this part, results/precompute_engines.json): each
model over the demo images (or captions) on the local engine (one process, torch's threads) and on
the Ray engine (a local Ray instance, each ``--ray-layouts`` entry: actors x CPUs per actor; 1x2 runs the same
threads as the local engine, 2x1 two single-thread actors), same batch size. Reported:
images/s per model, in steady state (local: after the model is loaded; Ray: each actor from its
model loaded to the last shard written, averaged over the actors, so that an actor still loading
its model while another works is start-up, not overhead; the window from the first actor ready is
reported beside it) and end to end (load included; Ray: actor start + load), the engine's overhead
(steady-state time per item Ray / local - 1; target <= 20 % on 2 CPUs), max |difference| between
the engines, Ray's start-up time, and a projection of the paper's setting
(configs/paper-wit1024.toml: 4 ViTs x 10 LLMs, over WIT-1024 and a 100k set) from the measured
cost per GFLOP (see ``_projection`` for every assumption).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import machine, write_results  # noqa: E402
from convergence_core import settings  # noqa: E402

COLD_TARGET_S = 180.0
WARM_TARGET_S = 10.0


def _precompute_process(cache: Path) -> tuple[float, str]:
    env = {
        **os.environ,
        "CONVERGENCE_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "convergence_core", "precompute", "--preset", "demo", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"precompute failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout.strip()


def _throughput(cache: Path, n_items: int, repeats: int) -> list[dict]:
    """Batched (32) vs naive (1 per call) extract_embeddings on the same items; same outputs.

    Each is timed ``repeats`` times, alternating, and the fastest time is kept."""
    os.environ["CONVERGENCE_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from convergence_core.datasets import load_dataset
    from convergence_core.extract import extract_embeddings
    from convergence_core.models import load_encoder

    dataset = load_dataset(settings.demo_data_root())
    paths = [dataset.root / rel for rel in dataset.stimuli["image"][:n_items]]
    captions = [caps[0] for caps in dataset.stimuli["captions"][:n_items]]
    rows = []
    for model, items, unit in (
        ("efficientnet-lite0", paths, "images"),
        ("efficientnet-lite2", paths, "images"),
        ("minilm", captions, "captions"),
        ("gemma-3-270m", captions, "captions"),
    ):
        encoder = load_encoder(model)
        layer = encoder.default_layer
        extract_embeddings(encoder, items[:2], batch_size=2, layers=[layer])  # warm-up
        timings: dict[str, float] = {"batched": float("inf"), "naive": float("inf")}
        outputs = {}
        for _ in range(repeats):  # alternate, keep the best of each: the machine is shared
            for label, batch_size in (("batched", 32), ("naive", 1)):
                started = time.perf_counter()
                outputs[label] = extract_embeddings(
                    encoder, items, batch_size=batch_size, layers=[layer]
                )
                timings[label] = min(timings[label], time.perf_counter() - started)
        difference = float(np.max(np.abs(outputs["batched"][layer] - outputs["naive"][layer])))
        rows.append(
            {
                "model": model,
                "unit": unit,
                "items": len(items),
                "batched_per_s": len(items) / timings["batched"],
                "naive_per_s": len(items) / timings["naive"],
                "speedup": timings["naive"] / timings["batched"],
                "max_abs_difference": difference,
            }
        )
        del encoder
    return rows


ENGINE_MODELS = ("efficientnet-lite0", "efficientnet-lite2", "minilm")
OVERHEAD_TARGET = 0.20

#: the paper's models for the projection: (name, parameters, tokens per item). Forward FLOPs per
#: item ~ 2 x parameters x tokens (a transformer's matmuls). ViTs: 224 px / patch 14 -> 256
#: patches + CLS = 257 tokens. Parameter counts are the published ones.
PAPER_VITS = (
    ("vit_huge_patch14_224.mae", 632e6, 257),
    ("vit_giant_patch14_dinov2.lvd142m", 1136e6, 257),
    ("vit_huge_patch14_clip_224.laion2b", 632e6, 257),
    ("vit_huge_patch14_clip_224.laion2b_ft_in12k", 632e6, 257),
)
#: parameter counts of the paper's LLMs; the projection takes the models of
#: configs/paper-wit1024.toml (its 4 ViTs and 10 LLMs)
LLM_PARAMETERS = (
    ("bigscience/bloom-560m", 0.56e9),
    ("bigscience/bloom-1b1", 1.07e9),
    ("bigscience/bloom-1b7", 1.72e9),
    ("bigscience/bloom-3b", 3.0e9),
    ("bigscience/bloom-7b1", 7.07e9),
    ("openlm-research/open_llama_3b", 3.4e9),
    ("openlm-research/open_llama_7b", 6.7e9),
    ("openlm-research/open_llama_13b", 13.0e9),
    ("huggyllama/llama-7b", 6.7e9),
    ("huggyllama/llama-13b", 13.0e9),
    ("huggyllama/llama-30b", 32.5e9),
    ("huggyllama/llama-65b", 65.2e9),
)
PAPER_CONFIG = ROOT / "configs" / "paper-wit1024.toml"


def _paper_models() -> tuple[list[tuple[str, float, int]], list[tuple[str, float]]]:
    """(ViTs, LLMs) of the paper's config with their parameters (and ViT tokens)."""
    import tomllib

    config = tomllib.loads(PAPER_CONFIG.read_text(encoding="utf-8"))
    vits = {name: (name, p, t) for name, p, t in PAPER_VITS}
    llms = dict(LLM_PARAMETERS)
    return (
        [vits[name] for name in config["vision_models"]],
        [(name, llms[name]) for name in config["language_models"]],
    )


#: assumed sustained GPU throughput for the projection (no GPU was measured here): 40 % (large
#: batches, compute bound) and 10 % (short captions, bandwidth bound) of an A100's dense bfloat16
#: peak of 312 TFLOP/s; weights read at 2 GB/s per model load
GPU_PEAK_FLOPS = 312e12
GPU_UTILISATION = (0.4, 0.1)
LOAD_BYTES_PER_S = 2e9


def _flops_per_item(encoder, sample) -> float:
    """Measured forward FLOPs of one item (torch's FLOP counter: matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from convergence_core.extract import extract_embeddings

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        extract_embeddings(encoder, [sample], batch_size=1)
    return float(counter.get_total_flops())


def _layouts(text: str) -> list[tuple[int, int]]:
    """``"2x1,1x2"`` -> [(2 actors, 1 CPU each), (1 actor, 2 CPUs)]."""
    out = []
    for part in text.split(","):
        actors, _, cpus = part.strip().partition("x")
        out.append((int(actors), int(cpus)))
    return out


def _engine_comparison(n_items: int, layouts: list[tuple[int, int]], batch_size: int) -> dict:
    """Every model of ENGINE_MODELS on the local engine and on Ray in each layout (actors x CPUs
    per actor; torch in an actor uses that many threads); see the module docstring."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from convergence_core.datasets import load_dataset
    from convergence_core.engines import EngineOptions, LocalEngine, make_job
    from convergence_core.models import load_encoder
    from convergence_core.ray_engine import RayEngine

    dataset = load_dataset(settings.demo_data_root())
    stimuli = dataset.stimuli.iloc[:n_items].reset_index(drop=True)
    started = time.perf_counter()
    engines = [
        RayEngine(EngineOptions(engine="ray", concurrency=actors, num_cpus=cpus))
        for actors, cpus in layouts
    ]
    engines[0].start()  # the first owns the local Ray instance; the others share it
    ray_start_s = time.perf_counter() - started
    rows = []
    try:
        for model in ENGINE_MODELS:
            modality = "language" if model == "minilm" else "vision"
            job = make_job(model, modality, stimuli, dataset.root, batch_size=batch_size)
            begun = time.perf_counter()
            local = LocalEngine().extract(job)
            local_t = {
                "end_to_end_s": time.perf_counter() - begun,
                "load_s": local.load_seconds,
                "working_s": local.extract_seconds,  # after the model is loaded
                "steady_items_per_s": job.items_count / local.extract_seconds,
            }
            encoder = load_encoder(model)
            flops = _flops_per_item(encoder, job.items[0])
            del encoder
            for (actors, cpus), engine in zip(layouts, engines, strict=True):
                begun = time.perf_counter()
                remote = engine.extract(job)
                # steady state: each actor from its own ready (model loaded) to the last shard
                # written, averaged over the actors; the window from the first actor ready also
                # holds the time a second actor was still loading its model (ready_spread_s)
                stats = remote.stats
                working = stats["actor_ready_seconds"] / stats["actors_ready"]
                busy = stats["actor_busy_seconds"] / actors
                ray_t = {
                    "end_to_end_s": time.perf_counter() - begun,
                    "load_s": remote.load_seconds,
                    "working_s": working,
                    "steady_items_per_s": job.items_count / working,
                    "window_s": stats["compute_seconds"],
                    "window_items_per_s": job.items_count / stats["compute_seconds"],
                    "ready_spread_s": stats["ready_spread_seconds"],
                    "busy_items_per_s": job.items_count / busy,  # the actors' own time
                }
                keys = list(local.arrays)
                difference = max(
                    float(np.max(np.abs(local.arrays[k] - remote.arrays[k]))) for k in keys
                )
                scale = max(float(np.max(np.abs(local.arrays[k]))) for k in keys)
                rows.append(
                    {
                        "model": model,
                        "unit": "images" if modality == "vision" else "captions",
                        "items": job.items_count,
                        "layers": len(local.layers),
                        "layout": f"{actors}x{cpus}",
                        "local": local_t,
                        "ray": ray_t,
                        "ray_shards": remote.stats["shards"],
                        "steady_overhead": local_t["steady_items_per_s"]
                        / ray_t["steady_items_per_s"]
                        - 1,
                        "window_overhead": local_t["steady_items_per_s"]
                        / ray_t["window_items_per_s"]
                        - 1,
                        "end_to_end_overhead": ray_t["end_to_end_s"] / local_t["end_to_end_s"] - 1,
                        "max_abs_difference": difference,
                        "max_difference_relative_to_max_abs": difference / scale,
                        "gflops_per_item": flops / 1e9,
                        "local_gflops_per_s": flops * local_t["steady_items_per_s"] / 1e9,
                    }
                )
    finally:
        for engine in engines[::-1]:
            engine.close()
    return {
        "ray_start_s": ray_start_s,
        "layouts": [f"{a}x{c}" for a, c in layouts],
        "batch_size": batch_size,
        "rows": rows,
    }


def _projection(engines: dict, caption_tokens: float) -> dict:
    """The paper's setting from the measured costs: FLOPs per item (2 x params x tokens) divided
    by the throughput measured here for a transformer (MiniLM, local engine, GFLOP/s on this
    machine) for CPU-hours, and by GPU_SUSTAINED_FLOPS (assumed) for GPU-hours; plus model loads
    (bytes at LOAD_BYTES_PER_S, bfloat16) and the Ray engine's measured steady-state overhead."""
    minilm = next(r for r in engines["rows"] if r["model"] == "minilm")  # any layout: same local
    cpu_flops = minilm["local_gflops_per_s"] * 1e9
    overhead = max(0.0, float(np.nanmedian([r["steady_overhead"] for r in engines["rows"]])))
    paper_vits, paper_llms = _paper_models()
    vit_flops = sum(2 * p * t for _, p, t in paper_vits)
    llm_flops = sum(2 * p * caption_tokens for _, p in paper_llms)
    load_s = sum(2 * p for _, p, *_ in (*paper_vits, *paper_llms)) / LOAD_BYTES_PER_S
    settings_out = []
    for label, n in (("WIT-1024", 1024), ("100k", 100_000)):
        total = n * (vit_flops + llm_flops)
        row = {
            "setting": label,
            "n_stimuli": n,
            "total_pflop": total / 1e15,
            "cpu_hours_this_machine": total / cpu_flops * (1 + overhead) / 3600,
            "vit_share": n * vit_flops / total,
        }
        for share in GPU_UTILISATION:
            compute_s = total / (share * GPU_PEAK_FLOPS) * (1 + overhead)
            row[f"gpu_hours_at_{round(100 * share)}pct"] = (compute_s + load_s) / 3600
            # 8 actors (one GPU each) split the items; each loads every model itself
            row[f"wall_hours_8_gpus_at_{round(100 * share)}pct"] = (compute_s / 8 + load_s) / 3600
        settings_out.append(row)
    return {
        "assumptions": {
            "flops_per_item": "2 x parameters x tokens",
            "vit_tokens": 257,
            "caption_tokens_measured_on_coco_mini": caption_tokens,
            "gpu_peak_tflops": GPU_PEAK_FLOPS / 1e12,
            "gpu_utilisation": list(GPU_UTILISATION),
            "model_load_seconds_total": load_s,
            "load_bytes_per_s": LOAD_BYTES_PER_S,
            "ray_steady_overhead_applied": overhead,
            "cpu_gflops_per_s_measured_minilm": cpu_flops / 1e9,
            "config": str(PAPER_CONFIG.relative_to(ROOT)),
            "vits": [name for name, *_ in paper_vits],
            "llms": [name for name, _ in paper_llms],
        },
        "settings": settings_out,
    }


def _caption_tokens() -> float:
    from convergence_core.datasets import load_dataset
    from convergence_core.models import load_encoder

    encoder = load_encoder("minilm")
    captions = [caps[0] for caps in load_dataset(settings.demo_data_root()).stimuli["captions"]]
    ids = encoder.tokenizer(captions, padding=False)["input_ids"]
    return float(np.mean([len(t) for t in ids]))


def _print_engines(engines: dict, projection: dict) -> None:
    print(
        f"engines: local (1 process, torch's threads) vs Ray (layouts actors x CPUs per actor: "
        f"{', '.join(engines['layouts'])}), batch {engines['batch_size']}; Ray start-up "
        f"{engines['ray_start_s']:.1f} s (once per run)"
    )
    print(
        f"{'model':<20} {'ray':>4} {'items':>5} {'local/s':>8} {'ray/s':>8} {'busy/s':>7} "
        f"{'overhead':>9} {'window':>7} {'spread s':>8} {'local e2e s':>11} {'ray e2e s':>9} "
        f"{'max|diff|':>9}"
    )
    for r in engines["rows"]:
        print(
            f"{r['model']:<20} {r['layout']:>4} {r['items']:>5} "
            f"{r['local']['steady_items_per_s']:>8.1f} "
            f"{r['ray']['steady_items_per_s']:>8.1f} {r['ray']['busy_items_per_s']:>7.1f} "
            f"{100 * r['steady_overhead']:>8.0f}% {100 * r['window_overhead']:>6.0f}% "
            f"{r['ray']['ready_spread_s']:>8.2f} "
            f"{r['local']['end_to_end_s']:>11.1f} {r['ray']['end_to_end_s']:>9.1f} "
            f"{r['max_abs_difference']:>9.1e}"
        )
    print(
        "  local/s: items / extraction time after the model is loaded; ray/s: items / (each "
        "actor's time from its model loaded to the last shard written, mean over the actors); "
        "busy/s: items / actors' own time per actor; overhead: local/s / ray/s - 1; window: the "
        "same from the first actor ready, which also counts the other actors' model loads "
        "(spread: last actor ready - first); e2e: the whole call (Ray: actor start + load)"
    )
    for layout in engines["layouts"]:
        worst = max(r["steady_overhead"] for r in engines["rows"] if r["layout"] == layout)
        print(
            f"  steady-state overhead {layout}, worst model: {100 * worst:.0f} %   target <= "
            f"{100 * OVERHEAD_TARGET:.0f} %   {'OK' if worst <= OVERHEAD_TARGET else 'OVER'}"
        )
    a = projection["assumptions"]
    print()
    print(
        f"projection: {len(a['vits'])} ViTs x {len(a['llms'])} LLMs; "
        f"{a['caption_tokens_measured_on_coco_mini']:.1f} tokens/caption; CPU "
        f"{a['cpu_gflops_per_s_measured_minilm']:.1f} GFLOP/s measured (MiniLM); GPU "
        f"{a['gpu_peak_tflops']:.0f} TFLOP/s peak at 40 % / 10 % (assumed); loads "
        f"{a['model_load_seconds_total'] / 60:.0f} min"
    )
    print(
        f"{'setting':<10} {'PFLOP':>8} {'CPU h (here)':>13} {'GPU h 40%':>10} {'GPU h 10%':>10} "
        f"{'8 GPUs h 10%':>13}"
    )
    for row in projection["settings"]:
        print(
            f"{row['setting']:<10} {row['total_pflop']:>8.1f} "
            f"{row['cpu_hours_this_machine']:>13.0f} {row['gpu_hours_at_40pct']:>10.2f} "
            f"{row['gpu_hours_at_10pct']:>10.2f} {row['wall_hours_8_gpus_at_10pct']:>13.2f}"
        )


def _run_engines(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    engines = _engine_comparison(args.engine_items, _layouts(args.ray_layouts), args.engine_batch)
    projection = _projection(engines, _caption_tokens())
    load_after = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} "
        "after (shared machine: compare the two engines within this run)"
    )
    _print_engines(engines, projection)
    results = {
        "machine": machine(
            gpu="none (CPU only; the GPU path was tested on CPU)",
            load_average_1min_before_after=[load_before[0], load_after[0]],
        ),
        "engines": engines,
        "overhead_target": OVERHEAD_TARGET,
        "projection": projection,
    }
    print()
    write_results(args.engines_out, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--naive-items", type=int, default=48, help="items in the throughput test")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per throughput cell (best kept)"
    )
    parser.add_argument("--cache", help="use this (empty or absent) folder instead of a temp one")
    parser.add_argument(
        "--engines-only", action="store_true", help="only the local vs Ray engine comparison"
    )
    parser.add_argument("--skip-engines", action="store_true", help="no engine comparison")
    parser.add_argument("--engine-items", type=int, default=239, help="demo stimuli per model")
    parser.add_argument("--engine-batch", type=int, default=32, help="batch size, both engines")
    parser.add_argument(
        "--ray-layouts",
        default="2x1,1x2",
        help="Ray layouts, ACTORSxCPUS comma-separated (default 2x1,1x2: both use the 2 CPUs)",
    )
    parser.add_argument(
        "--engines-out", default="precompute_engines.json", help="file under benchmarks/results"
    )
    args = parser.parse_args()
    if args.engines_only:
        _run_engines(args)
        return

    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"{cache} is not empty; the cold run needs an empty cache")
    load_before = os.getloadavg()
    try:
        cold_s, summary = _precompute_process(cache)
        warm_s, _ = _precompute_process(cache)
        manifest = json.loads((cache / "runs" / "demo" / "manifest.json").read_text())
        per_model = [
            {
                "model": name,
                "modality": entry["modality"],
                "items": entry["items"],
                "load_s": entry["load_seconds"],
                "extract_s": entry["extract_seconds"],
                "items_per_s": entry["items_per_second"],
                "layers": len(entry["layers"]),
            }
            for name, entry in manifest["models"].items()
        ]
        throughput = _throughput(cache, args.naive_items, args.repeats)
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)

    load_after = os.getloadavg()
    print(
        f"demo precompute (239 COCO images, 3 vision + 2 language models), {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after (shared machine)"
    )
    print(
        f"  cold (empty cache, incl. Gemma conversion): {cold_s:7.1f} s   target <= {COLD_TARGET_S:.0f} s"
        f"   {'OK' if cold_s <= COLD_TARGET_S else 'OVER'}"
    )
    print(
        f"  warm (everything cached):                   {warm_s:7.1f} s   target <= {WARM_TARGET_S:.0f} s"
        f"   {'OK' if warm_s <= WARM_TARGET_S else 'OVER'}"
    )
    print(f"  {summary}")
    print()
    print(
        f"{'model':<20} {'items':>6} {'layers':>6} {'load s':>8} {'extract s':>10} {'items/s':>9}"
    )
    for row in per_model:
        print(
            f"{row['model']:<20} {row['items']:>6} {row['layers']:>6} {row['load_s']:>8.1f} "
            f"{row['extract_s']:>10.1f} {row['items_per_s']:>9.1f}"
        )
    print("  (gemma-3-270m load_s includes the one-time GGUF -> safetensors conversion)")
    print()
    print(
        f"{'extraction':<20} {'unit':<9} {'n':>4} {'batched/s':>10} {'naive/s':>9} "
        f"{'speedup':>8} {'max|diff|':>10}"
    )
    for row in throughput:
        print(
            f"{row['model']:<20} {row['unit']:<9} {row['items']:>4} {row['batched_per_s']:>10.1f} "
            f"{row['naive_per_s']:>9.1f} {row['speedup']:>7.2f}x {row['max_abs_difference']:>10.2e}"
        )

    results = {
        "machine": machine(load_average_1min_before_after=[load_before[0], load_after[0]]),
        "cold_seconds": cold_s,
        "warm_seconds": warm_s,
        "cold_target_seconds": COLD_TARGET_S,
        "warm_target_seconds": WARM_TARGET_S,
        "summary_line": summary,
        "per_model": per_model,
        "throughput_batched_vs_naive": throughput,
        "throughput_repeats": args.repeats,
    }
    print()
    write_results("precompute.json", results)
    if not args.skip_engines:
        print()
        _run_engines(args)


if __name__ == "__main__":
    main()
