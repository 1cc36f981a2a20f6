/* Test fixture: the stub runtime library missing_dependency.c links against (deleted before loading). */
int sd3_fixture_runtime_call(void) {
    return 0;
}
