/*
 * What the C tests (test_reshard.c, test_load.c) share: the CHECK counter, the two folders given
 * on the command line, paths, reading and copying files, the plan of a conformance case, and
 * main (HARNESS_MAIN).
 *
 * Each test is one translation unit that includes this header once, so the counters and the
 * folders are file-static; the functions are static inline so that a test using only some of
 * them still builds with -Wall -Wextra -Werror.
 */
#ifndef RESHARD_TESTS_C_HARNESS_H
#define RESHARD_TESTS_C_HARNESS_H

#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "reshard.h"

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

#define MAX_THREADS 16

/* Runs fn(job i) for each of the n (at most MAX_THREADS) jobs of `size` bytes at `jobs`, each on
 * its own thread, all at once, and returns when every one has. */
static inline void run_threads(void *(*fn)(void *), void *jobs, size_t size, size_t n)
{
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (size_t i = 0; i < n && i < MAX_THREADS; i++) {
        started[i] = pthread_create(&threads[i], NULL, fn, (char *)jobs + i * size) == 0;
        CHECK(started[i], "pthread_create %zu", i);
    }
    for (size_t i = 0; i < n && i < MAX_THREADS; i++) {
        if (started[i]) {
            pthread_join(threads[i], NULL);
        }
    }
}

/* reshard_plan of conformance case `case_name`: its src/ folder, and the strategies named
 * (files or folders of the case; NULL for none); NULL after a failed CHECK. */
static inline ReshardPlan *make_plan(const char *case_name, const char *src_strategy, const char *dst_strategy)
{
    char src[PATH_LEN], s[PATH_LEN], d[PATH_LEN];
    fmt_path(src, "%s/%s/src", fixtures, case_name);
    fmt_path(s, "%s/%s/%s", fixtures, case_name, src_strategy ? src_strategy : "");
    fmt_path(d, "%s/%s/%s", fixtures, case_name, dst_strategy ? dst_strategy : "");
    ReshardPlan *plan = NULL;
    ReshardError *err = NULL;
    int32_t st = reshard_plan(src, src_strategy ? s : NULL, dst_strategy ? d : NULL, NULL, &plan, &err);
    CHECK(st == RESHARD_STATUS_OK && plan != NULL && err == NULL, "reshard_plan(%s): %d %s", case_name, st,
          err ? reshard_error_message(err) : "");
    reshard_error_free(err);
    return plan;
}

/* The main of a test: `HARNESS_MAIN("label: ", test_a, test_b, ...)` runs the tests in order
 * (see harness_main). */
#define HARNESS_MAIN(label, ...)                                                          \
    int main(int argc, char **argv)                                                       \
    {                                                                                     \
        static void (*const tests[])(void) = {__VA_ARGS__};                               \
        return harness_main(argc, argv, label, tests, sizeof tests / sizeof tests[0]);    \
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
