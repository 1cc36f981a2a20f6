# Compiles the CUDA plugin's kernel module with NVRTC, as the plugin does at run time, on a machine without a GPU:
# syntax and type errors, and with ptxas options register counts and spills, show before a device call.
#
#   pip install nvidia-cuda-nvrtc   # (or any CUDA toolkit's libnvrtc)
#   python3 scripts/check_cuda_kernels.py [--arch sm_90] [--ptxas-verbose] [--libnvrtc PATH]
#
# The parts are those of `SOURCES` in backends/cuda/src/kernels.rs, in its order (keep the two in step).
import argparse
import ctypes
import glob
import os
import sys

PARTS = ["common.cuh", "elementwise.cu", "rows.cu", "flash_common.cuh", "flash.cu", "flash_bwd.cu", "gemv.cu"]

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="compute_90", help="compute_XX for PTX, sm_XX for a cubin (ptxas runs)")
ap.add_argument("--ptxas-verbose", action="store_true", help="print registers and spills per kernel (needs sm_XX)")
ap.add_argument("--libnvrtc", help="path of libnvrtc.so (default: the pip package's, then the system's)")
a = ap.parse_args()

candidates = [a.libnvrtc] if a.libnvrtc else []
for base in sys.path:
    candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")))
candidates += ["libnvrtc.so"]
lib = None
for c in candidates:
    try:
        lib = ctypes.CDLL(c)
        break
    except OSError:
        continue
if lib is None:
    sys.exit("no libnvrtc found: pip install nvidia-cuda-nvrtc, or pass --libnvrtc")

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "backends", "cuda", "kernels")
src = "\n".join(open(os.path.join(root, p)).read() for p in PARTS).encode()
prog = ctypes.c_void_p()
if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"sd3_kernels.cu", 0, None, None) != 0:
    sys.exit("nvrtcCreateProgram failed")
opts = [f"--gpu-architecture={a.arch}".encode(), b"--std=c++17"]
if a.ptxas_verbose:
    opts.append(b"--ptxas-options=-v")
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
lib.nvrtcGetProgramLog(prog, log)
print(log.value.decode())
print("compiled" if rc == 0 else f"NVRTC error {rc}")
sys.exit(rc)
