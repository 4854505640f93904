"""``python -m pa_hybrid.bench [options]``: the decode benchmark (see ``decode.py``).

Without a GPU the benchmark runs its portable smoke case through Triton's CPU
interpreter, which must be switched on (TRITON_INTERPRET=1) before any kernel is
defined. ``python -m`` has already imported ``pa_hybrid`` (and so defined the
kernels) by the time this file runs, so in that case the command re-executes
itself once with the variable set.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    argv = [sys.executable, "-m", "pa_hybrid.bench", *sys.argv[1:]]
    os.execve(sys.executable, argv, {**os.environ, "TRITON_INTERPRET": "1"})

from pa_hybrid.bench.decode import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
