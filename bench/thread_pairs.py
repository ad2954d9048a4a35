"""What a second compiled pair of graphs would cost and give (issue 15, the trickle).

The worker runs router + classifier at one intra-op thread, so that its study thread
keeps the other core.  When one study at a time arrives, that study thread is idle while
the models run, and a pair compiled for two threads would finish sooner; OpenVINO keeps
weights and buffers per compiled model, so the pair also stays in memory for the life
of the process.  This loads the served pair at one thread, then the same pair at two
threads beside it, in one process, and prints the resident memory after each pair's
first call and the time per image (batch 1, router + classifier on random squares of
the graphs' sizes; the arithmetic does not depend on the pixels), the two pairs
interleaved round by round so both see the same load.

    .venv/bin/python bench/thread_pairs.py --rounds 4
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


def rss_mb() -> float:
    """This process's resident memory now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def per_image_ms(pair: list[ServingGraph], calls: int, rng: np.random.Generator) -> float:
    """Milliseconds per image for ``calls`` images through every graph of ``pair``."""
    xs = [rng.random((calls, 1, g.input_size, g.input_size, 1), dtype=np.float32) for g in pair]
    start = time.perf_counter()
    for i in range(calls):
        for g, x in zip(pair, xs):
            g.run(x[i])
    return (time.perf_counter() - start) / calls * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=10, help="images per round and pair")
    args = p.parse_args()
    registry = load_registry(ROOT / "models" / "registry.toml")
    entries = [registry.get("bodypart-router", role="router"),
               registry.get("fracture-classifier", role="classifier")]
    rng = np.random.default_rng(0)
    rss = {"before": rss_mb()}
    pairs: dict[str, list[ServingGraph]] = {}
    for threads in (1, 2):
        pairs[f"{threads} thread(s)"] = pair = [load_graph(e, threads=threads) for e in entries]
        per_image_ms(pair, 1, rng)  # first call
        rss[f"{threads} thread(s)"] = rss_mb()
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(args.rounds):
        for name, pair in pairs.items():
            times[name].append(per_image_ms(pair, args.calls, rng))
    print(f"{' + '.join(f'{e.name} {e.version}' for e in entries)}; RSS before loading "
          f"{rss['before']:.0f} MB")
    previous = rss["before"]
    for name in pairs:
        t = times[name]
        print(f"pair at {name}: median {statistics.median(t):.1f} ms per image "
              f"(rounds {', '.join(f'{v:.1f}' for v in t)}); RSS {rss[name]:.0f} MB "
              f"(+{rss[name] - previous:.0f} MB)")
        previous = rss[name]
    one, two = (statistics.median(times[n]) for n in pairs)
    print(f"ratio two threads / one: {two / one:.2f}; the second pair costs "
          f"{rss['2 thread(s)'] - rss['1 thread(s)']:.0f} MB for the life of the process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
