"""devstack.host with every storage request it sends counted, for the fan-out benchmark (benchmarks/fanout.py).

    python -m benchmarks.counted_host --counts FILE [devstack.host's options]

The worker hosts are processes of their own, so the benchmark cannot count their Table transactions at its
storage clients as the other sections do: this counts them at the same place (azure-core's requests transport,
one `send` per REST request, what Azure bills), by service (table, queue) and kind, and writes them to FILE as
JSON when the host stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from azure.core.pipeline.transport import RequestsTransport

from benchmarks.stack import request_kind
from devstack import host


def endpoints(connection_string: str) -> dict[str, str]:
    """{host:port: service} of a storage connection string's table and queue endpoints."""
    parts = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    return {urlsplit(parts[name]).netloc: service for name, service in (("TableEndpoint", "table"),
                                                                         ("QueueEndpoint", "queue")) if name in parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.counted_host", description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=Path, required=True, help="where the counts go when the host stops")
    args, host_args = parser.parse_known_args(argv)
    services = endpoints(os.environ.get("AzureWebJobsStorage", ""))  # noqa: SIM112 - the host's own name
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    send = RequestsTransport.send

    def counted(self, request, **kwargs):
        kind = f"{services.get(urlsplit(request.url).netloc, 'other')}:{request_kind(request.method, request.url)}"
        with lock:
            counts[kind] += 1
        return send(self, request, **kwargs)

    RequestsTransport.send = counted
    # Stopped with SIGINT (devstack.procs), which a shell's background job would have us ignore: the counts are
    # written only when the host stops cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return host.main(host_args)
    finally:
        with lock:
            args.counts.write_text(json.dumps(dict(counts)))


if __name__ == "__main__":
    sys.exit(main())
