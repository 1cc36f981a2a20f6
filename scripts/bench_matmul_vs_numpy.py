#!/usr/bin/env python3
"""f32 matmul 2048³ on 2 threads: sd3's CPU backend against numpy (OpenBLAS), side by side.

Usage: python3 scripts/bench_matmul_vs_numpy.py [--n 2048] [--threads 2] [--rounds 3] [--python PY]

Needs numpy in PY (default: this interpreter), e.g. a venv outside the repo: `python3 -m venv ~/venv-np &&
~/venv-np/bin/pip install numpy`, then `--python ~/venv-np/bin/python`. Builds the Rust side with
`cargo build --release -p sd3-backend-cpu --example matmul_bench`.

For numpy: OPENBLAS_NUM_THREADS=THREADS, and OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset (for this comparison
only), so OpenBLAS picks its own kernel for this CPU. Ours: SD3_NUM_THREADS=THREADS. The two alternate for
ROUNDS rounds; each reports its best time over 10 repeats, and the best round of each is compared.
"""
import argparse, os, re, subprocess, sys

NUMPY_SNIPPET = r"""
import sys, time, numpy as np
n, reps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(reps))
print(f"numpy n={n} best_s={best:.4f} gflops={2 * n**3 / best / 1e9:.1f}")
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--python", default=sys.executable, help="interpreter with numpy")
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "sd3-backend-cpu", "--example", "matmul_bench"],
                   cwd=root, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    ours_bin = os.path.join(target, "release", "examples", "matmul_bench")

    ours_env = dict(os.environ, SD3_NUM_THREADS=str(args.threads))
    np_env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads))
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        np_env.pop(var, None)

    def gflops(out):
        m = re.search(r"gflops=([0-9.]+)", out)
        if not m:
            sys.exit(f"could not read a result from: {out!r}")
        return float(m.group(1))

    ours, theirs = [], []
    for r in range(args.rounds):
        o = subprocess.run([ours_bin, str(args.n), str(args.repeats)], env=ours_env, check=True,
                           capture_output=True, text=True).stdout.strip()
        t = subprocess.run([args.python, "-c", NUMPY_SNIPPET, str(args.n), str(args.repeats)], env=np_env,
                           check=True, capture_output=True, text=True).stdout.strip()
        print(f"round {r + 1}: {o} | {t}")
        ours.append(gflops(o))
        theirs.append(gflops(t))
    best_ours, best_np = max(ours), max(theirs)
    print(f"f32 matmul {args.n}^3, {args.threads} threads: sd3 cpu {best_ours:.1f} GFLOP/s, "
          f"numpy/OpenBLAS {best_np:.1f} GFLOP/s, ratio {best_ours / best_np:.2f} (target >= 0.75)")


if __name__ == "__main__":
    main()
