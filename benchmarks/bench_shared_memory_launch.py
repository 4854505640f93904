"""Does asking for much dynamic shared memory cost a small call time? An empty kernel (one
store per CTA) with 0/48/100/200 KB of dynamic shared memory on 16 and 132 CTAs of 256
threads, timed as the bench times calls (graph replay after the 256 MB fill flush, median);
and after a clean read flush."""
import ctypes

import torch

from pa_hybrid import runtime
from pa_hybrid.bench.timing import FLUSH_BYTES, _interleaved_samples, capture_graph, streaming_reads

PTX = r"""
.version 8.0
.target sm_90
.address_size 64
.extern .shared .align 16 .b8 smem[];
.visible .entry touch(.param .u64 out) {
    .reg .u64 %rd<4>;
    .reg .u32 %r<4>;
    .reg .pred %p<2>;
    ld.param.u64 %rd1, [out];
    cvta.to.global.u64 %rd1, %rd1;
    mov.u32 %r1, %tid.x;
    setp.ne.u32 %p1, %r1, 0;
    @%p1 bra DONE;
    mov.u32 %r2, %ctaid.x;
    mul.wide.u32 %rd2, %r2, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r2;
DONE:
    ret;
}
"""


class Args(ctypes.Structure):
    _fields_ = [("out", ctypes.c_uint64)]


def main():
    fn = runtime.load_function(PTX.encode(), "touch", 0)
    out = torch.zeros(1024, dtype=torch.int32, device="cuda")
    args = Args(out.data_ptr())
    dirty = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    (clean,) = streaming_reads(FLUSH_BYTES, configs=((2048, 8, 4),)).values()
    graphs = {}
    for ctas in (16, 132):
        for kb in (0, 48, 100, 200):
            launch = lambda ctas=ctas, kb=kb: runtime.launch_packed(fn, (ctas, 1, 1), 256, kb * 1024, args)
            launch()
            graphs[(ctas, kb)] = capture_graph(launch)
    torch.cuda.synchronize()
    for name, flush in (("dirty", lambda: dirty.fill_(0)), ("clean", clean)):
        t = _interleaved_samples({k: g.replay for k, g in graphs.items()}, samples=40, warmup=3, before_each=flush)
        print(f"{name} flush: " + "  ".join(f"{c} CTAs {kb} KB {t[(c, kb)].median_us:.2f}" for c, kb in graphs), flush=True)


if __name__ == "__main__":
    main()
