"""The calibration worker, each measurement started after a delay: lets tests kill a run mid-grid
or hit a timeout. Used as `python tests/slow_worker.py SECONDS [--serve]` in place of the worker
module (the runner's WORKER); the fork server's children inherit the patched `run_job`."""

import sys
import time

from memplan.calibration import worker

delay = float(sys.argv.pop(1))
measure = worker.run_job


def slow_run_job(job, settings):
    time.sleep(delay)
    return measure(job, settings)


worker.run_job = slow_run_job
worker.main()
