"""What open, quiet associations cost the receiving process: the node against its peers.

A PACS keeps associations open between studies (Orthanc for 5 s after each send,
``DicomAssociationCloseDelay``; some archives for minutes).  For each SCP below, a
separate client process opens N associations, leaves them quiet for the measurement
window, then sends one C-ECHO on each and releases them.  Printed per SCP and N: the
SCP process tree's CPU (utime + stime from /proc, children included) over the window
as a share of one core, and the median C-ECHO round trip on a quiet association.

* ``fracture-node serve`` (real config, real models loaded; ``node/netpoll.py``);
* pynetdicom 3.0 as it ships (an SCP of the same library, nothing changed), the
  reference the node's figure is compared to;
* DCMTK ``storescp --fork`` (one process per association), the real peer.

Usage::

    .venv/bin/python bench/idle.py [--associations 0,1,4,10] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin" / "python"
EXE = ROOT / ".venv" / "bin" / "fracture-node"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "orthanc-test"))

sys.path.insert(0, str(ROOT / "bench"))

from e2e import _cpu_seconds  # noqa: E402
from orthanc_ctl import free_port  # noqa: E402  (the tests' free-port helper)
from reliability import _descendants  # noqa: E402

CLIENT = r"""
import statistics, sys, time
from pynetdicom import AE
from pynetdicom.sop_class import Verification
port, n, called = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ae = AE("IDLE"); ae.add_requested_context(Verification)
assocs = [ae.associate("127.0.0.1", port, ae_title=called) for _ in range(n)]
assert all(a.is_established for a in assocs), "association not established"
print("open", flush=True)
sys.stdin.readline()                      # the measurement window
times = []
for a in assocs:
    t = time.perf_counter(); a.send_c_echo(); times.append(time.perf_counter() - t)
    a.release()
print("echo_ms", 1000 * statistics.median(times) if times else float("nan"), flush=True)
"""

PYNETDICOM_SCP = r"""
import sys, time
from pynetdicom import AE
from pynetdicom.sop_class import Verification
ae = AE("REFERENCE"); ae.add_supported_context(Verification); ae.maximum_associations = 64
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=False)
print("ready", flush=True)
sys.stdin.readline()
"""


def _tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants, seconds."""
    return _cpu_seconds([pid, *_descendants(pid)])


def _node(work: Path, port: int, associations: int) -> subprocess.Popen[bytes]:
    from node.config import (
        Config,
        DestinationConfig,
        LimitsConfig,
        NodeConfig,
        PeerConfig,
        StorageConfig,
        load_config,
        render_config,
    )
    shipped = load_config(ROOT / "config.toml", environ={})
    cfg = work / "node.toml"
    cfg.write_text(render_config(Config(
        node=NodeConfig(port=port),
        peers=(PeerConfig("IDLE", "127.0.0.1"),),
        destinations=(DestinationConfig("pacs", "NOWHERE", "127.0.0.1", free_port()),),
        storage=StorageConfig(spool_dir=work / "spool", database=work / "node.sqlite"),
        limits=LimitsConfig(max_associations=max(associations, 2)),
        models=shipped.models,
    )))
    ready = work / "ready"
    log = work / "node.log"
    proc = subprocess.Popen([str(EXE), "--config", str(cfg), "serve", "--ready-file", str(ready)],
                            stderr=log.open("wb"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            ready.exists() and "processing started" in log.read_text(errors="replace")):
        if proc.poll() is not None:
            raise SystemExit(f"fracture-node serve exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return proc


def measure(kind: str, associations: int, seconds: float) -> tuple[float, float]:
    """(CPU share of one core over the quiet window, median C-ECHO ms on a quiet association)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="idle-") as tmp:
        work = Path(tmp)
        called = "FRACTURE_NODE"
        if kind == "node":
            server = _node(work, port, associations)
        elif kind == "pynetdicom":
            called = "REFERENCE"
            server = subprocess.Popen([str(PY), "-c", PYNETDICOM_SCP, str(port)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert server.stdout is not None
            server.stdout.readline()
        else:
            called = "STORESCP"
            server = subprocess.Popen(["/usr/bin/storescp", "--fork", "-aet", called,
                                       "-od", str(work), str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        time.sleep(2.0)  # let start-up work settle
        try:
            client = subprocess.Popen([str(PY), "-c", CLIENT, str(port), str(associations), called],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert client.stdin is not None and client.stdout is not None
            if client.stdout.readline().strip() != "open":
                raise SystemExit(f"{kind}: the client could not open {associations} associations")
            time.sleep(0.5)
            cpu0, t0 = _tree_cpu_seconds(server.pid), time.monotonic()
            time.sleep(seconds)
            share = (_tree_cpu_seconds(server.pid) - cpu0) / (time.monotonic() - t0)
            client.stdin.write("\n")
            client.stdin.flush()
            echo = float(client.stdout.readline().split()[1])
            client.wait(timeout=30)
        finally:
            if kind == "pynetdicom" and server.stdin is not None:
                server.stdin.close()
            server.terminate()
            server.wait(timeout=30)
    return share, echo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--associations", default="0,1,4,10")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.associations.split(",")]
    print(f"load average at start: {os.getloadavg()[0]:.2f}; quiet window {args.seconds:.0f} s")
    print("| quiet associations | SCP | CPU, % of one core | C-ECHO on a quiet association, ms |")
    print("|---|---|---|---|")
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for n in counts:
        for kind, label in (("node", "fracture-node serve"), ("pynetdicom", "pynetdicom 3.0 as shipped"),
                            ("dcmtk", "DCMTK storescp --fork")):
            share, echo = measure(kind, n, args.seconds)
            results[(kind, n)] = (share, echo)
            print(f"| {n} | {label} | {100 * share:.1f} | {'-' if n == 0 else f'{echo:.1f}'} |", flush=True)
    for n in (c for c in counts if c):
        node, ref = results[("node", n)][0], results[("pynetdicom", n)][0]
        print(f"{n} quiet association(s): node / pynetdicom as shipped = "
              f"{node / ref if ref > 0 else float('nan'):.2f} of the CPU")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
