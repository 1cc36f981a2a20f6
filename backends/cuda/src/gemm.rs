//! Matrix products through cuBLAS (`cublasGemmStridedBatchedEx`, f32 accumulation): the Matmul op and the
//! two products inside attention.
//!
//! Row-major `C[M,N] = A[M,K]·B[K,N]` is computed as the column-major `Cᵀ = Bᵀ·Aᵀ`, so no operand is copied:
//! a row-major matrix is a column-major transposed one with the same leading dimension.

use cudarc::cublas::sys::{self, cublasComputeType_t, cublasOperation_t, cudaDataType};
use sd3_core::{DType, Error, Result};

/// How one matrix operand lies in memory, as cuBLAS needs it.
#[derive(Clone, Copy, Debug)]
pub struct MatLayout {
    /// Element strides of rows and columns; one of them is 1 (or its dim is 1).
    pub row_major: bool,
    pub ld: i64,
}

/// The layout of a `rows × cols` matrix with the given element strides, if cuBLAS can read it directly.
pub fn mat_layout(rows: usize, cols: usize, s_row: usize, s_col: usize) -> Option<MatLayout> {
    let (rows, cols, s_row, s_col) = (rows as i64, cols as i64, s_row as i64, s_col as i64);
    if s_col == 1 || cols == 1 {
        let ld = if rows == 1 { cols.max(1) } else { s_row };
        if ld >= cols.max(1) {
            return Some(MatLayout { row_major: true, ld });
        }
    }
    if s_row == 1 || rows == 1 {
        let ld = if cols == 1 { rows.max(1) } else { s_col };
        if ld >= rows.max(1) {
            return Some(MatLayout { row_major: false, ld });
        }
    }
    None
}

pub fn cuda_type(dt: DType) -> Result<cudaDataType> {
    Ok(match dt {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::F16 => cudaDataType::CUDA_R_16F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        other => return Err(Error::backend("cuda", format!("no cuBLAS matrix product in {other}"))),
    })
}

/// One strided-batched product. Pointers are device addresses of element (0,0) of batch 0.
pub struct Gemm {
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub batch: i64,
    pub a: u64,
    pub a_layout: MatLayout,
    pub a_batch_stride: i64,
    pub b: u64,
    pub b_layout: MatLayout,
    pub b_batch_stride: i64,
    /// C is row-major with leading dimension `ldc`.
    pub c: u64,
    pub ldc: i64,
    pub c_batch_stride: i64,
    pub ab_type: DType,
    pub c_type: DType,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// # Safety
    /// Every pointer must address device memory large enough for the described matrices.
    pub unsafe fn run(&self, handle: sys::cublasHandle_t) -> Result<()> {
        let op =
            |l: &MatLayout| if l.row_major { cublasOperation_t::CUBLAS_OP_N } else { cublasOperation_t::CUBLAS_OP_T };
        let to_int = |v: i64, what: &str| {
            i32::try_from(v)
                .map_err(|_| Error::backend("cuda", format!("matrix {what} {v} exceeds cuBLAS's 32-bit range")))
        };
        let status = sys::cublasGemmStridedBatchedEx(
            handle,
            op(&self.b_layout),
            op(&self.a_layout),
            to_int(self.n, "dim")?,
            to_int(self.m, "dim")?,
            to_int(self.k, "dim")?,
            &self.alpha as *const f32 as *const _,
            self.b as *const _,
            cuda_type(self.ab_type)?,
            to_int(self.b_layout.ld, "leading dim")?,
            self.b_batch_stride,
            self.a as *const _,
            cuda_type(self.ab_type)?,
            to_int(self.a_layout.ld, "leading dim")?,
            self.a_batch_stride,
            &self.beta as *const f32 as *const _,
            self.c as *mut _,
            cuda_type(self.c_type)?,
            to_int(self.ldc, "leading dim")?,
            self.c_batch_stride,
            to_int(self.batch, "batch")?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        );
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::backend(
                "cuda",
                format!(
                    "cublasGemmStridedBatchedEx failed: {status:?} (m={}, n={}, k={}, batch={})",
                    self.m, self.n, self.k, self.batch
                ),
            ));
        }
        Ok(())
    }
}

/// Collapse the batch dims `shape[..r-2]` with `strides` into one (count, stride), if they are uniform.
pub fn collapse_batch(shape: &[usize], strides: &[usize]) -> Option<(i64, i64)> {
    let dims: Vec<(usize, usize)> =
        shape.iter().zip(strides).filter(|(d, _)| **d != 1).map(|(&d, &s)| (d, s)).collect();
    let count: usize = dims.iter().map(|d| d.0).product();
    match dims.as_slice() {
        [] => Some((1, 0)),
        [(_, s)] => Some((count as i64, *s as i64)),
        _ => {
            let inner = dims.last().unwrap().1;
            let mut expected = inner;
            for &(d, s) in dims.iter().rev() {
                if s != expected {
                    return None;
                }
                expected = s * d;
            }
            Some((count as i64, inner as i64))
        }
    }
}
