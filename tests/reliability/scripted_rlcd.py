"""`rlcd` in a subprocess with the scripted engine in place of a model (cheap to start, kill and resume).

    python scripted_rlcd.py simulate --prompts-file ... --out-dir ...

$RLCD_TEST_DELAY: seconds the engine sleeps per generate call, so that a run lasts long enough to be
killed, or to overlap with another process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rel_helpers import scripted_simulate  # noqa: E402

if __name__ == "__main__":
    assert sys.argv[1] == "simulate"
    scripted_simulate(*sys.argv[2:], delay=float(os.environ.get("RLCD_TEST_DELAY", "0")))
