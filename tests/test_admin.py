"""The administrator's first hour (issue 18): every measured paper cut has a test
here that would have caught it.  Real processes, real DCMTK, real sockets."""

from __future__ import annotations

import logging
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, MRImageStorage

from conftest import DICOM_DATA, ROOT, free_port, wait_for, write_config
from nodeharness import CopyProcessor
from node.cli import build_parser
from node.config import config_from_dict, load_config
from node.errors import ConfigError, StartError
from node.service import Node

EXE = ROOT / ".venv" / "bin" / "fracture-node"
DEMO_STUDY = ROOT / "demo" / "studies"
PEERS = [{"ae_title": "ORTHANC"}]
PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def _cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=config.parent)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    """The error of a refused command: exit 2, one line on stderr, no traceback."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines()  # log lines (serve's) aside
             if line.strip() and not re.match(r"\d{4}-\d\d-\d\d \d\d:", line)]
    assert len(lines) == 1, out.stderr
    return lines[0]


# -- 1. results dropped without a word -----------------------------------------------------


def test_no_destination_is_an_error_unless_results_are_kept_local(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"destinations: none configured.*keep_results_local"):
        config_from_dict({"peers": PEERS}, tmp_path)
    config = config_from_dict({"peers": PEERS, "keep_results_local": True}, tmp_path)
    assert config.destinations == () and config.keep_results_local


def test_check_config_and_serve_refuse_a_config_without_destination(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port())
    text = path.read_text().replace("keep_results_local = true\n", "")
    path.write_text(text)
    for command in ("check-config", "serve"):
        line = _one_line_error(_cli(path, command))
        assert "destinations: none configured" in line and "keep_results_local = true" in line
    assert not (tmp_path / "node.sqlite").exists(), "serve created state before refusing"


# -- 2. a misspelt model ----------------------------------------------------------------


@pytest.mark.parametrize("key", ["router", "classifier"])
def test_misspelt_model_is_refused_by_check_config_and_serve(tmp_path: Path, key: str) -> None:
    path = write_config(tmp_path, free_port(), destinations=[
        {"name": "pacs", "ae_title": "PACS", "port": 104}])
    good = "bodypart-router" if key == "router" else "fracture-classifier"
    path.write_text(path.read_text().replace(f'{key} = "{good}"', f'{key} = "{good}x"'))
    for command in ("check-config", "serve"):
        line = _one_line_error(_cli(path, command))
        assert f"models.{key} = '{good}x' is not in" in line
        assert good in line.split("use one of:")[1]  # the registered names are offered


def test_a_router_named_as_classifier_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port(), destinations=[
        {"name": "pacs", "ae_title": "PACS", "port": 104}])
    path.write_text(path.read_text().replace('classifier = "fracture-classifier"',
                                             'classifier = "bodypart-router"'))
    line = _one_line_error(_cli(path, "check-config"))
    assert "is a router, not a classifier" in line


# -- 3. the port already in use -------------------------------------------------------


def test_serve_on_a_busy_port_names_it_and_exits_2_before_loading_models(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        path = write_config(tmp_path, port, destinations=[
            {"name": "pacs", "ae_title": "PACS", "port": 104}])
        out = _cli(path, "serve")
        line = _one_line_error(out)
        assert f"port {port} on 127.0.0.1 is already in use" in line and "node.port" in line
        assert "loaded" not in out.stderr and "tensorflow" not in out.stderr.lower()
    finally:
        busy.close()


def test_node_start_raises_start_error_on_a_busy_port(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    loaded: list[bool] = []

    def factory() -> CopyProcessor:
        loaded.append(True)
        return CopyProcessor()

    try:
        config = load_config(write_config(tmp_path, busy.getsockname()[1]))
        node = Node(config, factory)
        with pytest.raises(StartError, match="already in use"):
            node.start()
        assert not loaded, "the models were loaded before the port was bound"
        node.jobs.close()
    finally:
        busy.close()


def test_scp_accepts_and_spools_while_the_models_load(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_factory() -> CopyProcessor:
        release.wait(60)
        return CopyProcessor()

    config = load_config(write_config(tmp_path, free_port()))
    node = Node(config, slow_factory)
    node.start()
    try:
        ds = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage,
                                 [str(ds.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        assert not node.processing.is_set()
        assert node.jobs.query("SELECT state FROM studies")[0]["state"] == "pending"
        release.set()
        wait_for(lambda: node.jobs.query("SELECT state FROM studies")[0]["state"] == "processed")
    finally:
        release.set()
        node.stop(grace_seconds=1)


# -- 4. every config error one line naming the key and the fix ------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5"}]},
         "destinations[0] (pacs): missing key(s) port; add port = 104"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "port": 104}]},
         "missing key(s) host; add host = \"10.0.0.5\""),
        ({"destinations": [{**PACS, "host": "127.0.0.300"}]},
         "destinations[pacs].host = '127.0.0.300' is not a valid IPv4 address"),
        ({"destinations": [{**PACS, "host": "pacs_server.local"}]}, "is not a valid host name"),
        ({"destinations": [{**PACS, "host": "-pacs"}]}, "is not a valid host name"),
        ({"destinations": [{**PACS, "host": "fe80::1::2"}]}, "is not a valid IPv6 address"),
        ({"peers": [{"ae_title": "X", "host": "10.1.2"}], "destinations": [PACS]},
         "peers[X].host = '10.1.2' is not a valid IPv4 address"),
        ({"destinations": [{**PACS, "port": "104"}]}, "destinations[pacs].port must be an integer"),
        ({"storage": {"spool_dir": 5}, "destinations": [PACS]},
         "storage.spool_dir must be a file or folder path in quotes"),
        ({"models": {"router": 3}, "destinations": [PACS]}, "models.router must be a model name"),
        ({"console": {"enabled": True, "bind_address": "0.0.0.0"}, "destinations": [PACS]},
         "console.token_file is required"),
        ({"destinations": [{**PACS, "colour": "red"}]},
         "unknown key(s) colour (known keys: name, ae_title, host, port, tls"),
        ({"destination": [PACS]}, "unknown section(s) or key(s): destination (known:"),
        ({"tls": {"enabled": "false"}, "destinations": [PACS]}, "tls.enabled must be true or false"),
    ],
)
def test_config_errors_are_one_line_with_key_and_fix(raw: dict, message: str) -> None:
    raw = {"peers": PEERS, **raw}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, Path("/tmp"))
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    for python_text in ("__init__", "positional argument", "object", "Traceback"):
        assert python_text not in text


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.5", "::1", "pacs", "pacs-1.example.org",
                                  "PACS.example.org."])
def test_good_hosts_pass(host: str) -> None:
    config = config_from_dict({"peers": PEERS, "destinations": [{**PACS, "host": host}]},
                              Path("/tmp"))
    assert config.destinations[0].host == host


def test_check_config_reports_a_missing_port_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[peers]]\nae_title = "ORTHANC"\n[[destinations]]\nname = "pacs"\n'
                    'ae_title = "PACS"\nhost = "127.0.0.300"\n')
    line = _one_line_error(_cli(path, "check-config"))
    assert line == ("configuration error: destinations[0] (pacs): missing key(s) port; "
                    "add port = 104")


# -- 5. the guide's storescu recipes, with DCMTK 3.6.7, on the demo study -----------------------


def test_admin_guide_storescu_recipes_store_the_whole_demo_study(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "admin.md").read_text()
    assert 'enabled = "false"` is a\nnon-empty string' not in guide
    commands = [line for line in guide.splitlines()
                if line.startswith("/usr/bin/storescu ") and "demo/studies" in line]
    assert len(commands) == 3
    version = subprocess.run(["/usr/bin/storescu", "--version"], capture_output=True, text=True)
    assert "$dcmtk: storescu v3.6.7" in version.stdout
    config = load_config(write_config(tmp_path, free_port()))
    node = Node(config, CopyProcessor)
    node.start()
    try:
        for command in commands:
            argv = command.replace("node-host", "127.0.0.1").replace(
                " 11112 ", f" {node.address[1]} ").split()
            out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert out.returncode == 0 and "E:" not in out.stderr, out.stderr
        held = {r["sop_instance_uid"] for r in node.jobs.query(
            "SELECT sop_instance_uid FROM instances WHERE path IS NOT NULL")}
        expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    for f in DEMO_STUDY.rglob("*.dcm")}
        assert held == expected and len(expected) == 9
    finally:
        node.stop(grace_seconds=1)


# -- 6. read-only commands create nothing ---------------------------------------------------


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_status_without_a_database_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text((ROOT / "config.toml").read_text().replace(
        'registry = "models/registry.toml"', f'registry = "{ROOT / "models" / "registry.toml"}"'))
    before = _tree(tmp_path)
    for command in (["status"], ["status", "--json"], ["retry"]):
        out = _cli(path, *command)
        assert out.returncode == 1
        assert "no job database at" in out.stderr and "Traceback" not in out.stderr
    assert _tree(tmp_path) == before, "a read-only command created files"


# -- 7. noise and help ------------------------------------------------------------------------


def _all_parsers() -> list:
    parser = build_parser()
    found = [parser]
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            found.extend(choices.values())
    return found


def test_every_option_has_help_and_no_help_has_raw_markup() -> None:
    for parser in _all_parsers():
        assert "``" not in (parser.description or ""), parser.prog
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"
            assert "``" not in action.help
    keep = [a for p in _all_parsers() for a in p._actions if "--keep-running" in a.option_strings]
    assert keep and "until Ctrl-C so the printed links work" in keep[0].help


def test_help_output_is_plain(tmp_path: Path) -> None:
    for args in (["--help"], ["serve", "--help"], ["status", "--help"], ["demo", "--help"]):
        out = subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "``" not in out.stdout, out.stdout


def test_one_log_line_per_retry_with_the_next_attempt_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    closed = free_port()  # nobody listens there
    config = load_config(write_config(tmp_path, free_port(), destinations=[
        {"name": "pacs", "ae_title": "PACS", "port": closed}]))
    node = Node(config, CopyProcessor)
    caplog.set_level(logging.INFO)
    node.start()
    try:
        f = DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm"
        out = subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "FRACTURE_NODE",
                              "-R", "-xs", "127.0.0.1", str(node.address[1]), str(f)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: (node.jobs.query("SELECT MAX(attempts) AS n FROM outbox")[0]["n"]
                          or 0) >= 3, timeout=60)
    finally:
        node.stop(grace_seconds=1)
    con = sqlite3.connect(tmp_path / "node.sqlite")
    attempts = con.execute("SELECT attempts FROM outbox").fetchone()[0]
    con.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "node.worker"
             and r.levelno >= logging.WARNING]
    assert len(lines) == attempts, lines
    assert all(re.search(r"next attempt at \d\d:\d\d:\d\d", m) for m in lines), lines
    assert all(f"127.0.0.1:{closed}" in m for m in lines), lines
    assert not any("generation" in r.getMessage() for r in caplog.records)


def test_configure_logging_quiets_third_parties() -> None:
    code = ("import logging, os; from node.cli import configure_logging; configure_logging('INFO');"
            "print(logging.getLogger('highdicom').getEffectiveLevel(),"
            " logging.getLogger('pynetdicom').getEffectiveLevel(),"
            " logging.getLogger('node.scp').getEffectiveLevel(), os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == [str(logging.WARNING), str(logging.CRITICAL),
                                  str(logging.INFO), "2"], out.stderr


def test_licence_is_an_spdx_string() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


# -- 8. DCMTK by absolute path ----------------------------------------------------------


def test_dcmtk_tools_shadowed_by_pynetdicom_are_called_by_absolute_path() -> None:
    shadowed = sorted(p.name for p in (ROOT / ".venv" / "bin").iterdir()
                      if (Path("/usr/bin") / p.name).exists() and p.name.endswith(("scu", "scp")))
    assert {"storescu", "storescp", "echoscu"} <= set(shadowed)
    # a tool name as the first word of an argv list, or handed to shutil.which
    pattern = re.compile(r"""(Popen\(\[\s*|run\(\[\s*|^\s*\[\s*|which\()["'](%s)["']"""
                         % "|".join(shadowed))
    offenders = []
    for folder in ("tests", "bench", "scripts", "orthanc-test", "node"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".sh") or path.name == "test_admin.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "/usr/bin/" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    for tool in ("storescu", "storescp", "echoscu"):
        version = subprocess.run([f"/usr/bin/{tool}", "--version"], capture_output=True, text=True)
        assert f"$dcmtk: {tool} v3.6.7" in version.stdout


# -- 9. the duplicate check under concurrent associations; aborted and rejected logged ---------------


def test_duplicate_check_is_atomic_under_concurrent_associations(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path, free_port()))
    node = Node(config, CopyProcessor)
    caplog.set_level(logging.INFO, logger="node.scp")
    node.start()
    base = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
    datasets = []
    for _ in range(4):
        ds = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
        ds.SOPInstanceUID = generate_uid()
        datasets.append(ds)
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def send() -> None:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage,
                                 [str(base.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
        start.wait()
        got = [int(assoc.send_c_store(ds).Status) for ds in datasets]
        assoc.release()
        with lock:
            statuses.extend(got)

    try:
        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses == [0] * 32
        rows = node.jobs.query("SELECT sop_instance_uid FROM instances")
        assert len(rows) == 4
        assert len(list((node.spool.root / "incoming").rglob("*.dcm"))) == 4
    finally:
        node.stop(grace_seconds=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "node.scp"]
    assert sum(" stored (" in m for m in messages) == 4
    assert sum("already held, acknowledged" in m for m in messages) == 28


def test_aborted_and_context_less_associations_are_logged_with_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path, free_port()))
    node = Node(config, CopyProcessor)
    caplog.set_level(logging.INFO, logger="node.scp")
    node.start()
    try:
        ds = pydicom.dcmread(DICOM_DATA / "pylibjpeg-data" / "RG2_JPLL.dcm")
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage,
                                 [str(ds.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.abort()
        mr = AE(ae_title="TESTSCU")
        mr.add_requested_context(MRImageStorage)
        assoc = mr.associate("127.0.0.1", node.address[1], ae_title="FRACTURE_NODE")
        if assoc.is_established:
            assoc.release()

        def logged(text: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if text in r.getMessage()]

        aborted = wait_for(lambda: logged("aborted: A-ABORT from the calling AE"), timeout=10)
        assert "1 instance(s) stored before" in aborted[0]
        no_context = wait_for(lambda: logged("no usable presentation context"), timeout=10)
        assert "MR Image Storage" in no_context[0]
    finally:
        node.stop(grace_seconds=1)


def test_models_that_fail_to_load_are_a_fatal_one_line_reason(tmp_path: Path) -> None:
    def broken() -> CopyProcessor:
        raise RuntimeError("weights file truncated")

    node = Node(load_config(write_config(tmp_path, free_port())), broken)
    node.start()
    try:
        reason = wait_for(lambda: node.fatal)
        assert "the models could not be loaded (RuntimeError: weights file truncated)" in reason
        assert "\n" not in reason and not node.processing.is_set()
    finally:
        node.stop(grace_seconds=1)
