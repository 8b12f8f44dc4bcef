"""`python -m workers.worker [rq worker options] QUEUE...`: the standard `rq worker`, plus a start-up
line and a worker that rides out Redis outages.

It logs which dlib this machine runs (BLAS / AVX; a warning for the slow build), preloads the default
face models before the first job, and hands over to rq's own command-line worker (so every `rq worker`
option works) with `--worker-class workers.worker.ResilientWorker` unless another class is given.

rq 3.0's worker retries a lost connection only while it waits for a job (`dequeue_job_and_maintain_ttl`);
a Redis error anywhere else in its loop (the heartbeat after a job, the work-horse monitor, the
suspension check, maintenance) ends `work()` and the process: after a Redis restart every worker was
gone. ResilientWorker keeps monitoring its work-horse through an outage, and when rq's loop ends for
a lost connection it waits for Redis with a capped backoff and starts the loop again.

It also keeps every project reconciled with Label Studio when no webhook or refit comes: between
jobs and on an idle timer it queues `reconcile_project` for the projects that are due (see
ResilientWorker.dequeue_job_and_maintain_ttl).
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import time

import redis as redis_lib
from rq import Worker
from rq.job import JobStatus

from workers.connection import redis_url
from workers.pipeline import PipelineOptions, describe_dlib, fingerprint, get_pipeline

#: Modules whose functions run as jobs on subdisc's queue.
JOB_MODULES = ("workers.jobs", "backend.predict_jobs", "backend.refit", "backend.reconcile")
#: Errors that mean "Redis is away", not "this job is wrong".
REDIS_DOWN = (redis_lib.exceptions.ConnectionError, redis_lib.exceptions.TimeoutError)
#: Seconds between reconnection attempts: doubling from the first to the last.
BACKOFF = (0.5, 5.0)
#: Seconds between rq's maintenance (registry clean-up: a job abandoned by a work-horse that died
#: while Redis was away is retried from there). rq's default is 10 minutes.
MAINTENANCE_INTERVAL = 60
#: rq's worker TTL (--worker-ttl): an idle worker wakes every WORKER_TTL - 15 s, so maintenance
#: runs about every MAINTENANCE_INTERVAL.
WORKER_TTL = 75

log = logging.getLogger("subdisc.worker")


class ResilientWorker(Worker):
    """rq's forking Worker that never exits on a Redis ConnectionError: it reconnects with backoff."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL)
        super().__init__(*args, **kwargs)
        self.reconnections = 0
        self._redis_lost = False
        self._interrupted = None
        self._next_reconcile_look = 0.0

    # --- where rq's loop lets a Redis error end the worker -------------------------------------
    def maintain_heartbeats(self, job, execution):
        # Called while the work-horse runs: losing Redis here must not abandon a live horse.
        try:
            super().maintain_heartbeats(job, execution)
        except REDIS_DOWN as exc:
            self.log.warning("Worker %s: cannot send the job's heartbeat (%s); the work-horse goes on",
                             self.name, exc)

    def execute_job(self, job, queue):
        try:
            return super().execute_job(job, queue)
        except REDIS_DOWN:
            self._redis_lost = True
            self._interrupted = (job, queue)   # dequeued, and perhaps never run: see _resume_job
            raise

    def heartbeat(self, *args, **kwargs):
        return self._noting_redis_loss(super().heartbeat, *args, **kwargs)

    def check_for_suspension(self, burst):
        return self._noting_redis_loss(super().check_for_suspension, burst)

    def run_maintenance_tasks(self):
        return self._noting_redis_loss(super().run_maintenance_tasks)

    def _noting_redis_loss(self, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except REDIS_DOWN:
            self._redis_lost = True
            raise

    # --- periodic reconciliation with Label Studio -----------------------------------------------
    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """rq's wait for a job, cut into looks for projects due a reconciliation.

        Why here rather than rq's scheduler with a job that queues itself again: that chain lives in
        Redis and breaks for good when one link is lost (a Redis restart without its files, a job
        killed between running and re-queueing, workers started without --with-scheduler), and
        needs a bootstrap of its own. Here there is no state but the per-project claim (a key with
        a TTL, taken with SET NX: of N workers one queues the job), every live worker keeps looking,
        and a look is a few Redis commands every look_every() s (30 s by default): an idle worker
        still blocks in Redis in between. rq's own max_idle_time is the timer: each wait ends after
        one look period, and the caller's max_idle_time, if any, is still kept.
        """
        if timeout is None:                     # burst mode: one look, no waiting
            self._queue_due_reconciliations()
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        idle_since = time.monotonic()
        while True:
            self._queue_due_reconciliations()
            wait = self._next_reconcile_look - time.monotonic()
            if max_idle_time is not None:
                left = max_idle_time - (time.monotonic() - idle_since)
                if left <= 0:
                    return None
                wait = min(wait, left)
            result = super().dequeue_job_and_maintain_ttl(timeout, max(1, math.ceil(wait)))
            if result is not None:
                return result

    def _queue_due_reconciliations(self) -> None:
        """Queue reconcile_project for the due projects, at most once per look_every() s."""
        from backend.reconcile import look_every, schedule_due_reconciliations

        now = time.monotonic()
        if now < self._next_reconcile_look:
            return
        self._next_reconcile_look = now + look_every()
        try:
            # The first queue is the one this worker serves first: the job runs on subdisc's queue.
            schedule_due_reconciliations(self.connection, self.queues[0].name)
        except REDIS_DOWN:
            pass    # rq's wait that follows rides out the outage; the next look tries again
        except Exception:  # noqa: BLE001 - a look that fails must not stop this worker's jobs
            self.log.exception("Worker %s: could not look for projects due a reconciliation", self.name)

    # --- the loop around rq's loop ---------------------------------------------------------------
    def work(self, burst: bool = False, *args, **kwargs) -> bool:
        worked = False
        while True:
            self._redis_lost = False
            try:
                worked = super().work(burst, *args, **kwargs) or worked
            except REDIS_DOWN:   # in start-up (register_birth) or teardown (register_death)
                self._redis_lost = True
            if not self._redis_lost or self._stop_requested:
                return worked
            self.reconnections += 1
            self._wait_for_redis()
            self._forget_last_life()
            self._resume_job()

    def _wait_for_redis(self) -> None:
        wait, cap = BACKOFF
        started = time.monotonic()
        while not self._stop_requested:
            try:
                self.connection.ping()
                self.log.warning("Worker %s: Redis is back after %.1f s; starting again (reconnection %d)",
                                 self.name, time.monotonic() - started, self.reconnections)
                return
            except REDIS_DOWN as exc:
                self.log.warning("Worker %s: Redis unavailable (%s); next try in %.1f s",
                                 self.name, exc, wait)
            time.sleep(wait)
            wait = min(2 * wait, cap)

    def _resume_job(self) -> None:
        """The job in hand when Redis went away, put back in line at once.

        Dequeued but not started (Redis died between the two), it sits in rq's intermediate queue,
        which only maintenance clears, a minute after first seeing it; started, with its work-horse
        gone, it waits for its registry entry to expire. Either way the job would idle for minutes.
        Not started: back to the front of its queue. Started and unfinished: a failure, which RQ
        retries while the job has retries left (as when a work-horse is killed).
        """
        if self._interrupted is None:
            return
        (job, queue), self._interrupted = self._interrupted, None
        if self._horse_pid:
            try:
                os.waitpid(self._horse_pid, 0)
            except ChildProcessError:
                pass
            self._horse_pid = 0
        try:
            status = job.get_status()
        except Exception:  # noqa: BLE001 - gone (InvalidJobOperation / NoSuchJobError): nothing to do
            return
        try:
            queue.connection.lrem(queue.intermediate_queue_key, 1, job.id)
            if status == JobStatus.QUEUED:
                self.log.warning("Worker %s: job %s was dequeued as Redis went away; queued again",
                                 self.name, job.id)
                queue.push_job_id(job.id, at_front=True)
            elif status == JobStatus.STARTED:
                self.log.warning("Worker %s: job %s was cut off by the Redis outage; failing it so RQ "
                                 "retries it", self.name, job.id)
                execution = next((e for e in list(getattr(self, "executions", {}).values())
                                  if getattr(e, "job_id", None) == job.id), None)
                self.handle_job_failure(job, queue, exc_string="cut off by a Redis outage",
                                        execution=execution)
        except REDIS_DOWN:
            pass   # gone again: the registries' clean-up takes it from here

    def _forget_last_life(self) -> None:
        """What rq's teardown would have done had Redis answered: a clean slate for work()."""
        try:
            self.unsubscribe()      # its pubsub thread would hold a dead connection
        except Exception:  # noqa: BLE001 - a half-closed pubsub: nothing more to release
            pass
        self.pubsub = self.pubsub_thread = None
        try:
            # register_birth refuses a name whose key lives on without a death date (the AOF kept it).
            self.register_death()
        except REDIS_DOWN:
            pass
        # Clean the registries at once: jobs of horses that died while Redis was away come back.
        self.last_cleaned_at = None


def main(argv: list[str] | None = None) -> None:
    # One BLAS thread per worker: workers are the parallelism (one process per core), and
    # OpenBLAS's own threads on top oversubscribe the cores (measured: 45 ms per descriptor under
    # load instead of 9). Must be set before dlib loads OpenBLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("worker pid %d: %s", os.getpid(), describe_dlib())
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
    if not any(a == "--worker-ttl" or a.startswith("--worker-ttl=") for a in argv):
        # An idle worker blocks on Redis for worker_ttl - 15 s and runs its maintenance only in
        # between: rq's 420 s default left jobs stuck by an outage for 7 minutes.
        argv = ["--worker-ttl", str(WORKER_TTL), *argv]
    if not any(a in ("-w", "--worker-class") or a.startswith("--worker-class=") for a in argv) \
            and not os.environ.get("RQ_WORKER_CLASS"):
        argv = ["--worker-class", "workers.worker.ResilientWorker", *argv]
    sys.argv = ["rq", "worker", *argv]
    rq_main()


if __name__ == "__main__":
    main()
