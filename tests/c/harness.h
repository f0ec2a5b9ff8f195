/*
 * What the C tests (test_reshard.c, test_load.c) share: the CHECK counter, the two folders given
 * on the command line, paths, reading and copying files, and main's argument handling.
 *
 * Each test is one translation unit that includes this header once, so the counters and the
 * folders are file-static; the functions are static inline so that a test using only some of
 * them still builds with -Wall -Wextra -Werror.
 */
#ifndef RESHARD_TESTS_C_HARNESS_H
#define RESHARD_TESTS_C_HARNESS_H

#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int passed;
static int failed;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) {                                                          \
            passed++;                                                        \
        } else {                                                             \
            failed++;                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                    \
            fputc('\n', stderr);                                             \
        }                                                                    \
    } while (0)

#define PATH_LEN 4096

/* argv[1], the conformance fixtures, and argv[2], a folder the test may write in. */
static const char *fixtures;
static const char *scratch;

/* snprintf into a PATH_LEN buffer (through vsnprintf: gcc's truncation warnings assume the
 * worst of every %s; a path longer than PATH_LEN fails the test that uses it). */
__attribute__((format(printf, 2, 3))) static inline void fmt_path(char *buf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, PATH_LEN, fmt, ap);
    va_end(ap);
}

/* The whole file into a malloc'd buffer (*data, freed by the caller); -1 if it cannot be read. */
static inline int read_file(const char *path, unsigned char **data, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    while (buf != NULL) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) {
            break;
        }
        unsigned char *bigger = realloc(buf, cap * 2);
        if (bigger == NULL) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    fclose(f);
    if (buf == NULL) {
        return -1;
    }
    *data = buf;
    *len = n;
    return 0;
}

static inline int copy_file(const char *from, const char *to)
{
    unsigned char *buf = NULL;
    size_t n = 0;
    if (read_file(from, &buf, &n) != 0) {
        return -1;
    }
    FILE *f = fopen(to, "wb");
    int ok = f != NULL && fwrite(buf, 1, n, f) == n;
    if (f != NULL) {
        ok &= fclose(f) == 0;
    }
    free(buf);
    return ok ? 0 : -1;
}

/* main of a test: `usage: NAME FIXTURES_CONFORMANCE_DIR SCRATCH_DIR` sets `fixtures` and
 * `scratch` and creates the scratch folder, then every test runs in order; prints
 * "<label>N passed, M failed" last and returns the exit status (1 if anything failed, 2 for bad
 * arguments). */
static inline int harness_main(int argc, char **argv, const char *label, void (*const tests[])(void), size_t n)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s FIXTURES_CONFORMANCE_DIR SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    fixtures = argv[1];
    scratch = argv[2];
    if (mkdir(scratch, 0755) != 0 && errno != EEXIST) {
        perror(scratch);
        return 2;
    }
    for (size_t i = 0; i < n; i++) {
        tests[i]();
    }
    printf("%s%d passed, %d failed\n", label, passed, failed);
    return failed == 0 ? 0 : 1;
}

#endif
