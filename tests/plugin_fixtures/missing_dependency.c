/* Test fixture: a plugin linked against a runtime library that is not installed (built with
 * -lsd3_fixture_missing_runtime against a stub that is then deleted). dlopen must fail with the loader's text. */
#include "sd3_plugin.h"

#include <stddef.h>

int sd3_fixture_runtime_call(void);

SD3_EXPORT const sd3_plugin *sd3_backend_entry(uint32_t host_abi_major, uint32_t host_abi_minor) {
    (void)host_abi_major;
    (void)host_abi_minor;
    (void)sd3_fixture_runtime_call();
    return NULL;
}
