//! Matmul (batched, broadcast, transposed, mixed dtypes, bias), conv2d and attention.

use crate::*;
use sd3_core::{DType, Op, UnaryOp};

/// f32 products: f32 accumulation over at most a few thousand terms.
const MM: f64 = 1e-9;

#[test]
fn matmul_sizes_and_dtypes() {
    for (m, k, n) in [(1, 1, 1), (7, 33, 129), (33, 7, 1), (129, 129, 33), (1, 300, 7), (200, 300, 70)] {
        for (da, db) in [
            (DType::F32, DType::F32),
            (DType::F32, DType::F16),
            (DType::F32, DType::BF16),
            (DType::F16, DType::F16),
            (DType::BF16, DType::BF16),
        ] {
            let a = spec(da, &[m, k]);
            let b = spec(db, &[k, n]);
            let y = spec(da, &[m, n]);
            check(&format!("mm {m}x{k}x{n} {da}/{db}"), Op::Matmul { bias: false, act: None }, &[a, b], &y, MM);
        }
    }
}

#[test]
fn matmul_linear_layout_with_bias() {
    // nn.Linear: b is the transpose of a [N, K] weight; wide enough for several weight panels.
    for db in FLOATS {
        for dy in FLOATS {
            let (m, k, n) = (33, 65, 300);
            let a = spec(DType::F32, &[m, k]);
            let w = spec(db, &[k, n]).transposed();
            let bias = spec(db, &[n]);
            let y = spec(dy, &[m, n]);
            check(&format!("linear {db}->{dy}"), Op::Matmul { bias: true, act: None }, &[a, w, bias], &y, MM);
        }
    }
}

#[test]
fn matmul_with_activation_epilogue() {
    // Small (one task, parallel epilogue rows) and wide (many weight panels / tasks); f32 output in place, a
    // half output through scratch; a strided output; the MM-DiT's rank-3 form with the weight broadcast.
    for (m, k, n) in [(33, 65, 300), (160, 96, 1500)] {
        for act in [UnaryOp::GeluTanh, UnaryOp::Silu] {
            for (db, dy) in [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::F16, DType::F16)] {
                let a = spec(DType::F32, &[m, k]);
                let w = spec(db, &[k, n]).transposed();
                let bias = spec(db, &[n]);
                let y = spec(dy, &[m, n]).sliced();
                let op = Op::Matmul { bias: true, act: Some(act) };
                check(&format!("linear+{} {m}x{k}x{n} {db}->{dy}", act.name()), op, &[a, w, bias], &y, MM);
            }
        }
    }
    let a = spec(DType::F32, &[2, 40, 64]);
    let w = spec(DType::F32, &[2, 64, 96]).transposed().broadcast(&[0]);
    let y = spec(DType::F32, &[2, 40, 96]).sliced();
    check("batched linear+gelu", Op::Matmul { bias: false, act: Some(UnaryOp::GeluTanh) }, &[a, w], &y, MM);
}

#[test]
fn matmul_batched_broadcast_and_strided() {
    for dt in FLOATS {
        let (m, k, n) = (7, 33, 17);
        // b shared across the batch (stride 0), a transposed, y a slice of a larger buffer.
        let a = spec(dt, &[2, 3, m, k]).transposed();
        let b = spec(dt, &[2, 3, k, n]).broadcast(&[0, 1]);
        let y = spec(dt, &[2, 3, m, n]).sliced();
        check(&format!("bmm {dt}"), Op::Matmul { bias: false, act: None }, &[a, b], &y, MM);
        // Many small matrices (parallel over the batch), a with a permuted batch.
        let a = spec(dt, &[4, 24, 9, 16]).permuted(&[1, 0, 2, 3]);
        let b = spec(DType::F32, &[4, 24, 16, 9]).transposed();
        let bias = spec(dt, &[9]);
        let y = spec(dt, &[4, 24, 9, 9]);
        check(&format!("bmm many {dt}"), Op::Matmul { bias: true, act: None }, &[a, b, bias], &y, MM);
    }
}

