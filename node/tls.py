"""TLS contexts for DICOM TLS (PS3.15 Annex B.1) from the ``[tls]`` section."""

from __future__ import annotations

import ssl

from node.config import TlsConfig
from node.errors import ConfigError


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The SCP's context: our certificate; peers verified against the CA when
    ``require_peer_certificate`` (TLS 1.2 or newer, as PS3.15 B.1 now requires)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(ctx, tls)
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_certificate else ssl.CERT_NONE
    return ctx


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The SCU's context: the destination's certificate must chain to the CA; we
    present our own certificate for peers that require one."""
    if tls.ca_certificates is not None:  # the configured CA only, not the system's
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(ctx, tls)
    return ctx


def _load_identity(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError("tls.certificate and tls.private_key are required for TLS")
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load certificate/private key: {exc}") from exc
