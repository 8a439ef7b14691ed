"""Sweep runners for tests that need real processes (tests/test_sweep_orphans.py): importable by module path, so
local worker subprocesses and a driver started with `python tests/_sweep_runners.py` can run them.

`locking_runner` behaves like the engine where it matters here: it holds the cell folder's writer lock while it
works (`runfolder.folder_lock`), then sleeps `OUT/control.json`'s "sleep" seconds, and records its pid in the
cell folder (`started`) and each finish in `OUT/success.log`.

    python tests/_sweep_runners.py SWEEP.yaml OUT N   # a driver: run_sweep with N worker processes
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def locking_runner(kind, config, out_dir, *, data=None):
    from tta_surgical.runfolder import folder_lock

    out_dir = Path(out_dir)
    root = out_dir.parents[1]  # OUT/cells/<id> -> OUT
    control = json.loads((root / "control.json").read_text()) if (root / "control.json").is_file() else {}
    with folder_lock(out_dir):
        (out_dir / "started").write_text(f"{os.getpid()}\n")
        time.sleep(float(control.get("sleep", 0)))
        with open(root / "success.log", "a") as f:
            f.write(f"{out_dir.name} {os.getpid()}\n")
    return {"mean_error": 1.0, "online_error": 1.0, "errors": {"x": 1.0}}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _sweep_runners import locking_runner as runner  # by module name, as the workers import it

    from tta_surgical.sweep import load_sweep, run_sweep

    sweep_file, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run_sweep(load_sweep(sweep_file), out, runner=runner, max_parallel=n, progress=False)
