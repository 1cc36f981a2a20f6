/* Test fixture: a shared library named like a plugin but without the sd3_backend_entry symbol. */
#include "sd3_plugin.h"

SD3_EXPORT int sd3_not_the_entry(void) {
    return 42;
}
