/*
 * sd3_plugin.h: the C ABI between the sd3 host and a backend plugin.
 *
 * A plugin is a shared library (libsd3_backend_<name>.so / .dylib, sd3_backend_<name>.dll) exporting one
 * symbol, sd3_backend_entry, which returns a table of functions. Everything crossing the boundary is in this
 * file: fixed-size structs, function pointers, integers and NUL-terminated UTF-8 strings.
 *
 * The contract in prose (versioning, lifetimes, threading, errors) is docs/plugin-abi.md. In short:
 *
 * Versioning  SD3_ABI_MAJOR changes only on an incompatible change; the host refuses a plugin built for another
 *             major. SD3_ABI_MINOR grows when fields or functions are appended to the END of a struct. Every
 *             struct a plugin fills starts with `uint32_t struct_size` (= sizeof as the plugin was compiled); the
 *             host reads only what fits in it and calls an optional function only if the table is long enough
 *             and the pointer is non-NULL. The first three fields of sd3_plugin (struct_size, abi_major,
 *             abi_minor) never move, in any major. Ids (dtypes, ops, status codes) are only ever appended.
 * Errors      Functions returning int32_t return an SD3_STATUS_*; on failure the host reads last_error() (of
 *             the plugin, or of the device for device calls) right after the failed call, under the same lock.
 *             Strings returned by the plugin stay valid until the next call into the same plugin / device.
 * Threading   The host never calls into one device from two threads at once, and never runs two plugin-level
 *             functions at once. Different devices may be called concurrently.
 * Lifetimes   Buffers belong to their device; the host frees every buffer before destroy(), destroys every
 *             device before shutdown(), and never unloads a library whose init() it called.
 *
 * The Rust SDK (crate sd3-core) mirrors this file in core/src/plugin/abi.rs and exports a Rust backend with
 * one macro:  sd3_core::export_backend!("name", |options: &str| MyProvider::new(options));
 * A test compiles this header and compares every sizeof/offsetof with the Rust definitions.
 */
#ifndef SD3_PLUGIN_H
#define SD3_PLUGIN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SD3_ABI_MAJOR 1
#define SD3_ABI_MINOR 3
#define SD3_MAX_RANK 8

/* ------------------------------------------------------------------------------------------ status codes */
#define SD3_STATUS_OK 0
#define SD3_STATUS_ERROR 1
#define SD3_STATUS_UNSUPPORTED 2
#define SD3_STATUS_OUT_OF_MEMORY 3
#define SD3_STATUS_INVALID_ARGUMENT 4
#define SD3_STATUS_DEVICE_LOST 5
#define SD3_STATUS_PANIC 6 /* a Rust plugin panicked; the shim caught it */

/* ------------------------------------------------------------------------------------------ dtypes */
/* Bit (1u << SD3_DTYPE_x) in sd3_device_info.dtype_mask. Little-endian storage. */
#define SD3_DTYPE_F32 0
#define SD3_DTYPE_F16 1
#define SD3_DTYPE_BF16 2
#define SD3_DTYPE_I32 3
#define SD3_DTYPE_I64 4
#define SD3_DTYPE_U8 5

/* ------------------------------------------------------------------------------------------ device kinds */
#define SD3_DEVICE_KIND_CPU 0
#define SD3_DEVICE_KIND_GPU 1
#define SD3_DEVICE_KIND_NPU 2
#define SD3_DEVICE_KIND_OTHER 3

