# Compile the CUDA plugin's kernel module with NVRTC (no GPU needed): catches syntax and type errors.
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
root = "/work/main/backends/cuda/kernels/"
parts = ["common.cuh", "elementwise.cu", "rows.cu", "flash_common.cuh", "flash.cu", "flash_bwd.cu", "gemv.cu"]
src = "\n".join(open(root + p).read() for p in parts).encode()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"k.cu", 0, None, None) == 0
arch = sys.argv[2] if len(sys.argv) > 2 else "compute_90"
opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"] + [o.encode() for o in sys.argv[3:]]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
lib.nvrtcGetProgramLog(prog, log)
print("rc", rc); print(log.value.decode()[:6000])
if rc == 0:
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size)); ptx = ctypes.create_string_buffer(size.value); lib.nvrtcGetPTX(prog, ptx)
    open("/tmp/k.ptx", "w").write(ptx.value.decode()); print("ptx bytes", size.value)
