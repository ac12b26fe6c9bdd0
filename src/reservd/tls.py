"""TLS for the gRPC port: server credentials that pick up rotated certificates without a
restart, and client channel credentials.

grpcio's dynamic server credentials call a *certificate configuration fetcher* at each new
handshake; returning ``None`` keeps the current configuration. The fetcher here looks at the
files at most every ``reload_seconds`` and hands over a new configuration only when a file
changed and the new certificate and key load and match (``ssl.SSLContext.load_cert_chain``
checks that), so a rotation caught half-written keeps the old pair instead of breaking
handshakes. Connections already open keep their session.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from pathlib import Path

import grpc

from reservd.config import ConfigError

log = logging.getLogger("reservd.tls")


class TlsConfigError(ConfigError):
    """A TLS setting an operator must fix (one line, names the file or key)."""


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsConfigError(f"{key}: cannot read {path}: {error.strerror}") from None


class CertificateFiles:
    """The server's certificate, key and (optional) client CA, reloaded when they change."""

    def __init__(
        self, cert_file: Path, key_file: Path, client_ca_file: Path | None,
        reload_seconds: float,
    ) -> None:
        self.paths = (Path(cert_file), Path(key_file), client_ca_file and Path(client_ca_file))
        self.reload_seconds = reload_seconds
        self.reloads = 0
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = self._stat()
        self.initial = self._load()

    def _stat(self) -> tuple:
        stamps = []
        for path in self.paths:
            if path is None:
                continue
            try:
                info = os.stat(path)
            except OSError:
                return ()
            stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_file, key_file, ca_file = self.paths
        cert = _read(cert_file, "tls_cert_file")
        key = _read(key_file, "tls_key_file")
        ca = _read(ca_file, "tls_client_ca_file") if ca_file is not None else None
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_file, key_file)
            if ca_file is not None:
                context.load_verify_locations(ca_file)
        except ssl.SSLError as error:
            raise TlsConfigError(
                f"tls_cert_file/tls_key_file: {cert_file}, {key_file}: {error.reason or error}"
            ) from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The fetcher grpc calls at each handshake: a new configuration, or None to keep it."""
        now = time.monotonic()
        if now - self._checked < self.reload_seconds:
            return None
        with self._lock:
            if now - self._checked < self.reload_seconds:
                return None
            self._checked = now
            stamp = self._stat()
            if not stamp or stamp == self._stamp:
                return None
            try:
                config = self._load()
            except TlsConfigError as error:
                log.warning("certificate reload skipped", extra={"error": str(error)})
                return None
            if self._stat() != stamp:
                return None  # replaced while being read: take it at the next check
            self._stamp = stamp
            self.reloads += 1
            log.info("certificates reloaded", extra={"cert_file": str(self.paths[0])})
            return config


def server_credentials(config) -> tuple[grpc.ServerCredentials, CertificateFiles] | None:
    """Credentials for ``add_secure_port`` from a Config, or None when TLS is off."""
    if config.tls_cert_file is None and config.tls_key_file is None:
        if config.tls_client_ca_file is not None or config.tls_require_client_auth:
            raise TlsConfigError("tls_client_ca_file: needs tls_cert_file and tls_key_file")
        return None
    if config.tls_cert_file is None or config.tls_key_file is None:
        missing = "tls_cert_file" if config.tls_cert_file is None else "tls_key_file"
        raise TlsConfigError(f"{missing}: TLS needs both a certificate and its key")
    if config.tls_require_client_auth and config.tls_client_ca_file is None:
        raise TlsConfigError("tls_require_client_auth: needs tls_client_ca_file")
    files = CertificateFiles(
        config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file,
        config.tls_reload_seconds,
    )
    credentials = grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch,
        require_client_authentication=config.tls_require_client_auth,
    )
    return credentials, files


def channel_credentials(
    ca_file: str | Path | None, cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """Client side: trust ``ca_file`` (None: the system roots); present the client certificate
    when ``cert_file`` and ``key_file`` are given (mutual TLS)."""
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError("--cert and --key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(Path(ca_file), "--ca") if ca_file else None,
        private_key=_read(Path(key_file), "--key") if key_file else None,
        certificate_chain=_read(Path(cert_file), "--cert") if cert_file else None,
    )
