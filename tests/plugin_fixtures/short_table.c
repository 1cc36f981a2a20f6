/* Test fixture: a plugin of the right major whose table claims to end before the required functions. */
#include "sd3_plugin.h"

#include <stddef.h>

static const sd3_plugin PLUGIN = {
    .struct_size = offsetof(sd3_plugin, init),
    .abi_major = SD3_ABI_MAJOR,
    .abi_minor = SD3_ABI_MINOR,
    .name = "short_table",
    .version = "0.0.1",
};

SD3_EXPORT const sd3_plugin *sd3_backend_entry(uint32_t host_abi_major, uint32_t host_abi_minor) {
    (void)host_abi_major;
    (void)host_abi_minor;
    return &PLUGIN;
}
