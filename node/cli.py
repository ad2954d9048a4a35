"""``fracture-node``: the one console script.

Sub-commands for administrators: ``serve``, ``echo``, ``send``, ``status``,
``retry``, ``check-config``; for ML engineers: ``train``, ``evaluate``, ``export``; and ``demo``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from node.config import Config, load_config
from node.errors import ConfigError, NodeError, SendError

if TYPE_CHECKING:
    from models.registry import ModelEntry, Registry
    from node.scu import Peer
    from node.service import Node

logger = logging.getLogger(__name__)

DESCRIPTION = (
    "A DICOM node that returns AI fracture results (heat-map images, a structured "
    "report, a PDF) for musculoskeletal radiographs. Administrators: serve, "
    "check-config, echo, send, status, retry. ML engineers: train, evaluate. "
    "Try it: demo."
)


#: Third-party loggers kept at WARNING (their INFO is per-PDU or per-object chatter).
QUIET_LOGGERS = ("h5py", "absl", "tensorflow", "keras", "matplotlib", "PIL", "highdicom",
                 "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "urllib3")


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr; only entry points call this.

    Third-party INFO is off; pynetdicom's own ERROR lines (two per failed connection,
    repeating what the node logs once with its reason and the next attempt) are shown
    only at ``--log-level DEBUG``; TensorFlow's C++ start-up chatter is silenced
    through ``TF_CPP_MIN_LOG_LEVEL`` before TensorFlow is imported.
    """
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL)
    if numeric > logging.DEBUG:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the entry point only


#: Lines that TensorFlow's C++ runtime writes straight to file descriptor 2 at start-up,
#: before (and regardless of) TF_CPP_MIN_LOG_LEVEL: absl's pre-initialisation notice
#: and the oneDNN / CPU-feature information lines.
NATIVE_CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:. ]+\d+ (port|cpu_feature_guard|cuda_\w+)\.cc:\d+\])")


