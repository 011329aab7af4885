"""A backend-neutral rank program for the conformance suite.

    workload.py ok      print a greeting, report three steps of "loss", exit 0
    workload.py fail    rank 1 prints a marker and exits 3; other ranks wait
    workload.py sleep   print "started" and sleep for a minute
"""

import os
import sys
import time

import dsnb

rank = int(os.environ.get("RANK", "0"))
mode = sys.argv[1] if len(sys.argv) > 1 else "ok"

if mode == "ok":
    print(f"hello from rank {rank} of {os.environ.get('WORLD_SIZE')}")
    for step in range(1, 4):
        dsnb.report(step=step, loss=1.0 / step, total_steps=3)
    print(f"rank {rank} done")
elif mode == "fail":
    if rank == 1:
        print("about to fail: marker-7f3a", flush=True)
        sys.exit(3)
    time.sleep(60)
elif mode == "sleep":
    print(f"started rank {rank}", flush=True)
    time.sleep(60)
else:
    sys.exit(f"unknown mode {mode!r}")
