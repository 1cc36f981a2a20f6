/*
 * A minimal sd3 backend plugin in plain C: f32 add and matmul on host memory it manages itself.
 * Everything else is declined (supports() returns 0) and runs on the host's CPU backend.
 *
 * Build:  cc -std=c99 -O2 -shared -fPIC -I../../include minimal.c -o libsd3_backend_minimal.so
 * Use:    sd3 devices --plugin ./libsd3_backend_minimal.so
 *         sd3 conformance --plugin ./libsd3_backend_minimal.so
 *
 * It shows the whole contract: the entry symbol, the plugin and device tables, status codes with last_error
 * messages, device info, stats, and strided operands (strides and offsets count elements).
 */
#include "sd3_plugin.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ errors */

static char plugin_error[256];

static int32_t fail(char *slot, int32_t status, const char *msg) {
    snprintf(slot, 256, "%s", msg);
    return status;
}

/* ------------------------------------------------------------------------------------------ memory */

typedef struct buffer {
    unsigned char *data; /* NULL when free */
    uint64_t size;
} buffer;

typedef struct device {
    buffer *buffers; /* handle h is buffers[h - 1] */
    uint64_t n_buffers;
    uint64_t bytes_in_use;
    uint64_t adds, matmuls;
    char error[256];
    char stats[256];
    sd3_device_info info;
    sd3_device table;
} device;

static buffer *lookup(device *d, uint64_t h) {
    if (h == 0 || h > d->n_buffers || d->buffers[h - 1].data == NULL) return NULL;
    return &d->buffers[h - 1];
}

static int32_t dev_alloc(void *self, uint64_t bytes, uint64_t *out) {
    device *d = self;
    unsigned char *p = calloc(bytes ? bytes : 1, 1);
    if (!p) return fail(d->error, SD3_STATUS_OUT_OF_MEMORY, "calloc failed");
    buffer *grown = realloc(d->buffers, (d->n_buffers + 1) * sizeof(buffer));
    if (!grown) {
        free(p);
        return fail(d->error, SD3_STATUS_OUT_OF_MEMORY, "buffer table full");
    }
    d->buffers = grown;
    d->buffers[d->n_buffers].data = p;
    d->buffers[d->n_buffers].size = bytes;
    d->n_buffers++;
    d->bytes_in_use += bytes;
    *out = d->n_buffers;
    return SD3_STATUS_OK;
}

static void dev_free(void *self, uint64_t h) {
    device *d = self;
    buffer *b = lookup(d, h);
    if (!b) return;
    d->bytes_in_use -= b->size;
    free(b->data);
    b->data = NULL;
}

static int32_t span_check(device *d, uint64_t h, uint64_t offset, uint64_t bytes, unsigned char **out) {
    buffer *b = lookup(d, h);
    if (!b) return fail(d->error, SD3_STATUS_INVALID_ARGUMENT, "unknown buffer handle");
    if (offset > b->size || bytes > b->size - offset)
        return fail(d->error, SD3_STATUS_INVALID_ARGUMENT, "byte range outside the buffer");
    *out = b->data + offset;
    return SD3_STATUS_OK;
}

static int32_t dev_upload(void *self, uint64_t h, uint64_t offset, const void *data, uint64_t bytes) {
    unsigned char *p;
    int32_t rc = span_check(self, h, offset, bytes, &p);
    if (rc == SD3_STATUS_OK && bytes) memcpy(p, data, bytes);
    return rc;
}

static int32_t dev_download(void *self, uint64_t h, uint64_t offset, void *out, uint64_t bytes) {
    unsigned char *p;
    int32_t rc = span_check(self, h, offset, bytes, &p);
    if (rc == SD3_STATUS_OK && bytes) memcpy(out, p, bytes);
    return rc;
}

/* ------------------------------------------------------------------------------------------ ops */

