"""Child process of tests/test_resume_process.py: kill runs mid-stream, or resume them, each in a fresh process.

    python tests/_resume_child.py SPEC.json

SPEC: {"mode": "crash" | "resume", "data_root": DIR, "cases": [{"id", "config", "overrides", "out", "kill_after",
"rng_probe"}, ...]}. This process imports torch and the package once, then forks one process per case, which
runs `engine.run` on the case's config and either dies with `os._exit(KILLED)` right after batch `kill_after`
(mode crash: no exception, no cleanup, like a SIGKILL) or resumes the run from its folder (mode resume). No
forked process has run anything before its case, so nothing but the run folder carries over between the killed
and the resumed run. Prints one JSON line per case, {"id", "exit_code"}; with `rng_probe`, the number of probed
steps goes to OUT/rng_probe_calls.<mode>.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
from collections.abc import Callable
from typing import Any

KILLED = 17  # the exit code of a deliberately killed run
PROBE_FILE = "rng_probe_calls"


def probe_builder(real: Callable[..., Any], count: Callable[[], None] | None = None) -> Callable[..., Any]:
    """Wrap `build_method` so that every step first jitters the batch with torch, NumPy and Python global random
    numbers (as augmentation-based methods such as CoTTA or MEMO draw them): a resume that did not restore the
    RNG states would then see other numbers and produce other results."""
    import numpy as np
    import torch

    def build(*args: Any, **kwargs: Any) -> Any:
        method = real(*args, **kwargs)
        if not method.adapts:  # the run guard's frozen reference (`norm`), built beside the method: left as it is
            return method
        step = method.step

        def noisy_step(x: torch.Tensor) -> torch.Tensor:
            if count is not None:
                count()
            jitter = 0.03 * torch.randn_like(x) + 0.01 * float(np.random.standard_normal()) + 0.01 * random.random()
            return step((x + jitter).clamp(0, 1))

        method.step = noisy_step
        return method

    return build


def _run_case(case: dict[str, Any], mode: str, data_root: str) -> None:
    """The body of one forked process; never returns."""
    from pathlib import Path

    import tta_surgical.engine as methods  # build_method as the engine calls it
    from tta_surgical.config import load_config
    from tta_surgical.engine import run
    from tta_surgical.runfolder import CHECKPOINT_THREAD

    code = 2
    try:
        calls = [0]
        if case.get("rng_probe"):
            methods.build_method = probe_builder(methods.build_method, lambda: calls.__setitem__(0, calls[0] + 1))
        cfg = load_config(case["config"], overrides=case["overrides"])
        out = Path(case["out"])
        probe_path = out / f"{PROBE_FILE}.{mode}"

        def die_after(batch_index: int, record: dict) -> None:
            if batch_index == case["kill_after"]:
                # The domain boundary's checkpoint is made durable on a thread; on a loaded machine it can still be
                # in flight a batch later, and a kill then resumes from the run's start (correct, but not the resume
                # from the boundary this test is about). Die once that disk work is done, as a kill a moment later.
                for t in threading.enumerate():
                    if t.name == CHECKPOINT_THREAD:
                        t.join(timeout=120)
                probe_path.write_text(str(calls[0]))
                sys.stdout.flush()
                os._exit(KILLED)

        if mode == "crash":
            run(cfg, out, data=data_root, on_batch=die_after, record_predictions=True)
            code = 3  # the run ended without reaching the batch it should have died after
        else:
            run(cfg, out, data=data_root, resume=True, record_predictions=True)
            probe_path.write_text(str(calls[0]))
            code = 0
    except BaseException:  # report anything to the parent through the exit code and the traceback on stderr
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(spec_path: str) -> int:
    import torch

    torch.set_num_threads(1)
    # Import everything a run imports before forking, so each case pays only for its run.
    import tta_surgical.engine  # noqa: F401
    import tta_surgical.methods  # noqa: F401
    import tta_surgical.models  # noqa: F401
    import tta_surgical.streams  # noqa: F401

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    failed = False
    for case in spec["cases"]:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _run_case(case, spec["mode"], spec["data_root"])
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        failed |= code != (KILLED if spec["mode"] == "crash" else 0)
        print(json.dumps({"id": case["id"], "exit_code": code}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
