"""The decode benchmark as a script: ``python benchmarks/bench_decode.py [options]`` is
``python -m pa_hybrid.bench [options]`` (see ``pa_hybrid/bench/decode.py``); pa_hybrid
must be importable (``pip install -e .``)."""

import os
import sys

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        # Triton's CPU interpreter must be on before pa_hybrid defines its kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from pa_hybrid.bench.decode import main

    sys.exit(main(sys.argv[1:]))
