/* Test fixture: a plugin that initialises but finds no device, and says why in last_error. */
#include "sd3_plugin.h"

#include <stddef.h>

static int32_t init(const char *options) {
    (void)options;
    return SD3_STATUS_OK;
}
static uint32_t device_count(void) {
    return 0;
}
static int32_t open_device(uint32_t index, const sd3_device **out) {
    (void)index;
    (void)out;
    return SD3_STATUS_INVALID_ARGUMENT;
}
static const char *last_error(void) {
    return "no accelerator found on PCI bus";
}

static const sd3_plugin PLUGIN = {
    .struct_size = sizeof(sd3_plugin),
    .abi_major = SD3_ABI_MAJOR,
    .abi_minor = SD3_ABI_MINOR,
    .name = "zero_devices",
    .version = "0.0.1",
    .init = init,
    .device_count = device_count,
    .open_device = open_device,
    .last_error = last_error,
};

SD3_EXPORT const sd3_plugin *sd3_backend_entry(uint32_t host_abi_major, uint32_t host_abi_minor) {
    (void)host_abi_major;
    (void)host_abi_minor;
    return &PLUGIN;
}
