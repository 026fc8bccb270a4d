#ifndef CK_TESTS_CHECK_H
#define CK_TESTS_CHECK_H

/* The C tests' one assertion: CHECK(cond) counts a pass or reports the
 * failing condition with its place and counts a failure, so a test runs to
 * its end; check_report(name) prints the counts and gives main()'s status.
 * Each test program includes this once (the counters are its own). */

#include <stdio.h>

static int n_pass, n_fail;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_pass++;                                                                              \
        } else {                                                                                   \
            n_fail++;                                                                              \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

static int check_report(const char *name) {
    printf("%s: %d passed, %d failed\n", name, n_pass, n_fail);
    return n_fail ? 1 : 0;
}

#endif
