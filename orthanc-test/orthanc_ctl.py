"""Start and stop a real Orthanc (Debian package ``orthanc``) as a plain process on
loopback ports, for the tests and the demo.

Topology: modality (storescu) -> Orthanc (the PACS) -> fracture-node -> Orthanc.
The node is registered in ``DicomModalities`` as ``fracture-node``; with
``route=True`` the Lua rule in ``route.lua`` auto-routes stable CR/DX studies to it.
With ``node_ports`` (a group of nodes sharing one job database) the nodes are
registered as ``fracture-node-1`` ... ``fracture-node-N`` and the same rule sends
each stable study to one of them, chosen by a hash of its Study Instance UID,
falling over to the next when a C-STORE fails.

Usable as a module (:class:`Orthanc`) or a script::

    python orthanc-test/orthanc_ctl.py start --workdir /tmp/orthanc --node-port 11112
    python orthanc-test/orthanc_ctl.py stop --workdir /tmp/orthanc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    """A free TCP port on loopback (what pynetdicom's tests call get_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DICOMWEB_PLUGINS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"),
)
"""Where Debian's ``orthanc-dicomweb`` puts the plugin (a link and its target)."""


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared object (Debian ``orthanc-dicomweb``).

    Raises
    ------
    RuntimeError
        If the package is not installed.
    """
    for path in DICOMWEB_PLUGINS:
        if path.is_file():
            return path
    found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    if found:
        return found[0]
    raise RuntimeError("the DICOMweb plugin is missing (apt-get install orthanc-dicomweb)")


def dicomweb_plugin_installed() -> bool:
    """Whether Debian's ``orthanc-dicomweb`` is installed."""
    try:
        dicomweb_plugin()
    except RuntimeError:
        return False
    return True


def start_ohif(orthanc_url: str, port: int = 0) -> Any:
    """OHIF's viewer (``ohif.py`` beside this file) in front of ``orthanc_url``, started.

    The one viewer set-up of the demo and the browser tests.  The returned
    ``OhifServer`` has ``url``, ``study_url(uid)`` and ``stop()``.

    Raises
    ------
    RuntimeError
        If bootstrap.sh has not unpacked OHIF's ``dist/``.
    """
    import importlib.util

    module = sys.modules.get("ohif")
    if module is None:
        spec = importlib.util.spec_from_file_location("ohif", Path(__file__).with_name("ohif.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["ohif"] = module
        spec.loader.exec_module(module)
    return module.OhifServer(orthanc_url, port).start()


class Orthanc:
    """One Orthanc process with its own storage in ``workdir``.

    Parameters
    ----------
    workdir
        Storage, index, configuration and log go here.
    node_aet, node_port
        Where the fracture-node modality listens (registered in DicomModalities).
    route
        Install the auto-routing Lua rule (OnStableStudy -> node).
    stable_age
        Seconds a study must be quiet before it is stable (Orthanc's StableAge).
    node_ports
        A group of nodes (ports on loopback, AE ``node_aet``) instead of the one node:
        registered as ``fracture-node-1`` ... (``route.lua`` picks one per study).
    dicomweb
        Load the DICOMweb plugin (Debian ``orthanc-dicomweb``) on ``/dicom-web/``,
        what OHIF reads.
    """

    def __init__(
        self,
        workdir: Path,
        node_aet: str = "FRACTURE_NODE",
        node_port: int = 11112,
        route: bool = False,
        stable_age: int = 2,
        aet: str = "ORTHANC",
        http_port: int | None = None,
        dicom_port: int | None = None,
        extra_modalities: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        node_ports: list[int] | None = None,
        dicomweb: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.node_aet = node_aet
        self.node_port = node_port
        self.route = route
        self.stable_age = stable_age
        self.extra_modalities = extra_modalities or {}
        self.extra_config = extra_config or {}
        self.node_ports = node_ports
        self.dicomweb = dicomweb
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        modalities: dict[str, Any] = {
            "fracture-node": {"AET": self.node_aet, "Host": "127.0.0.1", "Port": self.node_port},
        }
        if self.node_ports is not None:  # a group of nodes: fracture-node-1 ... -N
            modalities = {f"fracture-node-{i}": {"AET": self.node_aet, "Host": "127.0.0.1",
                                                 "Port": port}
                          for i, port in enumerate(self.node_ports, start=1)}
        modalities.update(self.extra_modalities)
        cfg: dict[str, Any] = {
            "Name": "fracture-node test PACS",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": modalities,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StableAge": self.stable_age,
            "OverwriteInstances": True,
            "DicomScuTimeout": 30,
            "StorageCompression": False,
            "LuaScripts": [str(HERE / "route.lua")] if self.route else [],
        }
        if self.dicomweb:
            cfg["Plugins"] = [str(dicomweb_plugin())]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                               "WadoRoot": "/wado", "StudiesMetadata": "Full",
                               "SeriesMetadata": "Full"}
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout: float = 30.0) -> "Orthanc":
        """Start Orthanc and wait until its REST API answers."""
        binary = shutil.which("Orthanc")
        if binary is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ, TCP_NODELAY="1")
        log = (self.workdir / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [binary, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=self.workdir,
        )
        (self.workdir / "orthanc.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}; see {self.workdir}/orthanc.log"
                )
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None
        headers = {}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json" if not isinstance(body, bytes) \
                else "application/dicom"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            payload = rsp.read()
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, path: str, raw: bool = False) -> Any:
        return self.request("GET", path, raw=raw)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/instances", dicom_bytes)
        return result

    def find_study(self, study_instance_uid: str) -> str | None:
        ids = self.post("/tools/find", {"Level": "Study",
                                         "Query": {"StudyInstanceUID": study_instance_uid}})
        return str(ids[0]) if ids else None

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study with its simplified tags."""
        study_id = self.find_study(study_instance_uid)
        if study_id is None:
            return []
        out = []
        for inst in self.get(f"/studies/{study_id}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({"ID": inst["ID"], "tags": tags})
        return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--workdir", default="var/orthanc")
    parser.add_argument("--node-aet", default="FRACTURE_NODE")
    parser.add_argument("--node-port", type=int, default=11112)
    parser.add_argument("--http-port", type=int, default=8042)
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument("--route", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if args.action == "stop":
        pid_file = workdir / "orthanc.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
            pid_file.unlink()
        return 0
    orthanc = Orthanc(workdir, args.node_aet, args.node_port, args.route,
                      http_port=args.http_port, dicom_port=args.dicom_port)
    orthanc.start()
    orthanc.process = None  # leave it running
    print(f"Orthanc {orthanc.aet} at {orthanc.url}, DICOM port {orthanc.dicom_port}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())


#: storescu's option that proposes each transfer syntax (it offers uncompressed
#: syntaxes only unless told; a compressed file must travel in its own syntax).
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


def storescu(port: int, files: list[Path], aec: str, aet: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu as a modality would, each in its stored transfer
    syntax (one storescu run per syntax).  Returns the last run, or the first that
    failed."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_TS_FLAG.get(ts, "-xe"), []).append(f)
    result: subprocess.CompletedProcess[str] | None = None
    for flag, group in groups.items():
        result = subprocess.run(
            ["/usr/bin/storescu", "-aet", aet, "-aec", aec, flag, "-R", *extra, "127.0.0.1", str(port),
             *map(str, group)],
            capture_output=True, text=True, timeout=600, env=dict(os.environ, TCP_NODELAY="1"),
        )
        if result.returncode != 0:
            return result
    assert result is not None, "no files to send"
    return result
