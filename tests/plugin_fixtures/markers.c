/* Test fixture: a device with the ABI 1.1 timing markers on a fake clock (marker k is taken at k/8 s), and no
 * ops. Built three ways:
 *   (default)            a 1.1 table with the markers;
 *   -DTABLE_1_0          the same pointers, but struct_size says 1.0: the host must not read or call them;
 *   -DDECLINE_MARKERS    record_marker answers SD3_STATUS_UNSUPPORTED: the host reports no markers.
 * stats() counts the calls, so the test sees what the host called. */
#include "sd3_plugin.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct device {
    sd3_device table;
    sd3_device_info info;
    uint64_t next_buffer, recorded, record_calls, released, elapsed_calls;
    char error[128];
    char stats[256];
} device;

static int32_t dev_alloc(void *self, uint64_t bytes, uint64_t *out) {
    (void)bytes;
    *out = ++((device *)self)->next_buffer;
    return SD3_STATUS_OK;
}
static void dev_free(void *self, uint64_t buffer) {
    (void)self;
    (void)buffer;
}
static int32_t dev_upload(void *self, uint64_t b, uint64_t o, const void *data, uint64_t n) {
    (void)self, (void)b, (void)o, (void)data, (void)n;
    return SD3_STATUS_OK;
}
static int32_t dev_download(void *self, uint64_t b, uint64_t o, void *out, uint64_t n) {
    (void)self, (void)b, (void)o;
    for (uint64_t i = 0; i < n; i++) ((unsigned char *)out)[i] = 0;
    return SD3_STATUS_OK;
}
static int32_t dev_supports(void *self, const sd3_op_desc *op) {
    (void)self, (void)op;
    return 0;
}
static int32_t dev_execute(void *self, const sd3_op_desc *op) {
    (void)op;
    snprintf(((device *)self)->error, 128, "no ops");
    return SD3_STATUS_UNSUPPORTED;
}
static int32_t dev_synchronize(void *self) {
    (void)self;
    return SD3_STATUS_OK;
}
static const sd3_device_info *dev_get_info(void *self) {
    return &((device *)self)->info;
}
static const char *dev_stats(void *self) {
    device *d = self;
    snprintf(d->stats, sizeof d->stats, "record_calls=%llu\nrecorded=%llu\nreleased=%llu\nelapsed_calls=%llu\n",
             (unsigned long long)d->record_calls, (unsigned long long)d->recorded, (unsigned long long)d->released,
             (unsigned long long)d->elapsed_calls);
    return d->stats;
}
static const char *dev_last_error(void *self) {
    return ((device *)self)->error;
}
static void dev_destroy(void *self) {
    free(self);
}

static int32_t dev_record_marker(void *self, uint64_t *out) {
    device *d = self;
    d->record_calls++;
#ifdef DECLINE_MARKERS
    (void)out;
    snprintf(d->error, 128, "no timer on this device");
    return SD3_STATUS_UNSUPPORTED;
#else
    *out = 100 + d->recorded++; /* handles need not be small or start at 0 */
    return SD3_STATUS_OK;
#endif
}
static int32_t dev_marker_elapsed(void *self, uint64_t start, uint64_t end, double *out) {
    device *d = self;
    d->elapsed_calls++;
    if (start < 100 || end < start || end >= 100 + d->recorded) {
        snprintf(d->error, 128, "unknown markers %llu..%llu", (unsigned long long)start, (unsigned long long)end);
        return SD3_STATUS_INVALID_ARGUMENT;
    }
    *out = (double)(end - start) / 8.0;
    return SD3_STATUS_OK;
}
static void dev_release_marker(void *self, uint64_t marker) {
    (void)marker;
    ((device *)self)->released++;
}

static int32_t plugin_init(const char *options) {
    (void)options;
    return SD3_STATUS_OK;
}
static uint32_t plugin_device_count(void) {
    return 1;
}
static int32_t plugin_open_device(uint32_t index, const sd3_device **out) {
    (void)index;
    device *d = calloc(1, sizeof *d);
    if (!d) return SD3_STATUS_OUT_OF_MEMORY;
    d->info.struct_size = sizeof(sd3_device_info);
    d->info.kind = SD3_DEVICE_KIND_OTHER;
    d->info.name = "markers fixture";
    d->info.dtype_mask = 1u << SD3_DTYPE_F32;
#ifdef TABLE_1_0
    d->table.struct_size = offsetof(sd3_device, record_marker);
#else
    d->table.struct_size = sizeof(sd3_device);
#endif
    d->table.self = d;
    d->table.get_info = dev_get_info;
    d->table.alloc = dev_alloc;
    d->table.free = dev_free;
    d->table.upload = dev_upload;
    d->table.download = dev_download;
    d->table.supports = dev_supports;
    d->table.execute = dev_execute;
    d->table.synchronize = dev_synchronize;
    d->table.stats = dev_stats;
    d->table.last_error = dev_last_error;
    d->table.destroy = dev_destroy;
    d->table.record_marker = dev_record_marker;
    d->table.marker_elapsed = dev_marker_elapsed;
    d->table.release_marker = dev_release_marker;
    *out = &d->table;
    return SD3_STATUS_OK;
}
static const char *plugin_last_error(void) {
    return "";
}

static const sd3_plugin PLUGIN = {
    .struct_size = sizeof(sd3_plugin),
    .abi_major = SD3_ABI_MAJOR,
#ifdef TABLE_1_0
    .abi_minor = 0,
#else
    .abi_minor = SD3_ABI_MINOR,
#endif
    .name = "markers",
    .version = "0.0.1",
    .init = plugin_init,
    .device_count = plugin_device_count,
    .open_device = plugin_open_device,
    .last_error = plugin_last_error,
};

SD3_EXPORT const sd3_plugin *sd3_backend_entry(uint32_t host_abi_major, uint32_t host_abi_minor) {
    (void)host_abi_major;
    (void)host_abi_minor;
    return &PLUGIN;
}
