"""Check a GPU machine end to end in one command: the model step, the data path, real training, and
whether a steady-state training step runs without host-device synchronizations.

Run from the repository root, installed or not (no network needed):

    PYTHONPATH=. python scripts/gpu_check.py                        # one CUDA GPU; meant for < 6 min on an H100
    PYTHONPATH=. python scripts/gpu_check.py --device cpu --quick   # the same plumbing at tiny sizes

It writes a photo set (`mbv2 data photos`) into a temporary folder (or uses --data), runs `mbv2 bench
model` (fp32/bf16/fp16 in channels_last, and bf16 under torch.compile), `mbv2 bench data` (workers on all
cores, then JPEGs decoded on the device), `mbv2 bench train` (224 px, bf16, channels_last, batch 256, with
each decode mode) and the sync check (`torch.cuda.set_sync_debug_mode("error")` over steady-state steps),
prints a table and writes every figure to --out as JSON. A part that fails is reported and the rest goes on;
the exit code is 1 when a part failed (a step that synchronizes is a finding, not a failure).

Sync debug mode sees only the synchronizations torch makes. With JPEGs decoded on the device, torchvision's
decode synchronizes nvJPEG's stream in its own C++ code, which the mode cannot see: that check is never
reported as sync-free; it reports how long the host waited in the decode call instead.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mbv2train, installed or not

from mbv2train.bench.common import fmt, markdown_table, say  # noqa: E402
from mbv2train.bench.data import bench_data  # noqa: E402
from mbv2train.bench.model import bench_model, supported_precisions  # noqa: E402
from mbv2train.bench.train import bench_train  # noqa: E402
from mbv2train.config import load_config  # noqa: E402
from mbv2train.data import available_cpus  # noqa: E402
from mbv2train.data.demo import write_photo_dataset  # noqa: E402

# Sizes of the full check and of --quick (which only shows that every part runs). per_class is the least;
# the full check writes enough images for its training steps to stay within one epoch.
FULL = {"classes": 100, "per_class": 1, "data_batches": None, "image_size": 224, "batch_size": 256,
        "width_mult": 1.0, "model_steps": 30, "model_warmup": 10, "train_steps": 300, "train_warmup": 20,
        "sync_steps": 20, "sync_warmup": 10}
QUICK = {"classes": 3, "per_class": 14, "data_batches": 3, "image_size": 32, "batch_size": 8,
         "width_mult": 0.25, "model_steps": 1, "model_warmup": 1, "train_steps": 3, "train_warmup": 1,
         "sync_steps": 2, "sync_warmup": 1}


def config(sizes: dict, device: str, data: Path | None, workers: int, decode: str = "workers"):
    on_gpu = device == "cuda"
    overrides = [f"model.width_mult={sizes['width_mult']}", f"data.image_size={sizes['image_size']}",
                 f"data.val_resize={sizes['image_size']}", f"data.val_crop={sizes['image_size']}",
                 f"data.batch_size={sizes['batch_size']}", f"data.num_workers={workers}", f"data.decode={decode}",
                 f"train.device={device}", f"train.amp={'bf16' if on_gpu else 'none'}", "train.channels_last=true",
                 "train.compile=false"]
    if data is not None:
        overrides.append(f"data.root={data}")
    return load_config(None, overrides)


def run_part(results: dict, name: str, measure) -> None:
    """Run one part; its result, or its error, goes into ``results[name]``."""
    say(f"--- {name}")
    started = time.perf_counter()
    try:
        results[name] = measure()
    except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    results[name]["seconds"] = round(time.perf_counter() - started, 1)


def photo_set(root: Path, sizes: dict, workers: int) -> Path:
    """The photo set, written at ``root``; a folder already there (a photo set or any ImageFolder) is used as
    it is."""
    if root.exists() and any(root.iterdir()):
        say(f"using {root} as it is")
        return root
    # One epoch holds every timed training step: an epoch's start refills the loader, which a real
    # dataset (5,000 steps per ImageNet epoch at batch 256) almost never does.
    steps = sizes["train_steps"] + sizes["train_warmup"]
    per_class = max(sizes["per_class"], math.ceil(steps * sizes["batch_size"] / sizes["classes"]))
    info = write_photo_dataset(root, classes=sizes["classes"], per_class=per_class, val_per_class=1,
                               workers=workers)
    say(f"photo set {'written' if info['created'] else 'reused'}: {root} ({info['train']} train images)")
    return root


def table(results: dict) -> str:
    rows = []
    for row in results.get("model", {}).get("rows", []):
        memory = f", peak {row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else ""
        rows.append([f"bench model: {row['setting']}", row.get("error") or (
            f"train {fmt(row['train_img_per_s'])} img/s, inference {fmt(row['infer_img_per_s'])} img/s{memory}")])
    for name in ("model", "data_workers", "data_device", "train_workers", "train_device"):
        if "error" in results.get(name, {}):
            rows.append([f"bench {name.replace('_', ', decode ')}", results[name]["error"]])
    for part in (results.get(f"data_{decode}", {}) for decode in ("workers", "device")):
        if "img_per_s" in part:
            rows.append([f"bench data: decode {part['decode']}, {part['workers']} workers",
                         f"{fmt(part['img_per_s'])} img/s ({fmt(part['img_per_s_per_worker'])} per worker), "
                         f"reference {fmt(part['reference_img_per_s'])} img/s, ratio {part['ratio']:.2f}x"])
    for part in (results.get(f"train_{decode}", {}) for decode in ("workers", "device")):
        if "img_per_s" in part:
            waited = decode_wait(part)
            rows.append([f"bench train: decode {part['decode']}, {part['amp']}, batch {part['batch_size']}, "
                         f"{part['steps']} steps",
                         f"{fmt(part['img_per_s'])} img/s, waiting for data {part['data_wait_frac']:.1%}"
                         f"{'; ' + waited if waited else ''}: {part['verdict']}"])
    for decode in ("workers", "device"):
        part = results.get(f"sync_{decode}", {})
        if part:
            rows.append([f"sync check: decode {decode}",
                         part.get("error") or part.get("skipped") or sync_verdict(part)])
    return markdown_table(["check", "result"], rows)


def decode_wait(part: dict) -> str:
    """The host's time in the decode call as bench train measured it; "" where it has no figure."""
    ms, share = part.get("decode_wait_ms_per_batch"), part.get("decode_wait_frac")
    if ms is None or share is None:
        return ""
    return f"the host waited {ms:.1f} ms per batch in the decode call ({share:.1%} of the time)"


