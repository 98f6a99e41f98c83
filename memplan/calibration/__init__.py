"""Calibration: measure real training steps, record them, fit the overhead corrections, publish the error.

- `grid`     -- the grid YAML: which configurations to measure, and how;
- `runner`   -- the parent: one fresh process per configuration, resume, progress events;
- `worker`   -- the child: build, warm up, reset the peak statistics, measure, one record;
- `meter`    -- what a worker reads: CUDA allocator statistics + NVML, or live bytes on the CPU;
- `records`  -- the JSONL store: atomic appends, torn last lines ignored;
- `fitting`  -- context, workspace and allocator slack per GPU family -> corrections.json;
- `report`   -- REPORT.md and the estimate-vs-measured chart.

Only `worker` and `meter` import torch; the rest is safe to import from the CLI.
"""
