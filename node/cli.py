"""``fracture-node``: the one console script.

Sub-commands for administrators: ``serve``, ``echo``, ``send``, ``status``,
``retry``, ``check-config``; for ML engineers: ``train``, ``evaluate``, ``export``; and ``demo``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from node.config import Config, load_config
from node.errors import ConfigError, SendError

if TYPE_CHECKING:
    from node.scu import Peer

logger = logging.getLogger(__name__)


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr; only entry points call this."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "h5py", "absl", "tensorflow", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    from node.processing import output_settings

    config = _load(args)
    output_settings(config)  # the result-object rules (series, descriptions) too
    print(json.dumps(config.as_dict(), indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from node.processing import output_settings, processor_factory
    from node.service import Node

    config = _load(args)
    output_settings(config)  # fail before loading the models, not after
    logger.info("configuration: %s", json.dumps(config.as_dict()))
    node = Node(config, processor_factory(config))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping (no new associations, finishing what is in hand)",
                    signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    address, port = node.start()
    if args.ready_file:
        Path(args.ready_file).write_text(f"{address}:{port}\n")
    while not stop.wait(0.5):
        pass
    node.stop()
    return 0


def _peer_from_args(args: argparse.Namespace, config: Config | None) -> Peer:
    from node.scu import Peer

    if args.destination:
        if config is None:
            raise ConfigError("--destination needs a configuration file")
        dest = config.destination(args.destination)
        from node.tls import client_context

        context = client_context(config.tls) if dest.tls else None
        return Peer(dest.ae_title, dest.host, dest.port, context)
    if not (args.aet and args.host and args.port):
        raise ConfigError("give either --destination NAME or --aet, --host and --port")
    return Peer(args.aet, args.host, int(args.port))


def _config_if_present(args: argparse.Namespace) -> Config | None:
    path = Path(args.config)
    return load_config(path) if path.exists() else None


def cmd_echo(args: argparse.Namespace) -> int:
    from node.scu import echo

    config = _config_if_present(args)
    peer = _peer_from_args(args, config)
    calling = args.calling_aet or (config.node.ae_title if config else "FRACTURE_NODE")
    started = time.perf_counter()
    try:
        status = echo(calling, peer)
    except SendError as exc:
        print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port} failed: {exc}")
        return 2
    ms = (time.perf_counter() - started) * 1000
    print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: status 0x{status:04X} ({ms:.0f} ms)")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from node.scu import dicom_files, store_files

    config = _config_if_present(args)
    peer = _peer_from_args(args, config)
    calling = args.calling_aet or (config.node.ae_title if config else "FRACTURE_NODE")
    files = dicom_files(Path(p) for p in args.paths)
    if not files:
        print("no DICOM files found")
        return 1
    started = time.perf_counter()
    try:
        outcomes = store_files(calling, peer, files)
    except SendError as exc:
        print(f"send failed: {exc}")
        return 2
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        print(f"FAILED {outcome.path}: {outcome.error}")
    seconds = time.perf_counter() - started
    print(f"sent {len(outcomes) - len(failed)} of {len(outcomes)} file(s) to "
          f"{peer.ae_title}@{peer.host}:{peer.port} in {seconds:.1f} s")
    return 0 if not failed else 1


def cmd_status(args: argparse.Namespace) -> int:
    from node.jobs import JobStore

    config = _load(args)
    jobs = JobStore(config.storage.database)
    try:
        counts = jobs.counts()
        studies = jobs.query(
            "SELECT study_instance_uid, state, decision, attempts, reason, updated_at, "
            "(SELECT COUNT(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid"
            " AND i.path IS NOT NULL) AS instances FROM studies s "
            "ORDER BY updated_at DESC LIMIT ?", [args.limit])
        problems = jobs.query(
            "SELECT destination, study_instance_uid, sop_instance_uid, kind, state, attempts, "
            "last_error FROM outbox WHERE state = 'dead' OR (state = 'pending' AND attempts > 0) "
            "ORDER BY id LIMIT ?", [args.limit])
        refused = jobs.query(
            "SELECT study_instance_uid, sop_instance_uid, outcome, reason FROM instances "
            "WHERE outcome IS NOT NULL AND outcome != 'analysed' ORDER BY received_at DESC "
            "LIMIT ?", [args.limit])
    finally:
        jobs.close()
    if args.json:
        print(json.dumps({"counts": counts, "studies": studies, "delivery_problems": problems,
                          "not_analysed": refused}, indent=2))
        return 0
    print("studies:", ", ".join(f"{k} {v}" for k, v in sorted(counts["studies"].items()))
          or "none")
    print("outbox: ", ", ".join(f"{k} {v}" for k, v in sorted(counts["outbox"].items()))
          or "none")
    if studies:
        print(f"\n{'study instance uid':64}  {'state':10}  {'decision':12}  inst  reason")
        for s in studies:
            print(f"{s['study_instance_uid']:64}  {s['state']:10}  {s['decision'] or '':12}  "
                  f"{s['instances']:4}  {s['reason'] or ''}")
    if problems:
        print(f"\n{'destination':12}  {'kind':4}  {'state':8}  tries  sop instance uid / error")
        for p in problems:
            print(f"{p['destination']:12}  {p['kind']:4}  {p['state']:8}  {p['attempts']:5}  "
                  f"{p['sop_instance_uid']}\n{'':38}{p['last_error']}")
    if refused:
        print("\nnot analysed:")
        for r in refused:
            print(f"  {r['sop_instance_uid']}  {r['outcome']}: {r['reason']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from node.jobs import JobStore

    config = _load(args)
    jobs = JobStore(config.storage.database)
    try:
        n = jobs.retry_dead(args.study)
    finally:
        jobs.close()
    print(f"requeued {n} dead letter(s) / failed study(ies)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.cli import train_main

    return train_main(args.rest)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.cli import evaluate_main

    return evaluate_main(args.rest)


def cmd_export(args: argparse.Namespace) -> int:
    from models.cli import export_main

    return export_main(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fracture-node", description=__doc__)
    parser.add_argument("--config", default="config.toml", help="configuration file")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the DICOM node (SCP, worker, delivery)")
    p.add_argument("--ready-file", help="write address:port here once listening")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="print the resolved configuration or its errors")
    p.set_defaults(func=cmd_check_config)

    for name, func, helptext in (("echo", cmd_echo, "C-ECHO a destination or any AE"),
                                 ("send", cmd_send, "C-STORE files or folders to an AE")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--destination", help="a destination name from config.toml")
        p.add_argument("--aet", help="called AE title")
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--calling-aet", help="our AE title (default: node.ae_title)")
        if name == "send":
            p.add_argument("paths", nargs="+", help="DICOM files or folders")
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="studies and outbox items by state, with reasons")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="requeue dead letters and failed studies")
    p.add_argument("--study", help="only this Study Instance UID")
    p.set_defaults(func=cmd_retry)

    for name, func, helptext in (("train", cmd_train, "train a model (see --help)"),
                                 ("evaluate", cmd_evaluate, "evaluate models on a manifest"),
                                 ("export", cmd_export, "(re-)export registered models to the serving graph")):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="start Orthanc and the node, push a real study, show results")
    p.add_argument("inputs", nargs="*", help="DICOM files/folders (default: the shipped demo)")
    p.add_argument("--out", default="demo-out", help="where results are saved")
    p.add_argument("--keep-running", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] | None = None
    for i, word in enumerate(argv):  # train/evaluate: their own parsers take every option
        if word in ("train", "evaluate", "export") and (i == 0 or argv[i - 1] not in ("--config",
                                                                              "--log-level")):
            argv, rest = argv[: i + 1], argv[i + 1:]
            break
    args = parser.parse_args(argv)
    if rest is not None:
        args.rest = rest
    configure_logging(args.log_level)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fracture-node status | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
