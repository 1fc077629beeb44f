"""Peak memory of one trajectory-matching iteration against syn_steps: unrolled vs constant (TESLA).

    python bench/trajectory_memory.py                       # CPU: resident memory, CIFAR-size ConvNet-3
    python bench/trajectory_memory.py --device cuda         # GPU: peak allocated device memory
    python bench/trajectory_memory.py --steps 10,20,40,80 --batch 20 --json out.json

Each (memory, syn_steps) cell runs in a fresh process: build a ConvNet-3 student (CIFAR size,
3x32x32, 10 classes), a random expert segment and ``ipc`` x 10 synthetic images, then run one
iteration (:func:`condense.methods.trajectory.matched_gradient`) and report its peak memory: on a CPU the
process's peak resident set size, from the moment before the iteration (``/proc/self/clear_refs``
resets the high-water mark) and the growth over the resident size just before it; on CUDA
``torch.cuda.max_memory_allocated``. Also the iteration's seconds, and the two modes' gradients'
relative difference (they must agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(memory: str, steps: int, batch: int, ipc: int, device_name: str) -> dict:
    import torch

    from condense.config import DSAConfig
    from condense.methods.trajectory import Segment, draw_steps, matched_gradient
    from condense.models import ConvNet, FlatParams

    torch.manual_seed(0)
    device = torch.device(device_name)
    net = FlatParams(ConvNet(3, 10, 32).to(device))
    start = net.flatten()
    target = start + 0.01 * torch.randn_like(start)
    images = torch.randn(10 * ipc, 3, 32, 32, device=device, requires_grad=True)
    labels = torch.arange(10, device=device).repeat_interleave(ipc)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    plan = draw_steps(len(images), steps, batch, torch.Generator().manual_seed(1))
    segment = Segment(net, start, target, plan, DSAConfig())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (VmHWM)
        before = _status_kib("VmRSS") * 1024
    started = time.perf_counter()
    loss = matched_gradient(segment, images, labels, lr, memory)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - started
    out = Path(f"/tmp/condense-memory-{memory}-{steps}.pt")
    torch.save({"images": images.grad.cpu(), "lr": lr.grad.cpu()}, out)
    return {
        "memory": memory,
        "syn_steps": steps,
        "peak_bytes": peak,
        "growth_bytes": peak - before,
        "seconds": seconds,
        "loss": float(loss),
        "grads": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default="10,20,40,80")
    parser.add_argument("--batch", type=int, default=20, help="synthetic images per inner step (batch_syn)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("MEMORY", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch, args.ipc, args.device)))
        return

    import torch

    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for memory in ("unrolled", "constant"):
            command = [sys.executable, __file__, "--child", memory, str(steps), "--batch", str(args.batch)]
            command += ["--ipc", str(args.ipc), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{memory:9} {steps:3} steps: {rows[-1]['peak_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    kind = "peak allocated" if args.device.startswith("cuda") else "peak resident"
    print(
        f"\nOne iteration, ConvNet-3, 3x32x32, {10 * args.ipc} images, batch_syn {args.batch}, {args.device}"
    )
    print(
        f"syn_steps  unrolled {kind} (growth)    constant {kind} (growth)    s unrolled/constant  grad diff"
    )
    by = {(r["memory"], r["syn_steps"]): r for r in rows}
    for steps in sorted({r["syn_steps"] for r in rows}):
        u, c = by["unrolled", steps], by["constant", steps]
        gu, gc = torch.load(u["grads"]), torch.load(c["grads"])
        diff = ((gu["images"] - gc["images"]).norm() / gu["images"].norm()).item()
        u["grad_relative_difference"] = c["grad_relative_difference"] = diff
        print(
            f"{steps:9}  {u['peak_bytes'] / 2**20:10.1f} MiB ({u['growth_bytes'] / 2**20:7.1f})"
            f"       {c['peak_bytes'] / 2**20:10.1f} MiB ({c['growth_bytes'] / 2**20:7.1f})"
            f"       {u['seconds']:6.2f} / {c['seconds']:6.2f}      {diff:.1e}"
        )
    constant = [by["constant", s]["peak_bytes"] for s in sorted({r["syn_steps"] for r in rows})]
    spread = max(constant) / min(constant) - 1
    print(f"\nconstant: peak varies by {spread:.1%} across syn_steps (goal: within 10%)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"rows": rows, "constant_spread": spread, "device": args.device}, indent=2)
        )


if __name__ == "__main__":
    main()
