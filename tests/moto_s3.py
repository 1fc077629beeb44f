"""moto's S3 server on a free loopback port, for tests and benchmarks that need a real S3 API."""

from __future__ import annotations

import logging
from typing import Any


def start_s3(bucket: str) -> tuple[Any, dict[str, str]]:
    """Start the server with ``bucket`` created; returns it and the AWS_* environment that reaches
    it (give that to any process that opens ``s3://`` URLs; s3fs reads it from the environment)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    import s3fs

    fs = s3fs.S3FileSystem(
        key=aws["AWS_ACCESS_KEY_ID"],
        secret=aws["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=aws["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )
    fs.mkdir(bucket)
    return server, aws