/* Base pointer of an f32 operand, after checking that its whole view lies inside its buffer. */
static float *f32_base(device *d, const sd3_tensor_desc *t, int32_t *rc) {
    uint64_t last = t->offset, count = 1;
    for (uint32_t i = 0; i < t->rank; i++) {
        count *= t->shape[i];
        if (t->shape[i]) last += (t->shape[i] - 1) * t->strides[i];
    }
    unsigned char *p;
    *rc = span_check(d, t->buffer, 0, count ? (last + 1) * 4 : 0, &p);
    return *rc == SD3_STATUS_OK ? (float *)p : NULL;
}

/* Element offset of the i-th element (row-major logical order) of the first `rank` dims of t. */
static uint64_t elem_offset(const sd3_tensor_desc *t, uint32_t rank, uint64_t i) {
    uint64_t off = t->offset;
    for (uint32_t k = rank; k-- > 0;) {
        off += (i % t->shape[k]) * t->strides[k];
        i /= t->shape[k];
    }
    return off;
}

static int all_f32(const sd3_op_desc *op) {
    for (uint32_t i = 0; i < op->n_inputs; i++)
        if (op->inputs[i].dtype != SD3_DTYPE_F32) return 0;
    for (uint32_t i = 0; i < op->n_outputs; i++)
        if (op->outputs[i].dtype != SD3_DTYPE_F32) return 0;
    return 1;
}

static int32_t dev_supports(void *self, const sd3_op_desc *op) {
    (void)self;
    if (!all_f32(op) || op->n_outputs != 1) return 0;
    if (op->kind == SD3_OP_BINARY && op->sub == SD3_BINARY_ADD) return op->n_inputs == 2;
    /* iparams[1] != 0 asks for an activation epilogue (ABI 1.1), which this example does not implement. */
    if (op->kind == SD3_OP_MATMUL)
        return op->n_inputs == (op->iparams[0] ? 3u : 2u) && op->iparams[1] == 0 && op->outputs[0].rank >= 2;
    return 0;
}

static int32_t run_add(device *d, const sd3_op_desc *op) {
    const sd3_tensor_desc *a = &op->inputs[0], *b = &op->inputs[1], *y = &op->outputs[0];
    int32_t rc;
    float *pa = f32_base(d, a, &rc), *pb = pa ? f32_base(d, b, &rc) : NULL, *py = pb ? f32_base(d, y, &rc) : NULL;
    if (!py) return rc;
    uint64_t n = 1;
    for (uint32_t k = 0; k < y->rank; k++) n *= y->shape[k];
    for (uint64_t i = 0; i < n; i++)
        py[elem_offset(y, y->rank, i)] = pa[elem_offset(a, a->rank, i)] + pb[elem_offset(b, b->rank, i)];
    d->adds++;
    return SD3_STATUS_OK;
}

static int32_t run_matmul(device *d, const sd3_op_desc *op) {
    const sd3_tensor_desc *a = &op->inputs[0], *b = &op->inputs[1], *y = &op->outputs[0];
    const sd3_tensor_desc *bias = op->iparams[0] ? &op->inputs[2] : NULL;
    int32_t rc;
    float *pa = f32_base(d, a, &rc), *pb = pa ? f32_base(d, b, &rc) : NULL, *py = pb ? f32_base(d, y, &rc) : NULL;
    float *pbias = NULL;
    if (!py) return rc;
    if (bias && !(pbias = f32_base(d, bias, &rc))) return rc;
    uint32_t r = y->rank;
    if (a->rank != r || b->rank != r) return fail(d->error, SD3_STATUS_INVALID_ARGUMENT, "matmul operands of different rank");
    uint64_t M = y->shape[r - 2], N = y->shape[r - 1], K = a->shape[r - 1], batches = 1;
    for (uint32_t k = 0; k + 2 < r; k++) batches *= y->shape[k];
    for (uint64_t bi = 0; bi < batches; bi++) {
        uint64_t oa = elem_offset(a, r - 2, bi), ob = elem_offset(b, r - 2, bi), oy = elem_offset(y, r - 2, bi);
        for (uint64_t m = 0; m < M; m++)
            for (uint64_t n = 0; n < N; n++) {
                float acc = bias ? pbias[bias->offset + n * bias->strides[0]] : 0.0f;
                for (uint64_t k = 0; k < K; k++)
                    acc += pa[oa + m * a->strides[r - 2] + k * a->strides[r - 1]] *
                           pb[ob + k * b->strides[r - 2] + n * b->strides[r - 1]];
                py[oy + m * y->strides[r - 2] + n * y->strides[r - 1]] = acc;
            }
    }
    d->matmuls++;
    return SD3_STATUS_OK;
}

