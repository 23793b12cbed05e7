"""A real S3-protocol server for tests: moto's WSGI app served by werkzeug on 127.0.0.1 with a free port.

One server per test process (started on first use, in a daemon thread). Every request it serves is logged
(method, path, query, Range and If-None-Match headers), so tests can count what a reader asked for. Each
test gets its own bucket (``new_bucket``) and storage options with a distinctive fake secret.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

# Fake credentials: moto accepts any; tests grep outputs for SECRET to prove it never leaks.
ACCESS_KEY = "FSTESTACCESSKEY7Q2X"
SECRET = "fs-test-secret-" + uuid.uuid4().hex
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Request:
    """One request the server answered."""

    method: str
    path: str
    query: str
    range: str | None
    if_none_match: str | None


@dataclass
class S3Server:
    """The running server: its endpoint and the log of requests it served."""

    endpoint: str
    requests: list[S3Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slow_part_uploads: float = 0.0  # seconds each multipart UploadPart is held (a slow network, for kill tests)

    def storage_options(self) -> dict[str, Any]:
        """s3fs options pointing at this server, with the test secret as the credentials."""
        return {"key": ACCESS_KEY, "secret": SECRET,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION}}

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables pointing a subprocess at this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def mark(self) -> int:
        """Position in the request log (pass to :meth:`since`)."""
        with self.lock:
            return len(self.requests)

    def since(self, mark: int, bucket: str | None = None) -> list[S3Request]:
        """Requests served after ``mark`` (only those for ``bucket`` when given)."""
        with self.lock:
            reqs = self.requests[mark:]
        if bucket is not None:
            reqs = [r for r in reqs if r.path == f"/{bucket}" or r.path.startswith(f"/{bucket}/")]
        return reqs


def _logging_app(app: Callable[..., Any], server: S3Server) -> Callable[..., Any]:
    def logged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        req = S3Request(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""),
                        environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE"),
                        environ.get("HTTP_IF_NONE_MATCH"))
        with server.lock:
            server.requests.append(req)
        if server.slow_part_uploads and req.method == "PUT" and "partNumber=" in req.query:
            time.sleep(server.slow_part_uploads)
        return app(environ, start_response)
    return logged


_server: S3Server | None = None
_server_lock = threading.Lock()
_bucket_ids = itertools.count()


def s3_server() -> S3Server:
    """The process's S3 server, started on first call (about half a second)."""
    global _server
    with _server_lock:
        if _server is None:
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
            # Small multipart parts (tests upload shards of a few hundred KB in parts); S3's minimum is 5 MiB.
            os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(64 << 10))
            from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                        create_backend_app)
            from werkzeug.serving import make_server

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
            holder = S3Server(endpoint="")
            httpd = make_server("127.0.0.1", 0, _logging_app(DomainDispatcherApplication(create_backend_app), holder),
                                threaded=True, request_handler=MotoRequestHandler)
            holder.endpoint = f"http://127.0.0.1:{httpd.server_port}"
            threading.Thread(target=httpd.serve_forever, name="moto-s3", daemon=True).start()
            _server = holder
        return _server


def new_bucket(server: S3Server) -> str:
    """Create a fresh, empty bucket; returns its name."""
    import boto3  # installed with moto

    name = f"fs-test-{os.getpid()}-{next(_bucket_ids)}-{uuid.uuid4().hex[:6]}"
    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET, region_name=REGION)
    client.create_bucket(Bucket=name)
    return name