/* ------------------------------------------------------------------------------------------ ops
 * sd3_op_desc.kind, with parameters in iparams / fparams. Exact semantics: docs/ops.md. Inputs and outputs
 * are listed per op; "(if flag)" operands are present only when the flag is set.
 *
 * COPY                 in: x; out: y (same shape; converts dtype)
 * FILL                 out: y = fparams[0]
 * UNARY                sub = SD3_UNARY_*; in: x; out: y
 * BINARY               sub = SD3_BINARY_*; in: a, b (already broadcast to y's shape, stride 0); out: y
 * AFFINE               in: x; out: y = x*fparams[0] + fparams[1]
 * MATMUL               iparams[0] = bias; in: a [..,M,K], b [..,K,N], bias [N] (if bias); out: y [..,M,N]
 *                      iparams[1] = activation epilogue (ABI 1.1): 0 none, else 1 + SD3_UNARY_*, applied to
 *                      a*b (+bias) before rounding. Decline (supports = 0) a value you do not implement; the host
 *                      then runs the matmul and the unary op separately. A 1.0 plugin is never sent one.
 * SOFTMAX              over the last dim; in: x; out: y
 * LAYER_NORM           fparams[0] = eps, iparams[0] = affine; in: x, weight, bias (if affine); out: y
 * RMS_NORM             fparams[0] = eps; in: x, weight; out: y
 * LAYER_NORM_MODULATE  fparams[0] = eps; in: x, scale, shift; out: y = LN(x)*(1+scale)+shift
 * MODULATE             in: x, scale, shift; out: y = x*(1+scale)+shift
 * GATED_RESIDUAL       in: x, gate, r; out: y = x + gate*r
 * ATTENTION            fparams[0] = scale, fparams[1] = norm_eps, iparams[0] = causal, [1] = bias, [2] = qk_norm;
 *                      in: q, k, v, bias (if bias), q_norm, k_norm (if qk_norm); out: o
 * CONV2D               iparams[0..2] = stride h,w, [2..4] = padding h,w, [4] = bias; in: x, w, bias (if bias); out: y
 * GROUP_NORM           iparams[0] = groups, [1] = affine, fparams[0] = eps; in: x, weight, bias (if affine); out: y
 * UPSAMPLE_NEAREST2D   iparams[0] = factor; in: x; out: y
 * GATHER               in: table [V,D], ids [N] (i32/i64); out: y [N,D]
 * MATMUL_GATED_RESIDUAL (ABI 1.2) iparams[0] = bias; in: a [..,M,K], b [..,K,N], bias [N] (if bias), x [..,M,N],
 *                      gate [..,M,N] (usually broadcast); out: y = x + gate*(a*b (+bias)), the product rounded once.
 *                      Decline it unless implemented; the host then runs MATMUL and GATED_RESIDUAL. A plugin
 *                      built for ABI 1.0 or 1.1 is never sent one.
 * ATTENTION_BACKWARD (ABI 1.3) fparams[0] = scale, iparams[0] = causal; in: q, k, v, o, do, each [B,H,N,D];
 *                      out: [3,B,H,N,D] = (dq, dk, dv) of o = softmax(scale*q*k^T (+causal mask))*v given do.
 *                      Training only; decline it unless implemented (the host then runs the products as separate
 *                      ops). A plugin built for ABI 1.0 to 1.2 is never sent one.
 */
#define SD3_OP_COPY 0
#define SD3_OP_FILL 1
#define SD3_OP_UNARY 2
#define SD3_OP_BINARY 3
#define SD3_OP_AFFINE 4
#define SD3_OP_MATMUL 5
#define SD3_OP_SOFTMAX 6
#define SD3_OP_LAYER_NORM 7
#define SD3_OP_RMS_NORM 8
#define SD3_OP_LAYER_NORM_MODULATE 9
#define SD3_OP_MODULATE 10
#define SD3_OP_GATED_RESIDUAL 11
#define SD3_OP_ATTENTION 12
#define SD3_OP_CONV2D 13
#define SD3_OP_GROUP_NORM 14
#define SD3_OP_UPSAMPLE_NEAREST2D 15
#define SD3_OP_GATHER 16
#define SD3_OP_MATMUL_GATED_RESIDUAL 17
#define SD3_OP_ATTENTION_BACKWARD 18
#define SD3_OP_COUNT 19 /* one past the largest kind this header knows */

