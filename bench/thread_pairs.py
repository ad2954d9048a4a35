"""What the model thread's other ways to use a second core cost and give (issue 15).

The worker runs router + classifier at one intra-op thread, so that its study thread
keeps the other core.  When one study at a time arrives, that study thread is idle while
the models run.  Two ways to use that core, each loaded beside the served pair in one
process:

* **a second pair compiled for two threads** (session 28, not built): OpenVINO keeps
  weights and buffers per compiled model, so it stays in memory for the life of the
  process;
* **two inference streams** of one thread each (``[worker] model_streams = 2``): one
  compiled model per graph, its weights shared by the streams, the images of a run two
  at a time.

It prints the resident memory each pair added after its first call, and the time and the
CPU (all the process's threads) of a study of ``--images`` images (one run of that many
images per graph, as the worker calls them; router + classifier on random squares of the
graphs' sizes, the arithmetic does not depend on the pixels), the pairs interleaved round
by round so all see the same load::

    .venv/bin/python bench/thread_pairs.py --rounds 4 [--images 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.registry import load_registry  # noqa: E402
from models.runtime import ServingGraph, load_graph  # noqa: E402

PAIRS = {"served (1 thread)": (1, 1), "2 threads": (2, 1), "2 streams of 1 thread": (1, 2)}
"""Name: (intra-op threads per stream, streams)."""


def rss_mb() -> float:
    """This process's resident memory now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def study_ms(pair: list[ServingGraph], images: int, calls: int, rng: np.random.Generator
             ) -> tuple[float, float]:
    """Milliseconds per study of ``images`` images through every graph of ``pair``: the
    median of ``calls`` studies, and the CPU the process spent per study (every thread,
    OpenVINO's own included: what the study thread's core loses to the models)."""
    xs = [rng.random((calls, images, g.input_size, g.input_size, 1), dtype=np.float32)
          for g in pair]
    times = []
    cpu = time.process_time()
    for i in range(calls):
        start = time.perf_counter()
        for g, x in zip(pair, xs):
            g.run(x[i])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), (time.process_time() - cpu) * 1000 / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=10, help="studies per round and pair")
    p.add_argument("--images", type=int, default=2, help="images per study (the demo's: 1-4)")
    args = p.parse_args()
    registry = load_registry(ROOT / "models" / "registry.toml")
    entries = [registry.get("bodypart-router", role="router"),
               registry.get("fracture-classifier", role="classifier")]
    rng = np.random.default_rng(0)
    rss = {"before": rss_mb()}
    pairs: dict[str, list[ServingGraph]] = {}
    for name, (threads, streams) in PAIRS.items():
        pairs[name] = pair = [load_graph(e, threads=threads, streams=streams) for e in entries]
        study_ms(pair, args.images, 1, rng)  # first call
        rss[name] = rss_mb()
    times: dict[str, list[float]] = {name: [] for name in pairs}
    cpu: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(args.rounds):
        for name, pair in pairs.items():
            wall, spent = study_ms(pair, args.images, args.calls, rng)
            times[name].append(wall)
            cpu[name].append(spent)
    print(f"{' + '.join(f'{e.name} {e.version}' for e in entries)}; a study of {args.images} "
          f"image(s); RSS before loading {rss['before']:.0f} MB")
    previous = rss["before"]
    served = statistics.median(times["served (1 thread)"])
    for name in pairs:
        t = times[name]
        print(f"{name}: median {statistics.median(t):.1f} ms per study "
              f"(rounds {', '.join(f'{v:.1f}' for v in t)}), {statistics.median(t) / served:.2f} "
              f"of the served pair; CPU {statistics.median(cpu[name]):.1f} ms per study "
              f"({statistics.median(cpu[name]) / statistics.median(cpu['served (1 thread)']):.2f}"
              f" of the served pair's); the pair added {rss[name] - previous:.0f} MB")
        previous = rss[name]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
