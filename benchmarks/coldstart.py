"""Measurement 4: a cold start, as the Python worker does it: import function_app, index its functions."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from devstack.procs import ROOT

_PROBE = """
import json, time
started = time.perf_counter()
import azure.functions
worker = time.perf_counter()
import function_app
imported = time.perf_counter()
functions = function_app.app.get_functions()
indexed = time.perf_counter()
print(json.dumps({"import": imported - started, "app_import": imported - worker, "index": indexed - imported,
                  "functions": len(functions)}))
"""


def cold_start_benchmark(env: dict[str, str], *, runs: int = 7) -> dict:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        output = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                                check=True, timeout=60).stdout
        process = time.perf_counter() - started
        samples.append({**json.loads(output.strip().splitlines()[-1]), "process": process})
    return {
        "runs": runs,
        "functions": samples[0]["functions"],
        "import_ms": statistics.median(s["import"] for s in samples) * 1000,
        # The Python worker has azure.functions loaded before it imports the app: the app's own share.
        "app_import_ms": statistics.median(s["app_import"] for s in samples) * 1000,
        "index_ms": statistics.median(s["index"] for s in samples) * 1000,
        "import_and_index_ms": statistics.median(s["import"] + s["index"] for s in samples) * 1000,
        "process_ms": statistics.median(s["process"] for s in samples) * 1000,
        "samples": samples,
    }