#define SD3_UNARY_NEG 0
#define SD3_UNARY_EXP 1
#define SD3_UNARY_LOG 2
#define SD3_UNARY_SQRT 3
#define SD3_UNARY_RSQRT 4
#define SD3_UNARY_RECIP 5
#define SD3_UNARY_SQUARE 6
#define SD3_UNARY_ABS 7
#define SD3_UNARY_TANH 8
#define SD3_UNARY_SIGMOID 9
#define SD3_UNARY_RELU 10
#define SD3_UNARY_SILU 11
#define SD3_UNARY_GELU_ERF 12
#define SD3_UNARY_GELU_TANH 13
#define SD3_UNARY_QUICK_GELU 14
#define SD3_UNARY_SIN 15
#define SD3_UNARY_COS 16

#define SD3_BINARY_ADD 0
#define SD3_BINARY_SUB 1
#define SD3_BINARY_MUL 2
#define SD3_BINARY_DIV 3
#define SD3_BINARY_MAX 4
#define SD3_BINARY_MIN 5

/* ------------------------------------------------------------------------------------------ structs */

/* One operand. Filled by the host. shape/strides beyond rank are 0. Strides and offset count ELEMENTS (not
 * bytes); a stride of 0 is a broadcast dimension; strides are never negative. Outputs may be strided views;
 * inputs and outputs never overlap. */
typedef struct sd3_tensor_desc {
    uint64_t buffer; /* a handle from alloc() */
    uint32_t dtype;  /* SD3_DTYPE_* */
    uint32_t rank;   /* 0..SD3_MAX_RANK */
    uint64_t shape[SD3_MAX_RANK];
    uint64_t strides[SD3_MAX_RANK];
    uint64_t offset; /* element [0,...,0] is at buffer + offset * element size */
} sd3_tensor_desc;

/* An op and its operands. Filled by the host; struct_size is the HOST's sizeof (read only what you know). */
typedef struct sd3_op_desc {
    uint32_t struct_size;
    uint32_t kind; /* SD3_OP_* */
    uint32_t sub;  /* SD3_UNARY_* / SD3_BINARY_* for UNARY / BINARY, else 0 */
    uint32_t n_inputs;
    uint32_t n_outputs;
    uint32_t reserved;
    int64_t iparams[8];
    float fparams[8];
    const sd3_tensor_desc *inputs;
    const sd3_tensor_desc *outputs;
} sd3_op_desc;

/* What a device is. Filled by the plugin (struct_size = its sizeof). */
typedef struct sd3_device_info {
    uint32_t struct_size;
    uint32_t kind;              /* SD3_DEVICE_KIND_* */
    uint64_t memory_bytes;      /* total; 0 = unknown or shared with the host */
    uint64_t free_memory_bytes; /* 0 = unknown */
    const char *name;
    const char *pci_id;       /* "0000:3b:00.0", or NULL when unknown */
    uint32_t dtype_mask;      /* bit (1u << SD3_DTYPE_x) per dtype the device computes in */
    uint32_t reserved;
    const char *capabilities; /* "key=value;key=value" (or NULL) */
} sd3_device_info;

/* One opened device. Filled by the plugin (struct_size = its sizeof); every function gets `self` back.
 * Execution is in order on one queue: upload, copy and execute may return before the work is done; download and
 * synchronize wait for everything queued before them. Required: all but copy, stats and the 1.1 markers. */