@contextmanager
def native_stderr_filtered(pattern: re.Pattern[str] = NATIVE_CHATTER) -> Iterator[None]:
    """Pass file descriptor 2 through a filter that drops TensorFlow's native start-up
    lines (:data:`NATIVE_CHATTER`) and forwards everything else unchanged; restored,
    and drained, on exit.  Only ``serve`` uses it."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not pattern.match(line.decode("utf-8", "replace")):
                    os.write(saved, line)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread drains and ends
        thread.join(timeout=5)
        os.close(saved)


def _load(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def preflight(config: Config) -> Registry:
    """Every check that needs no network and no model in memory: the result-object
    rules, the active models against the registry (names, roles, weights present with
    the recorded SHA-256), and the console's token and certificate files.  Both
    ``check-config`` and ``serve`` run it, so ``serve`` refuses what ``check-config``
    refuses.  Returns the registry it checked the models against.

    Raises
    ------
    ConfigError
        One line naming the key and the fix.
    """
    from models.registry import RegistryError, load_registry, verify_weights
    from node.processing import output_settings

    output_settings(config)
    models = config.models
    try:
        registry = load_registry(models.registry)
    except RegistryError as exc:
        raise ConfigError(f"models.registry: {exc}; point it at the registry.toml that "
                          "lists the models") from None
    for role in ("router", "classifier"):
        name = getattr(models, role)
        candidates = sorted(n for n, e in registry.models.items() if e.role == role)
        if not name:
            raise ConfigError(f"models.{role} is empty: name the active {role} (registered "
                              f"{role}s: {', '.join(candidates) or 'none'})")
        entry = registry.models.get(name)
        if entry is None or entry.role != role:
            what = "is not in" if entry is None else f"is a {entry.role}, not a {role}, in"
            raise ConfigError(f"models.{role} = {name!r} {what} {models.registry}; use one of: "
                              f"{', '.join(candidates) or 'none registered'}")
        try:
            verify_weights(entry)
        except RegistryError as exc:
            raise ConfigError(f"models.{role} = {name!r}: {exc}; restore the weights file "
                              "the registry names") from None
    _check_precision(registry.models[models.router], registry.models[models.classifier])
    try:  # the classifier's heads (the abnormality head): fitted on exactly its weights
        for head in registry.heads_of(registry.models[models.classifier]):
            verify_weights(head)
    except RegistryError as exc:
        raise ConfigError(f"models.classifier = {models.classifier!r}: {exc}") from None
    console = config.console
    if console.enabled:
        for key in ("token_file", "certificate", "private_key"):
            path = getattr(console, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"console.{key}: {path} is not a readable file; create it "
                                  "or remove the key")
        if console.token_file is not None and not read_token(console.token_file):
            raise ConfigError(f"console.token_file: {console.token_file} is empty; put a long "
                              "random token on its first line")
    return registry


def _check_precision(router: ModelEntry, classifier: ModelEntry) -> None:
    """The two active models are served in one precision this CPU can run.

    A classifier's operating points were chosen on images routed by a router in its
    own precision (``models/training/register.py``), so a pair that mixes them runs
    thresholds nobody measured.
    """
    from models.runtime import bf16_supported

    if router.precision != classifier.precision:
        raise ConfigError(
            f"models.router = {router.name!r} is served in {router.precision} but models.classifier = "
            f"{classifier.name!r} in {classifier.precision}; name a router and a classifier of the "
            "same precision (the classifier's thresholds were chosen beside such a router)")
    if router.precision == "bf16" and not bf16_supported():
        raise ConfigError(
            f"models.router = {router.name!r} and models.classifier = {classifier.name!r} are served "
            "in bf16 but this CPU has no bfloat16 instructions; name the fp32 models instead")


def bf16_note(config: Config, registry: Registry) -> str | None:
    """A one-line note when the active models are the fp32 pair, this CPU runs bfloat16,
    and ``registry`` (as :func:`preflight` checked it) holds bf16 models of the same
    weights, each with its own evaluation attached (a variant without one is not
    offered): what an administrator can name in ``[models]``.  ``None`` otherwise.  No
    speed is claimed: it depends on the CPU (``bench/inference.py`` measures it)."""
    from models.runtime import bf16_supported

    active = [registry.models[config.models.router], registry.models[config.models.classifier]]
    if any(e.precision != "fp32" for e in active):
        return None
    variants = []
    for entry in active:
        same = sorted((n for n, e in registry.models.items()
                       if e.role == entry.role and e.precision == "bf16" and e.sha256 == entry.sha256
                       and e.metrics.get("source")), key=lambda n: registry.models[n].version)
        if not same:
            return None
        variants.append(registry.models[same[-1]])
    if not bf16_supported():
        return None
    router, classifier = variants
    evaluation = Path(str(classifier.metrics["source"])).parent
    return (f"this CPU runs bfloat16: {router.name} {router.version} and {classifier.name} "
            f"{classifier.version} are the active models' weights served in bf16, calibrated "
            f"and evaluated on their own ({evaluation}/); to serve them set models.router = "
            f"{router.name!r} and models.classifier = {classifier.name!r}")


def read_token(path: Path) -> str:
    """The console's bearer token: the first line of ``path``, stripped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"console.token_file: {path} cannot be read; check its "
                          "permissions") from None
    return lines[0].strip() if lines else ""


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    registry = preflight(config)
    print(json.dumps(config.as_dict(), indent=2))
    note = bf16_note(config, registry)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if not config.destinations:
        print("note: keep_results_local = true: results stay in "
              f"{config.storage.spool_dir / 'outbox'} and are sent nowhere", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from node.processing import processor_factory
    from node.service import Node

    config = _load(args)
    registry = preflight(config)  # what check-config refuses, serve refuses, before binding
    logger.info("configuration: %s", json.dumps(config.as_dict()))
    note = bf16_note(config, registry)
    if note:
        logger.info("%s", note)
    if not config.destinations:
        logger.warning("no [[destinations]]: keep_results_local = true, results stay in %s",
                       config.storage.spool_dir / "outbox")
    with native_stderr_filtered():
        return _serve(args, Node(config, processor_factory(config)))


def _write_ready_file(path: Path, text: str) -> None:
    """Write ``--ready-file`` whole or not at all (a temporary file renamed over it): a
    supervisor that polls for the file must never read it empty or half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _serve(args: argparse.Namespace, node: Node) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping (no new associations, finishing what is in hand)",
                    signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    address, port = node.start()  # binds first (exit 2 if the port is taken), then loads
    if args.ready_file:
        _write_ready_file(Path(args.ready_file), f"{address}:{port}\n")
    while not stop.wait(0.5):
        if node.fatal is not None:
            break
    node.stop()
    if node.fatal is not None:
        print(f"error: {node.fatal}", file=sys.stderr)
        return 2
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
    from node.status import open_existing, status_rows

    config = _load(args)
    jobs = open_existing(config)  # read-only: never creates a SQLite database
    if jobs is None:
        print(f"no job database at {config.storage.database}: this node has not run with "
              f"{args.config} yet (the demo keeps its own, in its --out folder)",
              file=sys.stderr)
        return 1
    try:
        nodes, leases = jobs.nodes(), jobs.leases()
        rows = status_rows(jobs, args.limit)
    finally:
        jobs.close()
    counts, studies = rows["counts"], rows["studies"]
    problems, refused = rows["delivery_problems"], rows["not_analysed"]
    if args.json:
        print(json.dumps({"counts": counts, "studies": studies, "delivery_problems": problems,
                          "not_analysed": refused, "nodes": nodes, "leases": leases}, indent=2))
        return 0
    if nodes:  # a shared job database: who is alive, who holds what, until when
        print("nodes:")
        for nd in nodes:
            beat = time.strftime("%H:%M:%S", time.localtime(nd["heartbeat_at"]))
            print(f"  {nd['node_id']:32}  {'alive' if nd['alive'] else 'gone':5}  "
                  f"{nd['ae_title']}  last heartbeat {beat}")
        print("leases:", "none" if not leases else "")
        for le in leases:
            what = le["study_instance_uid"] if le["kind"] == "study" else le["sop_instance_uid"]
            until = time.strftime("%H:%M:%S", time.localtime(le["lease_expires_at"]))
            print(f"  {le['kind']:6}  {what:64}  {le['owner']:32}  until {until}"
                  f"{'  (expired)' if le['expired'] else ''}")
        print()
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
    from node.status import open_existing

    config = _load(args)
    jobs = open_existing(config)
    if jobs is None:
        print(f"no job database at {config.storage.database}: nothing to retry",
              file=sys.stderr)
        return 1
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
    parser = argparse.ArgumentParser(prog="fracture-node", description=DESCRIPTION)
    parser.add_argument("--config", default="config.toml",
                        help="configuration file (default: config.toml in this folder)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log detail on stderr (default: INFO; DEBUG adds pynetdicom's "
                             "own messages)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (fracture-node COMMAND --help for its options)")

    p = sub.add_parser("serve", help="run the DICOM node (SCP, worker, delivery)")
    p.add_argument("--ready-file", help="write address:port to this file once listening")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="print the resolved configuration or its errors")
    p.set_defaults(func=cmd_check_config)

    for name, func, helptext in (("echo", cmd_echo, "C-ECHO a destination or any AE"),
                                 ("send", cmd_send, "C-STORE files or folders to an AE")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--destination", help="a destination name from config.toml")
        p.add_argument("--aet", help="called AE title (with --host and --port)")
        p.add_argument("--host", help="host name or IP address of the AE (with --aet)")
        p.add_argument("--port", type=int, help="DICOM port of the AE (with --aet)")
        p.add_argument("--calling-aet", help="our AE title (default: node.ae_title)")
        if name == "send":
            p.add_argument("paths", nargs="+", help="DICOM files or folders")
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="studies and outbox items by state, with reasons")
    p.add_argument("--limit", type=int, default=50,
                   help="show at most this many studies, problems and refusals (default: 50)")
    p.add_argument("--json", action="store_true", help="print the same rows as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="requeue dead letters and failed studies")
    p.add_argument("--study", help="only this Study Instance UID")
    p.set_defaults(func=cmd_retry)

    for name, func, helptext in (("train", cmd_train, "train a model (see --help)"),
                                 ("evaluate", cmd_evaluate, "evaluate models on a manifest"),
                                 ("export", cmd_export, "(re-)export registered models to the serving graph")):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER,
                       help=f"options of {name} (fracture-node {name} --help lists them)")
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="start Orthanc and the node, push a real study, show results")
    p.add_argument("inputs", nargs="*", help="DICOM files/folders (default: the shipped demo)")
    p.add_argument("--out", default="demo-out", help="where results are saved")
    p.add_argument("--keep-running", action="store_true",
                   help="leave Orthanc and the node running until Ctrl-C so the printed "
                        "links work")
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
    except NodeError as exc:  # e.g. the port is taken: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fracture-node status | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
