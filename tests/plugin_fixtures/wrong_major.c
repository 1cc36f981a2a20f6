/* Test fixture: a plugin built for a future ABI major. The host must refuse it by version, naming both. */
#include "sd3_plugin.h"

static const sd3_plugin PLUGIN = {
    .struct_size = sizeof(sd3_plugin),
    .abi_major = SD3_ABI_MAJOR + 98,
    .abi_minor = 3,
    .name = "wrong_major",
    .version = "0.0.1",
};

SD3_EXPORT const sd3_plugin *sd3_backend_entry(uint32_t host_abi_major, uint32_t host_abi_minor) {
    (void)host_abi_major;
    (void)host_abi_minor;
    return &PLUGIN;
}
