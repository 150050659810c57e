"""``python -m ivpt.bench probe SPEC``: one memory probe in a fresh process (see ``measure_peak_mb``)."""
import sys

from . import _probe_main

if len(sys.argv) == 3 and sys.argv[1] == "probe":
    _probe_main(sys.argv[2])