static int32_t dev_execute(void *self, const sd3_op_desc *op) {
    device *d = self;
    if (!dev_supports(self, op)) return fail(d->error, SD3_STATUS_UNSUPPORTED, "only f32 add and matmul");
    return op->kind == SD3_OP_MATMUL ? run_matmul(d, op) : run_add(d, op);
}

/* Work runs synchronously inside execute(), so there is nothing to wait for. */
static int32_t dev_synchronize(void *self) {
    (void)self;
    return SD3_STATUS_OK;
}

static const sd3_device_info *dev_get_info(void *self) {
    device *d = self;
    d->info.free_memory_bytes = 0; /* unknown: host memory */
    return &d->info;
}

static const char *dev_stats(void *self) {
    device *d = self;
    snprintf(d->stats, sizeof d->stats, "adds=%llu\nmatmuls=%llu\nbytes_in_use=%llu\n", (unsigned long long)d->adds,
             (unsigned long long)d->matmuls, (unsigned long long)d->bytes_in_use);
    return d->stats;
}

static const char *dev_last_error(void *self) {
    return ((device *)self)->error;
}

static void dev_destroy(void *self) {
    device *d = self;
    for (uint64_t i = 0; i < d->n_buffers; i++) free(d->buffers[i].data);
    free(d->buffers);
    free(d);
}

/* ------------------------------------------------------------------------------------------ plugin */

static int32_t plugin_init(const char *options) {
    (void)options; /* no options */
    return SD3_STATUS_OK;
}

static uint32_t plugin_device_count(void) {
    return 1;
}

static int32_t plugin_open_device(uint32_t index, const sd3_device **out) {
    if (index != 0) return fail(plugin_error, SD3_STATUS_INVALID_ARGUMENT, "only device 0 exists");
    device *d = calloc(1, sizeof *d);
    if (!d) return fail(plugin_error, SD3_STATUS_OUT_OF_MEMORY, "calloc failed");
    d->info.struct_size = sizeof(sd3_device_info);
    d->info.kind = SD3_DEVICE_KIND_CPU;
    d->info.name = "minimal C example (host memory)";
    d->info.pci_id = NULL;
    d->info.dtype_mask = 1u << SD3_DTYPE_F32;
    d->info.capabilities = "example=1;ops=add,matmul";
    d->table.struct_size = sizeof(sd3_device);
    d->table.self = d;
    d->table.get_info = dev_get_info;
    d->table.alloc = dev_alloc;
    d->table.free = dev_free;
    d->table.upload = dev_upload;
    d->table.download = dev_download;
    d->table.copy = NULL; /* optional: the host copies through download + upload */
    d->table.supports = dev_supports;
    d->table.execute = dev_execute;
    d->table.synchronize = dev_synchronize;
    d->table.stats = dev_stats;
    d->table.last_error = dev_last_error;
    d->table.destroy = dev_destroy;
    *out = &d->table;
    return SD3_STATUS_OK;
}

static const char *plugin_last_error(void) {
    return plugin_error;
}

static const sd3_plugin PLUGIN = {
    .struct_size = sizeof(sd3_plugin),
    .abi_major = SD3_ABI_MAJOR,
    .abi_minor = SD3_ABI_MINOR,
    .name = "minimal",
    .version = "1.0.0",
    .init = plugin_init,
    .device_count = plugin_device_count,
    .open_device = plugin_open_device,
    .last_error = plugin_last_error,
    .shutdown = NULL, /* optional: nothing global to release */
};

SD3_EXPORT const sd3_plugin *sd3_backend_entry(uint32_t host_abi_major, uint32_t host_abi_minor) {
    (void)host_abi_major; /* the host checks the major; a plugin needing a newer host minor would return NULL */
    (void)host_abi_minor;
    return &PLUGIN;
}