def sync_verdict(part: dict) -> str:
    if part["sync_error"]:
        return f"FAIL: {part['sync_error']}"
    if not part["unseen_sync"]:
        return "pass: no host-device sync"
    # sync debug mode's silence says nothing about a sync it cannot see: report how long the host waited in it
    return f"not sync-free: {part['unseen_sync']}; " + (
        decode_wait(part) or "the host's wait in the decode call was not measured")


def run_checks(results: dict, sizes: dict, device: torch.device, data: Path, cpus: int, compile: bool) -> None:
    def cfg(decode: str = "workers", root: Path | None = data):
        return config(sizes, device.type, root, cpus if root is not None else 0, decode)

    run_part(results, "model", lambda: bench_model(
        cfg(root=None), device, batch_size=sizes["batch_size"], steps=sizes["model_steps"],
        warmup=sizes["model_warmup"], precisions=supported_precisions(device), memory_formats=["channels_last"],
        compile=compile, compile_only=[("bf16", "channels_last")]))
    for decode in ("workers", "device"):
        run_part(results, f"data_{decode}",
                 lambda decode=decode: bench_data(cfg(decode), batches=sizes["data_batches"]))
    for decode in ("workers", "device"):
        run_part(results, f"train_{decode}", lambda decode=decode: bench_train(
            cfg(decode), steps=sizes["train_steps"], warmup=sizes["train_warmup"]))
    for decode in ("workers", "device"):
        if device.type != "cuda":
            results[f"sync_{decode}"] = {"skipped": "needs a CUDA device"}
            continue
        run_part(results, f"sync_{decode}", lambda decode=decode: bench_train(
            cfg(decode), steps=sizes["sync_steps"], warmup=sizes["sync_warmup"], sync_debug=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every part runs")
    parser.add_argument("--data", type=Path, help="where to write (or find) the photo set, instead of a temporary "
                                                     "folder; or another ImageFolder to measure on")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results (default: %(default)s)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; use --device cpu --quick to check the plumbing")

    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    cpus = available_cpus()
    device = torch.device(args.device)
    results: dict = {"environment": {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU",
        "cpus": cpus, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "quick": args.quick}}
    say(f"gpu_check on {results['environment']['device']}, {cpus} CPUs, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="mbv2-gpu-check-") as tmp:
        data = photo_set(args.data or Path(tmp) / "photos", sizes, cpus)
        run_checks(results, sizes, device, data, cpus, compile=not args.quick and device.type == "cuda")

    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(table(results))
    print(f"total {results['elapsed_s']:.0f} s; results in {args.out}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [name for name, part in results.items() if isinstance(part, dict) and "error" in part]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
