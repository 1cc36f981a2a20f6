//! Linear layers through cuBLASLt with the bias, and GELU (tanh) or ReLU where asked, fused into the epilogue
//! (`CUBLASLT_EPILOGUE_BIAS` / `_GELU_BIAS` / `_RELU_BIAS`): a linear is one kernel instead of a bias
//! broadcast, a product accumulating onto it and an activation pass. Batches (strided, the weight broadcast with
//! batch stride 0) cover a linear written into rows of a bigger buffer. Plans (descriptors, layouts and the
//! heuristic's algorithm) are cached per problem shape.

use crate::gemm::MatLayout;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    self, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulDescAttributes_t as Attr, cudaDataType,
};
use sd3_core::{DType, Error, Result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

const WORKSPACE_BYTES: usize = 32 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: i64,
    n: i64,
    k: i64,
    a: (bool, i64),
    b: (bool, i64),
    ldc: i64,
    dtype: DType,
    epilogue: Epilogue,
    batch: (i64, i64, i64, i64),
}

/// What cuBLASLt applies after the product. cuBLASLt's GELU is the tanh approximation (PyTorch routes only
/// `gelu(approximate="tanh")` through it), which is SD3's feed-forward activation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Epilogue {
    Bias,
    BiasGelu,
    BiasRelu,
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and plans are only used under the device's cuBLAS lock, on its one stream.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::backend("cuda", format!("cuBLASLt {what}: {e:?}"))
}

fn lt_type(dt: DType) -> Option<cudaDataType> {
    match dt {
        DType::F32 => Some(cudaDataType::CUDA_R_32F),
        DType::F16 => Some(cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

/// `D[M,N] (row-major, ldc) = act(A[M,K]·B[K,N] + bias[N])`, all of one dtype; bias contiguous; `batch`
/// products with element batch strides for A, B (0: broadcast) and D.
pub struct BiasGemm {
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub a: u64,
    pub a_layout: MatLayout,
    pub b: u64,
    pub b_layout: MatLayout,
    pub d: u64,
    pub ldc: i64,
    pub bias: u64,
    pub dtype: DType,
    pub epilogue: Epilogue,
    pub batch: i64,
    pub a_batch_stride: i64,
    pub b_batch_stride: i64,
    pub d_batch_stride: i64,
}

impl Lt {
    pub fn new(workspace: u64) -> Result<Lt> {
        let handle = lt::create_handle().map_err(|e| err("handle", e))?;
        Ok(Lt { handle, workspace, plans: Mutex::default() })
    }

    pub const WORKSPACE_BYTES: usize = WORKSPACE_BYTES;

    fn plan(&self, g: &BiasGemm) -> Result<Key> {
        let key = Key {
            m: g.m,
            n: g.n,
            k: g.k,
            a: (g.a_layout.row_major, g.a_layout.ld),
            b: (g.b_layout.row_major, g.b_layout.ld),
            ldc: g.ldc,
            dtype: g.dtype,
            epilogue: g.epilogue,
            batch: (g.batch, g.a_batch_stride, g.b_batch_stride, g.d_batch_stride),
        };
        let mut plans = self.plans.lock().unwrap();
        if plans.contains_key(&key) {
            return Ok(key);
        }
        let ty = lt_type(g.dtype).ok_or_else(|| err("dtype", g.dtype))?;
        // Column-major view: Dᵀ[N,M] = Bᵀ[N,K]·Aᵀ[K,M]; a row-major operand is its own transpose in column-major.
        let op =
            |l: &MatLayout| if l.row_major { cublasOperation_t::CUBLAS_OP_N } else { cublasOperation_t::CUBLAS_OP_T };
        let (ta, tb) = (op(&g.b_layout), op(&g.a_layout));
        let (ar, ac) = if g.b_layout.row_major { (g.n, g.k) } else { (g.k, g.n) };
        let (br, bc) = if g.a_layout.row_major { (g.k, g.m) } else { (g.m, g.k) };
        unsafe {
            let desc = lt::create_matmul_desc(cublasComputeType_t::CUBLAS_COMPUTE_32F, cudaDataType::CUDA_R_32F)
                .map_err(|e| err("desc", e))?;
            let set = |attr: Attr, v: *const c_void, size: usize| lt::set_matmul_desc_attribute(desc, attr, v, size);
            set(Attr::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const _ as *const c_void, 4)
                .map_err(|e| err("transa", e))?;
            set(Attr::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const _ as *const c_void, 4)
                .map_err(|e| err("transb", e))?;
            let epi = match g.epilogue {
                Epilogue::Bias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                Epilogue::BiasGelu => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
                Epilogue::BiasRelu => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
            };
            set(Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi as *const _ as *const c_void, 4)
                .map_err(|e| err("epilogue", e))?;
            let a = lt::create_matrix_layout(ty, ar as u64, ac as u64, g.b_layout.ld).map_err(|e| err("layout", e))?;
            let b = lt::create_matrix_layout(ty, br as u64, bc as u64, g.a_layout.ld).map_err(|e| err("layout", e))?;
            let d = lt::create_matrix_layout(ty, g.n as u64, g.m as u64, g.ldc).map_err(|e| err("layout", e))?;
            if g.batch > 1 {
                // In the column-major view cuBLASLt's A is our B (the weight) and its B is our A.
                for (layout, stride) in [(a, g.b_batch_stride), (b, g.a_batch_stride), (d, g.d_batch_stride)] {
                    let count = g.batch as i32;
                    lt::set_matrix_layout_attribute(
                        layout,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(|e| err("batch count", e))?;
                    lt::set_matrix_layout_attribute(
                        layout,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const c_void,
                        8,
                    )
                    .map_err(|e| err("batch stride", e))?;
                }
            }
            let pref = lt::create_matmul_pref().map_err(|e| err("preference", e))?;
            let ws = WORKSPACE_BYTES as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(|e| err("preference", e))?;
            let heuristic = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref);
            let _ = lt::destroy_matmul_pref(pref);
            let heuristic = heuristic.map_err(|e| err("no algorithm for this shape", e))?;
            plans.insert(key, Plan { desc, a, b, d, algo: heuristic.algo });
        }
        Ok(key)
    }

    /// # Safety
    /// The pointers must address device memory of the described sizes, on the stream `stream`.
    pub unsafe fn run(&self, g: &BiasGemm, stream: *mut c_void) -> Result<()> {
        let key = self.plan(g)?;
        let plans = self.plans.lock().unwrap();
        let p = &plans[&key];
        lt::set_matmul_desc_attribute(
            p.desc,
            Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &g.bias as *const u64 as *const c_void,
            8,
        )
        .map_err(|e| err("bias", e))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        lt::matmul(
            self.handle,
            p.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            g.b as *const c_void,
            p.a,
            g.a as *const c_void,
            p.b,
            g.d as *const c_void,
            p.d,
            g.d as *mut c_void,
            p.d,
            &p.algo,
            self.workspace as *mut c_void,
            WORKSPACE_BYTES,
            stream as sys::cudaStream_t,
        )
        .map_err(|e| err("matmul", e))
    }
}
