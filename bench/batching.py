"""Batch size vs speed and memory of the node's models (ONNX Runtime), side by side.

For each batch size (images per run; each model also runs their mirrors, so the
graphs see twice as many) and with ONNX Runtime's CPU memory arena on and off, a
fresh process loads both graphs as the node does (:meth:`Analyser.load`, or the same
sessions without the arena), analyses real MURA validation images in batches of that
size, and reports the median ms per image and its peak RSS (VmHWM).  Batch 1 with the
arena on, the node's setting before this script, is the reference.  Prints the load
average: the machine is shared.  Usage::

    .venv/bin/python bench/batching.py [--sizes 1,2,4,8,16] [--images 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import csv, json, statistics, sys, time
from pathlib import Path
import numpy as np, cv2
sys.path.insert(0, {root!r})
from models.registry import load_registry
from models.runtime import OnnxGraph, load_graph
from pipeline.classify import Analyser
from pipeline.result import ImageMetadata, NormalisedImage
batch, arena, threads, n = {batch}, {arena}, {threads}, {images}
msk = Path({root!r}).parent / "shared" / "data" / "msk"
rows = [r for r in csv.DictReader((msk / "manifest.csv").open())
        if r["dataset"] == "MURA-v1.1" and r["split"] == "val"][:n]
images = []
for i, r in enumerate(rows):
    p = cv2.imread(str(msk / r["path"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    images.append(NormalisedImage(ImageMetadata("1.2", "1.2.1", f"1.2.1.{{i}}", "1.2.840.10008.5.1.4.1.1.1"),
                                  p, p.shape))
reg = load_registry(Path({root!r}) / "models" / "registry.toml")
r_e, c_e = reg.get("bodypart-router"), reg.get("fracture-classifier")
graphs = [load_graph(e, threads, cpu_memory_arena=arena, runtime="onnxruntime") for e in (r_e, c_e)]
a = Analyser(r_e, c_e, *graphs)
a.warm_up()
a.analyse(images[:batch])
times = []
for start in range(0, len(images) - batch + 1, batch):
    t = time.perf_counter()
    a.analyse(images[start:start + batch])
    times.append((time.perf_counter() - t) * 1000 / batch)
status = {{l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith("Vm")}}
print(json.dumps({{"ms": statistics.median(times), "peak_mb": int(status["VmHWM"]) / 1024}}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| images per batch | arena | median ms/image | peak RSS MB |")
    print("|---|---|---|---|")
    for batch in sizes:
        for arena in (True, False):
            code = _CHILD.format(root=str(ROOT), batch=batch, arena=arena, threads=args.threads,
                                 images=max(args.images, batch * 2))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {batch} | {'on' if arena else 'off'} | {r['ms']:.1f} | {r['peak_mb']:.0f} |",
                  flush=True)
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