#[test]
fn conv2d_kernels_strides_padding() {
    let cases: [(&[usize], &[usize], usize, usize); 5] = [
        (&[1, 3, 9, 11], &[5, 3, 3, 3], 1, 1),
        (&[2, 4, 9, 11], &[6, 4, 3, 3], 2, 1),
        (&[2, 7, 5, 6], &[3, 7, 1, 1], 1, 0),
        (&[1, 2, 7, 7], &[4, 2, 3, 3], 1, 0),
        (&[1, 3, 8, 9], &[2, 3, 4, 2], 3, 2),
    ];
    for dt in FLOATS {
        for (x, w, stride, pad) in cases {
            let oh = (x[2] + 2 * pad - w[2]) / stride + 1;
            let ow = (x[3] + 2 * pad - w[3]) / stride + 1;
            let y = [x[0], w[0], oh, ow];
            for bias in [false, true] {
                let op = Op::Conv2d { stride: [stride; 2], padding: [pad; 2], bias };
                let mut ins = vec![spec(DType::F32, x), spec(dt, w)];
                if bias {
                    ins.push(spec(dt, &[w[0]]));
                }
                check(&format!("conv {dt} {x:?} {w:?} s{stride} p{pad} b{bias}"), op, &ins, &spec(dt, &y), MM);
            }
            // Strided input and output.
            let op = Op::Conv2d { stride: [stride; 2], padding: [pad; 2], bias: false };
            let ins = [spec(dt, x).sliced(), spec(dt, w).permuted(&[1, 0, 2, 3])];
            check(&format!("conv strided {dt} {x:?}"), op, &ins, &spec(DType::F32, &y).sliced(), MM);
        }
    }
}

fn attention_op(scale: f32, causal: bool, bias: bool, qk_norm: bool) -> Op {
    Op::Attention { scale, causal, bias, qk_norm, norm_eps: 1e-6 }
}

#[test]
fn attention_short_and_long() {
    for dt in FLOATS {
        for (b, h, nq, nk, dh, dv) in
            [(1, 1, 1, 1, 8, 8), (2, 3, 7, 33, 16, 24), (1, 2, 65, 1100, 64, 64), (2, 2, 300, 129, 32, 16)]
        {
            let q = spec(dt, &[b, h, nq, dh]);
            let k = spec(dt, &[b, h, nk, dh]);
            let v = spec(dt, &[b, h, nk, dv]);
            let op = attention_op(1.0 / (dh as f32).sqrt(), false, false, false);
            check(&format!("attn {dt} {nq}x{nk}"), op, &[q, k, v], &spec(dt, &[b, h, nq, dv]), MM);
        }
    }
}

#[test]
fn attention_causal_bias_qknorm_strided() {
    for dt in FLOATS {
        // One query block against two key tiles; several query blocks, some past the causal diagonal.
        for (nq, nk) in [(70, 300), (200, 250)] {
            let (b, h, dh) = (2, 3, 32);
            // q, k, v and out as permuted views of [B, N, H, D] (how the models lay them out).
            let q = spec(dt, &[b, h, nq, dh]).permuted(&[0, 2, 1, 3]);
            let k = spec(dt, &[b, h, nk, dh]).permuted(&[0, 2, 1, 3]);
            let v = spec(DType::F32, &[b, h, nk, dh]).permuted(&[0, 2, 1, 3]);
            let out = spec(dt, &[b, h, nq, dh]).permuted(&[0, 2, 1, 3]);
            let bias = spec(dt, &[b, h, nq, nk]).broadcast(&[0, 1]).gen(Gen::Uniform(-1.0, 1.0));
            let (qn, kn) = (spec(dt, &[dh]), spec(DType::F32, &[dh]));
            for causal in [false, true] {
                let op = attention_op(0.2, causal, true, true);
                let ins = [q.clone(), k.clone(), v.clone(), bias.clone(), qn.clone(), kn.clone()];
                check(&format!("attn full {dt} {nq}x{nk} causal={causal}"), op, &ins, &out, MM);
                let op = attention_op(0.2, causal, false, false);
                let ins = [q.clone(), k.clone(), v.clone()];
                let o = spec(dt, &[b, h, nq, dh]).sliced();
                check(&format!("attn causal {dt} {nq}x{nk} {causal}"), op, &ins, &o, MM);
            }
        }
    }
}
