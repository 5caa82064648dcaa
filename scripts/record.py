"""Benchmark records for the Python side (the reference, PyTorch SDPA, CPU timings): the same
format as `nsa_infer::record::Record` (schema `nsa-bench-record/1`), read by
`scripts/bench_report`.
"""

import json
import os
import time

SCHEMA = "nsa-bench-record/1"


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_record(path, tool, commit, backend, device, settings, result):
    """Writes one record (atomically). `commit`: the code it measured (the nsa binaries' commit
    for the figures beside them)."""
    record = dict(
        schema=SCHEMA,
        tool=tool,
        commit=commit or "unknown",
        date=utc_now(),
        backend=backend,
        device=device,
        host_cpus=os.cpu_count() or 0,
        env=sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("NSA_")),
        settings=settings,
        result=result,
    )
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
