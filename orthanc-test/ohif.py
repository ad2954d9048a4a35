"""Serve the built OHIF v3 viewer on loopback, in front of an Orthanc with DICOMweb.

OHIF's ``dist/`` (npm ``@ohif/app``, fetched and unpacked by ``scripts/bootstrap.sh``
under ``~/.cache/fracture-node/ohif``) is served as static files from one origin,
and every request under ``/dicom-web/`` is forwarded to Orthanc's DICOMweb plugin.
Viewer and DICOMweb share the origin, so the browser needs no CORS (Orthanc 1.10
sends no CORS headers).  ``/app-config.js`` is generated: one DICOMweb data source
on ``/dicom-web``.

Usable as a module (:class:`OhifServer`) or a script::

    python orthanc-test/ohif.py --orthanc http://127.0.0.1:8042 --port 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import os
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
"""The pinned ``@ohif/app`` version (scripts/bootstrap.sh fetches it)."""

OHIF_DIST = Path(
    os.environ.get("FRACTURE_NODE_OHIF_DIST")
    or Path.home() / ".cache" / "fracture-node" / "ohif" / OHIF_VERSION / "package" / "dist"
)
"""Where bootstrap.sh unpacks OHIF's built viewer."""

_APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 2,
  // OHIF 3.13.2 reads measurement.coords[0] of every TID 1500 group it has not drawn
  // yet (cornerstone-dicom-sr _checkIfCanAddMeasurementsToDisplaySet) and fails with
  // "Cannot read properties of undefined (reading 'ReferencedSOPSequence')" on an
  // image-level group without SCOORD (a negative image, the study decision).  Such a
  // group gets one empty placeholder coordinate, which the viewer then skips.
  customizationService: {
    onBeforeSRAddMeasurement: {
      $set: ({ measurement }) =>
        measurement.coords && measurement.coords.length
          ? measurement
          : Object.assign(measurement, { coords: [{}] }),
    },
  },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'fracture-node test PACS (Orthanc)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
"""

_PROXIED = ("/dicom-web/", "/wado")


def ohif_dist() -> Path:
    """The OHIF ``dist/`` folder, checked.

    Raises
    ------
    RuntimeError
        If bootstrap.sh has not unpacked OHIF.
    """
    if not (OHIF_DIST / "index.html").is_file():
        raise RuntimeError(f"OHIF {OHIF_VERSION} is not unpacked at {OHIF_DIST}; run scripts/bootstrap.sh")
    return OHIF_DIST


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        logger.debug("ohif http: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(_PROXIED):
            self._proxy()
        elif path == "/app-config.js":
            self._send(200, _APP_CONFIG.encode(), "application/javascript")
        else:
            self._static(path)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _static(self, path: str) -> None:
        root = self.server.dist
        target = (root / urllib.parse.unquote(path).lstrip("/")).resolve()
        if root not in target.parents and target != root or not target.is_file():
            # single-page app: every route (/viewer, /viewer/dicomsr, ...) is index.html
            target = root / "index.html"
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            kind = "application/wasm"
        self._send(200, target.read_bytes(), kind)

    def _proxy(self) -> None:
        host = self.headers.get("Host", "")
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        # Orthanc's DICOMweb builds BulkDataURIs from this header, so they point back here
        headers["Forwarded"] = f"host={host};proto=http"
        req = urllib.request.Request(self.server.orthanc + self.path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as rsp:
                body, status, rsp_headers = rsp.read(), rsp.status, rsp.headers
        except urllib.error.HTTPError as exc:
            body, status, rsp_headers = exc.read(), exc.code, exc.headers
        except (urllib.error.URLError, OSError) as exc:
            self._send(502, str(exc).encode(), "text/plain")
            return
        self._send(status, body, rsp_headers.get("Content-Type", "application/octet-stream"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, orthanc: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.dist = dist.resolve()
        self.orthanc = orthanc.rstrip("/")


class OhifServer:
    """OHIF's viewer and a same-origin DICOMweb proxy to Orthanc, in a thread.

    Parameters
    ----------
    orthanc_url
        Orthanc's REST root (``http://127.0.0.1:8042``); its DICOMweb plugin must be
        enabled on ``/dicom-web/`` (``Orthanc(dicomweb=True)``).
    port
        Loopback port to serve on (0: a free one).
    """

    def __init__(self, orthanc_url: str, port: int = 0) -> None:
        self._server = _Server(port, ohif_dist(), orthanc_url)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def study_url(self, study_instance_uid: str, initial_series: str | None = None) -> str:
        """The OHIF link that opens one study in the basic viewer, with
        ``initial_series`` (a Series Instance UID, e.g. the node's SR) in the viewport."""
        url = f"{self.url}/viewer?StudyInstanceUIDs={study_instance_uid}"
        if initial_series:
            url += f"&initialSeriesInstanceUID={initial_series}"
        return url

    def start(self) -> "OhifServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif", daemon=True)
        self._thread.start()
        logger.info("OHIF %s at %s (DICOMweb from %s)", OHIF_VERSION, self.url, self._server.orthanc)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "OhifServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = OhifServer(args.orthanc, args.port)
    sys.stderr.write(json.dumps({"ohif": server.url}) + "\n")
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(_main())
