"""`python -m workers.worker [rq worker options] QUEUE...`: the standard `rq worker`, plus a start-up line.

It logs which dlib this machine runs (BLAS / AVX; a warning for the slow build) and then hands over
to rq's own command-line worker, so every `rq worker` option works. Plain `rq worker` works as well;
this wrapper only adds the log line and preloads the default face models before the first job.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from workers.connection import redis_url
from workers.pipeline import PipelineOptions, describe_dlib, fingerprint, get_pipeline

#: Modules whose functions run as jobs on subdisc's queue.
JOB_MODULES = ("workers.jobs", "backend.predict_jobs", "backend.refit")


def main(argv: list[str] | None = None) -> None:
    # One BLAS thread per worker: workers are the parallelism (one process per core), and
    # OpenBLAS's own threads on top oversubscribe the cores (measured: 45 ms per descriptor under
    # load instead of 9). Must be set before dlib loads OpenBLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("subdisc.worker").info("worker pid %d: %s", os.getpid(), describe_dlib())
    # Load in the parent what every job needs, so each forked work-horse inherits it instead of
    # paying for it per job: the face models, the model files' digests (the cache fingerprint
    # hashes ~120 MB), and the job modules of this queue.
    get_pipeline(PipelineOptions())
    fingerprint(PipelineOptions())
    for module in JOB_MODULES:
        importlib.import_module(module)
    from rq.cli import main as rq_main

    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "-u" or a.startswith("--url") for a in argv):
        argv = ["--url", redis_url(), *argv]
    sys.argv = ["rq", "worker", *argv]
    rq_main()


if __name__ == "__main__":
    main()
