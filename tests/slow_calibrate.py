"""`memplan ARGS...` whose calibration workers wait SECONDS before each measurement
(`python tests/slow_calibrate.py SECONDS ARGS...`), for tests that kill or race runs."""

import sys
from pathlib import Path

from memplan.calibration import runner
from memplan.cli import main

delay = sys.argv.pop(1)
runner.WORKER = (str(Path(__file__).with_name("slow_worker.py")), delay)
main()