typedef struct sd3_device {
    uint32_t struct_size;
    uint32_t reserved;
    void *self;
    /* Valid until the next call on this device; NULL on failure (then last_error). */
    const sd3_device_info *(*get_info)(void *self);
    /* Allocate `bytes` bytes (bytes > 0); *out_buffer = a non-zero handle. SD3_STATUS_OUT_OF_MEMORY when full. */
    int32_t (*alloc)(void *self, uint64_t bytes, uint64_t *out_buffer);
    void (*free)(void *self, uint64_t buffer);
    /* Copy host bytes in / out at a byte offset. `data` may be reused by the host as soon as upload returns. */
    int32_t (*upload)(void *self, uint64_t buffer, uint64_t offset, const void *data, uint64_t bytes);
    int32_t (*download)(void *self, uint64_t buffer, uint64_t offset, void *out, uint64_t bytes);
    /* Optional: device-to-device byte copy. When NULL the host downloads and uploads. */
    int32_t (*copy)(void *self, uint64_t src, uint64_t src_offset, uint64_t dst, uint64_t dst_offset,
                    uint64_t bytes);
    /* 1 if execute() can run this op with these dtypes and layouts, else 0. Cheap; never fails. Declined ops
     * run on the host (counted; an error under --strict). */
    int32_t (*supports)(void *self, const sd3_op_desc *op);
    /* Queue an op that supports() accepted. */
    int32_t (*execute)(void *self, const sd3_op_desc *op);
    int32_t (*synchronize)(void *self);
    /* Optional: "key=value" lines (allocator figures, kernel counts...), or NULL. */
    const char *(*stats)(void *self);
    /* Message of the last failed call on this device ("" if none). */
    const char *(*last_error)(void *self);
    /* Release the device (every buffer is already freed). The table is not used afterwards. */
    void (*destroy)(void *self);

    /* ---- ABI 1.1: optional device timing markers (all three, or none). The host calls them only when
     * struct_size covers them and all three are non-NULL; otherwise the device "has no markers". */
    /* Queue a timestamp that completes after all work queued so far; never waits. *out_marker = a handle.
     * SD3_STATUS_UNSUPPORTED: this device cannot time (the host reports no device times). */
    int32_t (*record_marker)(void *self, uint64_t *out_marker);
    /* *out_seconds = device time from marker `start` to marker `end` (recorded in that order); waits for `end`. */
    int32_t (*marker_elapsed)(void *self, uint64_t start, uint64_t end, double *out_seconds);
    /* Release a marker from record_marker. The host releases every marker it recorded before destroy(). */
    void (*release_marker)(void *self, uint64_t marker);
} sd3_device;

/* The plugin. Returned by sd3_backend_entry; owned by the plugin, valid while the library is loaded. */
typedef struct sd3_plugin {
    uint32_t struct_size; /* sizeof(sd3_plugin) as the plugin was compiled */
    uint32_t abi_major;   /* SD3_ABI_MAJOR the plugin was compiled with */
    uint32_t abi_minor;   /* SD3_ABI_MINOR the plugin was compiled with */
    uint32_t reserved;
    const char *name;    /* the --backend name: [A-Za-z0-9_-]+ ("cuda", "npu", "acme") */
    const char *version; /* the plugin's own version, free form */
    /* Called before anything else but name/version; again only after shutdown(). options: "key=value;key=value" (ignore unknown
     * keys). Non-OK: the plugin is rejected with last_error() as the reason. */
    int32_t (*init)(const char *options);
    /* Number of usable devices. 0 rejects the plugin; put the reason (e.g. "no driver") in last_error(). */
    uint32_t (*device_count)(void);
    int32_t (*open_device)(uint32_t index, const sd3_device **out_device);
    /* Message of the last failed plugin-level call ("" if none). */
    const char *(*last_error)(void);
    /* Optional: called once, after the last device is destroyed, if init succeeded. */
    void (*shutdown)(void);
} sd3_plugin;

/* The one exported symbol. Return NULL to decline the host (e.g. a host minor too old for you). */
typedef const sd3_plugin *(*sd3_backend_entry_fn)(uint32_t host_abi_major, uint32_t host_abi_minor);

#if defined(_WIN32)
#define SD3_EXPORT __declspec(dllexport)
#else
#define SD3_EXPORT __attribute__((visibility("default")))
#endif

SD3_EXPORT const sd3_plugin *sd3_backend_entry(uint32_t host_abi_major, uint32_t host_abi_minor);

#ifdef __cplusplus
}
#endif

#endif /* SD3_PLUGIN_H */
