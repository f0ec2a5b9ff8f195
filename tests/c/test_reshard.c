/*
 * C test of libreshard on MindSpore-made fixtures: outputs are compared byte for byte with what
 * mindspore.transform_checkpoints wrote, and bad calls must give errors, never crashes.
 *
 * usage: test_reshard FIXTURES_CONFORMANCE_DIR SCRATCH_DIR
 * Prints "N passed, M failed" last; exits 1 if anything failed.
 */
#include "harness.h"

#include <dirent.h>
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

#include "reshard.h"

/* path_of(buf, "%s/%s", ...) into a caller buffer. */
static const char *path_of(char *buf, const char *fmt, const char *a, const char *b)
{
    snprintf(buf, PATH_LEN, fmt, a, b);
    return buf;
}

/* 1 when both files exist and have the same bytes (cmp). */
static int same_bytes(const char *a, const char *b)
{
    unsigned char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int ok = read_file(a, &x, &nx) == 0 && read_file(b, &y, &ny) == 0 && nx == ny &&
             memcmp(x, y, nx) == 0;
    free(x);
    free(y);
    return ok;
}

static int exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* Compares dst/rank_r/<prefix>r.<ext> with the case's expected/rank_r/checkpoint_r.<ext>. */
static void check_rank_output(const char *case_name, const char *dst, uint32_t r, const char *prefix,
                              const char *ext)
{
    char got[PATH_LEN], want[PATH_LEN];
    snprintf(got, sizeof got, "%s/rank_%u/%s%u.%s", dst, r, prefix, r, ext);
    snprintf(want, sizeof want, "%s/%s/expected/rank_%u/checkpoint_%u.%s", fixtures, case_name, r, r,
             ext);
    CHECK(same_bytes(got, want), "%s differs from MindSpore's %s", got, want);
}

/* Checks a failed call: status, error object with that code, message containing `needle`. Frees
 * the error object and sets *err to NULL for the next call. */
static void check_error(int32_t status, ReshardError **errp, int32_t want, const char *needle)
{
    ReshardError *err = *errp;
    CHECK(status == want, "status %d, want %d (%s)", status, want,
          err ? reshard_error_message(err) : "no error object");
    CHECK(err != NULL, "no error object for status %d", status);
    if (err != NULL) {
        const char *msg = reshard_error_message(err);
        CHECK(reshard_error_code(err) == status, "error code %d != status %d",
              reshard_error_code(err), status);
        CHECK(msg != NULL && strstr(msg, needle) != NULL, "message \"%s\" lacks \"%s\"", msg,
              needle);
    }
    reshard_error_free(err);
    *errp = NULL;
}

/* reshard_execute of destination rank `rank` alone succeeds (`what` says when). */
static void execute_rank_ok(const ReshardPlan *plan, const char *dst, uint32_t rank, const char *what)
{
    ReshardError *err = NULL;
    int32_t st = reshard_execute(plan, dst, &rank, 1, NULL, &err);
    CHECK(st == RESHARD_STATUS_OK, "%s: %d %s", what, st, err ? reshard_error_message(err) : "");
    reshard_error_free(err);
}

static void test_version(void)
{
    CHECK(reshard_abi_version() == RESHARD_ABI_VERSION, "abi %u", reshard_abi_version());
    const char *v = reshard_version();
    CHECK(v != NULL && strlen(v) >= 5 && strchr(v, '.') != NULL, "version \"%s\"", v ? v : "(null)");
}

/* Progress recorder for reshard_execute_with_progress. */
struct progress {
    int calls;
    int monotonic;
    uint64_t last;
    uint64_t total;
    int user_ok;
};

static void on_progress(uint64_t done, uint64_t total, void *user)
{
    struct progress *p = user;
    if (p->calls > 0 && done <= p->last) {
        p->monotonic = 0;
    }
    p->calls++;
    p->last = done;
    p->total = total;
}

/* A callback that holds the execute call open until the main thread has tried the same rank. */
struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started;
    int released;
};

static void hold_until_released(uint64_t done, uint64_t total, void *user)
{
    (void)done;
    (void)total;
    struct gate *g = user;
    pthread_mutex_lock(&g->mu);
    g->started = 1;
    pthread_cond_broadcast(&g->cv);
    while (!g->released) {
        pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
}

static void gate_init(struct gate *g)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->started = 0;
    g->released = 0;
}

/* Returns once the callback holds the call. */
static void gate_wait_started(struct gate *g)
{
    pthread_mutex_lock(&g->mu);
    while (!g->started) {
        pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
}

/* Lets the held call go on. */
static void gate_release(struct gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->released = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void gate_destroy(struct gate *g)
{
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
}

/* What a call made on another thread returned: its status and error message. */
struct outcome {
    int32_t status;
    char message[1024];
};

/* Keeps status and message of a call, and frees its error object. */
static void record(struct outcome *o, int32_t status, ReshardError *err)
{
    o->status = status;
    snprintf(o->message, sizeof o->message, "%s", err ? reshard_error_message(err) : "");
    reshard_error_free(err);
}

struct held_job {
    const ReshardPlan *plan;
    const char *dst;
    struct gate *gate;
    int32_t status;
};

static void *run_held(void *arg)
{
    struct held_job *j = arg;
    uint32_t rank = 0;
    ReshardError *err = NULL;
    j->status = reshard_execute_with_progress(j->plan, j->dst, &rank, 1, "{\"threads\": 1}",
                                              hold_until_released, j->gate, &err);
    if (err != NULL) {
        fprintf(stderr, "held execute: %s\n", reshard_error_message(err));
    }
    reshard_error_free(err);
    return NULL;
}

/* Entries of folder `dir` other than ".", ".." and the manifest lock file (-1 if it cannot be
 * read); the first such name goes to `first`. */
static int entries_besides_lock(const char *dir, char *first, size_t first_len)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        return -1;
    }
    int n = 0;
    first[0] = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0 ||
            strcmp(e->d_name, ".reshard_manifest.lock") == 0) {
            continue;
        }
        if (n++ == 0) {
            snprintf(first, first_len, "%s", e->d_name);
        }
    }
    closedir(d);
    return n;
}

struct cancelled_job {
    const ReshardPlan *plan;
    const char *dst;
    struct gate *gate;
    ReshardCancel *cancel;
    struct outcome out;
};

static void *run_cancellable(void *arg)
{
    struct cancelled_job *j = arg;
    uint32_t rank = 1;
    ReshardError *err = NULL;
    int32_t st = reshard_execute_cancellable(j->plan, j->dst, &rank, 1, "{\"threads\": 1}", hold_until_released,
                                             j->gate, j->cancel, &err);
    CHECK(err == NULL || reshard_error_code(err) == st, "error code %d, status %d", reshard_error_code(err), st);
    record(&j->out, st, err);
    return NULL;
}

/* reshard_execute_cancellable: another thread requests a stop while rank 1 is being written (the
 * progress callback holds the call until the request is made): CANCELLED, and the rank's folder
 * holds neither the output nor a temporary file nor a manifest. Then the same plan writes it
 * whole, a handle requested before the call stops it at once, and NULL handles are refused or
 * ignored as documented. */
static void test_cancel(void)
{
    const char *c = "complete_to_dp2mp2";
    ReshardPlan *plan = make_plan(c, NULL, "dst_strategy.ckpt");
    if (plan == NULL) {
        return;
    }
    char dst[PATH_LEN], rank_dir[PATH_LEN], first[256];
    path_of(dst, "%s/%s", scratch, "c2d_cancel");
    path_of(rank_dir, "%s/%s", dst, "rank_1");

    ReshardCancel *cancel = reshard_cancel_new();
    CHECK(cancel != NULL, "reshard_cancel_new");
    struct gate g;
    gate_init(&g);
    struct cancelled_job job = {plan, dst, &g, cancel, {-1, ""}};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, run_cancellable, &job) == 0, "pthread_create");
    gate_wait_started(&g);
    CHECK(reshard_cancel_request(cancel) == RESHARD_STATUS_OK, "reshard_cancel_request");
    gate_release(&g);
    pthread_join(t, NULL);
    CHECK(job.out.status == RESHARD_STATUS_CANCELLED, "cancelled execute returned %d: %s", job.out.status,
          job.out.message);
    CHECK(strstr(job.out.message, "cancelled") != NULL && strstr(job.out.message, "checkpoint_1.ckpt") != NULL,
          "message \"%s\"", job.out.message);
    int left = entries_besides_lock(rank_dir, first, sizeof first);
    CHECK(left == 0, "a cancelled run left %d file(s) in %s, e.g. %s", left, rank_dir, first);
    gate_destroy(&g);

    /* Requested before the call: stopped before anything is written. */
    ReshardError *err = NULL;
    uint32_t two = 2;
    int32_t st = reshard_execute_cancellable(plan, dst, &two, 1, NULL, NULL, NULL, cancel, &err);
    check_error(st, &err, RESHARD_STATUS_CANCELLED, "cancelled");
    path_of(rank_dir, "%s/%s", dst, "rank_2");
    left = entries_besides_lock(rank_dir, first, sizeof first);
    CHECK(left <= 0, "a run cancelled before it started left %s in %s", first, rank_dir);
    reshard_cancel_free(cancel);

    /* A fresh handle (or none) and the same plan: the outputs are written whole. */
    cancel = reshard_cancel_new();
    uint32_t ranks[2] = {1, 2};
    st = reshard_execute_cancellable(plan, dst, ranks, 2, NULL, NULL, NULL, cancel, &err);
    CHECK(st == RESHARD_STATUS_OK, "execute with an unrequested handle: %d %s", st,
          err ? reshard_error_message(err) : "");
    reshard_error_free(err);
    err = NULL;
    check_rank_output(c, dst, 1, "checkpoint_", "ckpt");
    check_rank_output(c, dst, 2, "checkpoint_", "ckpt");
    st = reshard_execute_cancellable(plan, dst, ranks, 2, NULL, NULL, NULL, NULL, &err);
    CHECK(st == RESHARD_STATUS_OK, "execute with a NULL handle: %d", st);
    reshard_error_free(err);
    CHECK(reshard_cancel_request(NULL) == RESHARD_STATUS_NULL_ARGUMENT, "reshard_cancel_request(NULL)");
    reshard_cancel_free(cancel);
    reshard_cancel_free(NULL);
    reshard_plan_free(plan);
}

static void test_complete_to_dp2mp2(void)
{
    const char *c = "complete_to_dp2mp2";
    ReshardPlan *plan = make_plan(c, NULL, "dst_strategy.ckpt");
    if (plan == NULL) {
        return;
    }
    CHECK(reshard_plan_dst_rank_count(plan) == 4, "count %u", reshard_plan_dst_rank_count(plan));
    for (uint32_t r = 0; r < 4; r++) {
        uint32_t ranks[4] = {99, 99, 99, 99};
        size_t n = 0;
        int32_t st = reshard_plan_src_ranks(plan, r, ranks, 4, &n);
        CHECK(st == RESHARD_STATUS_OK && n == 1 && ranks[0] == 0, "src ranks of %u: %d n=%zu", r, st, n);
    }

    /* All ranks, default options. */
    char dst[PATH_LEN];
    path_of(dst, "%s/%s", scratch, "c2d_all");
    ReshardError *err = NULL;
    int32_t st = reshard_execute(plan, dst, NULL, 0, NULL, &err);
    CHECK(st == RESHARD_STATUS_OK && err == NULL, "execute all: %d %s", st,
          err ? reshard_error_message(err) : "");
    reshard_error_free(err);
    err = NULL;
    for (uint32_t r = 0; r < 4; r++) {
        check_rank_output(c, dst, r, "checkpoint_", "ckpt");
    }

    /* Double execute of one rank after the first call returned: a verified output is kept,
     * a damaged one rewritten, and "resume": false always rewrites. */
    uint32_t two = 2;
    execute_rank_ok(plan, dst, two, "re-execute rank 2");
    check_rank_output(c, dst, 2, "checkpoint_", "ckpt");
    char out2[PATH_LEN];
    path_of(out2, "%s/%s", dst, "rank_2/checkpoint_2.ckpt");
    FILE *damage = fopen(out2, "r+b");
    CHECK(damage != NULL && fseek(damage, 100, SEEK_SET) == 0 && fwrite("damage", 1, 6, damage) == 6,
          "damage %s", out2);
    if (damage != NULL) {
        fclose(damage);
    }
    execute_rank_ok(plan, dst, two, "re-execute damaged rank 2");
    check_rank_output(c, dst, 2, "checkpoint_", "ckpt");
    st = reshard_execute(plan, dst, &two, 1, "{\"resume\": false, \"sync\": false}", &err);
    CHECK(st == RESHARD_STATUS_OK, "re-execute rank 2 without resume: %d", st);
    reshard_error_free(err);
    err = NULL;
    check_rank_output(c, dst, 2, "checkpoint_", "ckpt");

    /* Options: prefix and threads; the prefix only changes the file name. */
    path_of(dst, "%s/%s", scratch, "c2d_prefix");
    uint32_t one = 1;
    st = reshard_execute(plan, dst, &one, 1, "{\"prefix\": \"ckpt_\", \"threads\": 1, \"output_format\": \"ckpt\"}",
                         &err);
    CHECK(st == RESHARD_STATUS_OK, "execute with options: %d", st);
    reshard_error_free(err);
    err = NULL;
    check_rank_output(c, dst, 1, "ckpt_", "ckpt");

    /* Progress callback. */
    path_of(dst, "%s/%s", scratch, "c2d_progress");
    struct progress p = {0, 1, 0, 0, 1};
    uint32_t both[2] = {3, 0};
    st = reshard_execute_with_progress(plan, dst, both, 2, NULL, on_progress, &p, &err);
    CHECK(st == RESHARD_STATUS_OK, "execute with progress: %d", st);
    reshard_error_free(err);
    err = NULL;
    CHECK(p.calls > 0 && p.monotonic && p.last == p.total && p.total > 0,
          "progress calls=%d monotonic=%d last=%llu total=%llu", p.calls, p.monotonic,
          (unsigned long long)p.last, (unsigned long long)p.total);
    check_rank_output(c, dst, 3, "checkpoint_", "ckpt");
    check_rank_output(c, dst, 0, "checkpoint_", "ckpt");
    st = reshard_execute_with_progress(plan, dst, both, 2, NULL, NULL, NULL, &err);
    CHECK(st == RESHARD_STATUS_OK, "execute with NULL progress: %d", st);
    reshard_error_free(err);
    err = NULL;

    /* Concurrent execute of the same rank: the second call is refused with BUSY and writes
     * nothing; a disjoint rank goes through meanwhile. */
    path_of(dst, "%s/%s", scratch, "c2d_busy");
    struct gate g;
    gate_init(&g);
    struct held_job job = {plan, dst, &g, -1};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, run_held, &job) == 0, "pthread_create");
    gate_wait_started(&g);
    uint32_t overlap[2] = {3, 0};
    st = reshard_execute(plan, dst, overlap, 2, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_BUSY, "rank(s) 0 are being written");
    char rank3[PATH_LEN];
    path_of(rank3, "%s/%s", dst, "rank_3");
    CHECK(!exists(rank3), "a refused call wrote %s", rank3);
    execute_rank_ok(plan, dst, 3, "disjoint rank while another call runs");
    gate_release(&g);
    pthread_join(t, NULL);
    CHECK(job.status == RESHARD_STATUS_OK, "held execute: %d", job.status);
    check_rank_output(c, dst, 0, "checkpoint_", "ckpt");
    check_rank_output(c, dst, 3, "checkpoint_", "ckpt");
    /* Once the first call has returned, the rank can be executed again. */
    execute_rank_ok(plan, dst, 0, "execute rank 0 after the held call returned");
    gate_destroy(&g);

    /* JSON summary. */
    char *json = reshard_plan_to_json(plan);
    CHECK(json != NULL && strstr(json, "\"dst_ranks\":4") != NULL &&
              strstr(json, "rank_3/checkpoint_3.ckpt") != NULL,
          "json: %.200s", json ? json : "(null)");
    reshard_string_free(json);

    /* Bad rank lists and arguments. */
    path_of(dst, "%s/%s", scratch, "c2d_bad");
    uint32_t far = 99;
    st = reshard_execute(plan, dst, &far, 1, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_RANK_OUT_OF_RANGE, "destination rank 99 does not exist");
    uint32_t dup[2] = {1, 1};
    st = reshard_execute(plan, dst, dup, 2, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_INVALID_ARGUMENT, "appears more than once");
    st = reshard_execute(plan, dst, NULL, 2, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "'dst_ranks' is NULL");
    uint32_t five[5] = {0, 1, 2, 3, 0};
    st = reshard_execute(plan, dst, five, 5, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_INVALID_ARGUMENT, "n_dst_ranks is 5");
    st = reshard_execute(plan, NULL, NULL, 0, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "'dst_ckpt_dir' is NULL");
    st = reshard_execute(plan, "", NULL, 0, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_INVALID_ARGUMENT, "empty path");
    st = reshard_execute(NULL, dst, NULL, 0, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "'plan' is NULL");
    /* Bad options: (options, status, what the message names). */
    static const struct {
        const char *options;
        int32_t want;
        const char *needle;
    } bad_options[] = {
        {"{\"prefx\": \"a\"}", RESHARD_STATUS_INVALID_OPTIONS, "unknown option \"prefx\""},
        {"{\"threads\": \"2\"}", RESHARD_STATUS_INVALID_OPTIONS, "\"threads\" must be"},
        {"{\"output_format\": \"npz\"}", RESHARD_STATUS_INVALID_OPTIONS, "npz"},
        {"{", RESHARD_STATUS_INVALID_OPTIONS, "not valid JSON"},
        {"{\"prefix\": \"\xff\"}", RESHARD_STATUS_INVALID_UTF8, "not valid UTF-8"},
    };
    for (size_t i = 0; i < sizeof bad_options / sizeof bad_options[0]; i++) {
        st = reshard_execute(plan, dst, NULL, 0, bad_options[i].options, &err);
        check_error(st, &err, bad_options[i].want, bad_options[i].needle);
    }
    CHECK(!exists(dst), "failed calls created %s", dst);
    /* No error object wanted: the status alone. */
    CHECK(reshard_execute(plan, dst, &far, 1, NULL, NULL) == RESHARD_STATUS_RANK_OUT_OF_RANGE,
          "status without error_out");

    /* src_ranks misuse. */
    uint32_t out[1] = {77};
    size_t n = 12345;
    CHECK(reshard_plan_src_ranks(plan, 4, out, 1, &n) == RESHARD_STATUS_RANK_OUT_OF_RANGE && n == 12345,
          "src_ranks rank 4");
    CHECK(reshard_plan_src_ranks(plan, 0, out, 1, NULL) == RESHARD_STATUS_NULL_ARGUMENT, "NULL len_out");
    CHECK(reshard_plan_src_ranks(plan, 0, NULL, 3, &n) == RESHARD_STATUS_NULL_ARGUMENT, "NULL out");
    CHECK(reshard_plan_src_ranks(NULL, 0, out, 1, &n) == RESHARD_STATUS_NULL_ARGUMENT, "NULL plan");
    CHECK(out[0] == 77 && n == 12345, "outputs written on failure");
    reshard_plan_free(plan);
}

/* An output folder inside the source folder is refused, however it is spelled. Works on a copy
 * of the source, so a regression cannot write into the fixtures. */
static void test_output_inside_source(void)
{
    char src[PATH_LEN], rank0[PATH_LEN], file[PATH_LEN], from[PATH_LEN], d[PATH_LEN], dst[PATH_LEN];
    path_of(src, "%s/%s", scratch, "inside_src");
    path_of(rank0, "%s/%s", src, "rank_0");
    path_of(file, "%s/%s", rank0, "llama_tiny.ckpt");
    snprintf(from, sizeof from, "%s/complete_to_dp2mp2/src/rank_0/llama_tiny.ckpt", fixtures);
    snprintf(d, sizeof d, "%s/complete_to_dp2mp2/dst_strategy.ckpt", fixtures);
    CHECK(mkdir(src, 0755) == 0 && mkdir(rank0, 0755) == 0 && copy_file(from, file) == 0, "copy %s", from);
    ReshardPlan *plan = NULL;
    ReshardError *err = NULL;
    int32_t st = reshard_plan(src, NULL, d, NULL, &plan, &err);
    CHECK(st == RESHARD_STATUS_OK, "plan: %d", st);
    reshard_error_free(err);
    err = NULL;
    const char *spellings[] = {"%s/%s", "%s/new/../%s", "%s/../inside_src/%s"};
    for (size_t i = 0; i < sizeof spellings / sizeof spellings[0]; i++) {
        snprintf(dst, sizeof dst, spellings[i], src, "out");
        st = reshard_execute(plan, dst, NULL, 0, NULL, &err);
        check_error(st, &err, RESHARD_STATUS_INVALID_ARGUMENT, "inside the source folder");
    }
    path_of(dst, "%s/%s", src, "out");
    CHECK(!exists(dst), "wrote into the source folder");
    path_of(dst, "%s/%s", src, "new");
    CHECK(!exists(dst), "wrote into the source folder");
    reshard_plan_free(plan);
}

static void test_dp2mp2_to_complete(void)
{
    const char *c = "dp2mp2_to_complete";
    ReshardPlan *plan = make_plan(c, "src_strategy.ckpt", NULL);
    if (plan == NULL) {
        return;
    }
    CHECK(reshard_plan_dst_rank_count(plan) == 1, "count %u", reshard_plan_dst_rank_count(plan));
    /* MindSpore's rank_list_for_transform(0, ...) = [1, 0]. */
    size_t n = 0;
    CHECK(reshard_plan_src_ranks(plan, 0, NULL, 0, &n) == RESHARD_STATUS_BUFFER_TOO_SMALL && n == 2,
          "length query n=%zu", n);
    uint32_t small[1] = {77};
    CHECK(reshard_plan_src_ranks(plan, 0, small, 1, &n) == RESHARD_STATUS_BUFFER_TOO_SMALL && n == 2 &&
              small[0] == 77,
          "cap 1");
    uint32_t ranks[2] = {0, 0};
    CHECK(reshard_plan_src_ranks(plan, 0, ranks, 2, &n) == RESHARD_STATUS_OK && n == 2 && ranks[0] == 1 &&
              ranks[1] == 0,
          "ranks %u %u", ranks[0], ranks[1]);
    char dst[PATH_LEN];
    path_of(dst, "%s/%s", scratch, "d2c");
    uint32_t zero = 0;
    ReshardError *err = NULL;
    int32_t st = reshard_execute(plan, dst, &zero, 1, NULL, &err);
    CHECK(st == RESHARD_STATUS_OK, "execute: %d %s", st, err ? reshard_error_message(err) : "");
    reshard_error_free(err);
    check_rank_output(c, dst, 0, "checkpoint_", "ckpt");
    reshard_plan_free(plan);
}

struct rank_job {
    const ReshardPlan *plan;
    const char *dst;
    uint32_t rank;
    int32_t status;
};

static void *run_rank(void *arg)
{
    struct rank_job *j = arg;
    ReshardError *err = NULL;
    j->status = reshard_execute(j->plan, j->dst, &j->rank, 1, "{\"threads\": 1}", &err);
    if (err != NULL) {
        fprintf(stderr, "rank %u: %s\n", j->rank, reshard_error_message(err));
    }
    reshard_error_free(err);
    return NULL;
}

/* Pipeline stages, strategies given as folders of stage files, ranks executed from 4 threads. */
static void test_pipeline_threads(void)
{
    const char *c = "dp2mp2pp2_to_dp1mp2pp2";
    ReshardPlan *plan = make_plan(c, "src_strategy_stages", "dst_strategy_stages");
    if (plan == NULL) {
        return;
    }
    CHECK(reshard_plan_dst_rank_count(plan) == 4, "count %u", reshard_plan_dst_rank_count(plan));
    /* The source ranks reshard reads: highest first, within the 8 source ranks. (MindSpore's
     * rank_list_for_transform lists all 8 here; reshard reads only the ranks it needs.) */
    for (uint32_t r = 0; r < 4; r++) {
        uint32_t ranks[8] = {0};
        size_t n = 0;
        int ok = reshard_plan_src_ranks(plan, r, ranks, 8, &n) == RESHARD_STATUS_OK && n > 0 && n <= 8;
        for (size_t i = 0; ok && i < n; i++) {
            ok = ranks[i] < 8 && (i == 0 || ranks[i] < ranks[i - 1]);
        }
        CHECK(ok, "src ranks of %u (n=%zu) not descending source ranks", r, n);
    }
    char dst[PATH_LEN];
    path_of(dst, "%s/%s", scratch, "pp_threads");
    struct rank_job jobs[4];
    for (uint32_t r = 0; r < 4; r++) {
        jobs[r] = (struct rank_job){plan, dst, r, -1};
    }
    run_threads(run_rank, jobs, sizeof jobs[0], 4);
    for (uint32_t r = 0; r < 4; r++) {
        CHECK(jobs[r].status == RESHARD_STATUS_OK, "thread %u: %d", r, jobs[r].status);
        check_rank_output(c, dst, r, "checkpoint_", "ckpt");
    }
    reshard_plan_free(plan);
}

static void test_safetensors(void)
{
    const char *c = "safetensors_dp2mp2_to_dp1mp4";
    ReshardPlan *plan = make_plan(c, "src_strategy.ckpt", "dst_strategy.ckpt");
    if (plan == NULL) {
        return;
    }
    char dst[PATH_LEN];
    path_of(dst, "%s/%s", scratch, "st");
    ReshardError *err = NULL;
    int32_t st = reshard_execute(plan, dst, NULL, 0, "{\"output_format\": \"safetensors\"}", &err);
    CHECK(st == RESHARD_STATUS_OK, "execute: %d %s", st, err ? reshard_error_message(err) : "");
    reshard_error_free(err);
    for (uint32_t r = 0; r < 4; r++) {
        check_rank_output(c, dst, r, "checkpoint_", "safetensors");
    }
    reshard_plan_free(plan);
}

static void test_merge(void)
{
    const char *c = "dp2mp2pp2_to_dp1mp2pp2";
    char stages[PATH_LEN], base[PATH_LEN], out[PATH_LEN], want[PATH_LEN];
    path_of(base, "%s/%s", fixtures, c);
    const char *which[2][2] = {{"src_strategy_stages", "src_strategy.ckpt"},
                               {"dst_strategy_stages", "dst_strategy.ckpt"}};
    for (int i = 0; i < 2; i++) {
        path_of(stages, "%s/%s", base, which[i][0]);
        path_of(want, "%s/%s", base, which[i][1]);
        snprintf(out, sizeof out, "%s/merged/new_dir/%s", scratch, which[i][1]);
        ReshardError *err = NULL;
        int32_t st = reshard_merge_strategies(stages, out, &err);
        CHECK(st == RESHARD_STATUS_OK, "merge %s: %d %s", stages, st, err ? reshard_error_message(err) : "");
        reshard_error_free(err);
        CHECK(same_bytes(out, want), "merged %s differs from MindSpore's %s", out, want);
    }
    ReshardError *err = NULL;
    int32_t st = reshard_merge_strategies(NULL, out, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "'src_dir' is NULL");
    st = reshard_merge_strategies(stages, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "'dst_file' is NULL");
    path_of(stages, "%s/%s", scratch, "no_such_stage_dir");
    st = reshard_merge_strategies(stages, out, &err);
    check_error(st, &err, RESHARD_STATUS_IO, "no_such_stage_dir");
    path_of(stages, "%s/%s", base, "expected");
    st = reshard_merge_strategies(stages, out, &err);
    check_error(st, &err, RESHARD_STATUS_SOURCE, "no strategy files");
}

/* reshard_unify on MindSpore-made sources writes MindSpore's unified folder. */
static void test_unify(void)
{
    char base[PATH_LEN], src[PATH_LEN], strat[PATH_LEN], out[PATH_LEN], got[PATH_LEN], want[PATH_LEN];
    path_of(base, "%s/../st_era/%s", fixtures, "dp2mp2");
    path_of(src, "%s/%s", base, "full");
    path_of(strat, "%s/%s", base, "src_strategy.ckpt");
    path_of(out, "%s/%s", scratch, "unified");
    char wbase[PATH_LEN];
    path_of(wbase, "%s/%s", base, "unified_full");
    ReshardError *err = NULL;
    int32_t st = reshard_unify(src, strat, out, "{\"sync\": false, \"merge_with_redundancy\": true}", &err);
    CHECK(st == RESHARD_STATUS_OK, "unify: %d %s", st, err ? reshard_error_message(err) : "");
    reshard_error_free(err);
    const char *files[] = {"param_name_map.json", "hyper_param.safetensors", "part0.safetensors"};
    for (int i = 0; i < 3; i++) {
        path_of(got, "%s/%s", out, files[i]);
        path_of(want, "%s/%s", wbase, files[i]);
        CHECK(same_bytes(got, want), "unified %s differs from MindSpore's %s", got, want);
    }
    err = NULL;
    st = reshard_unify(NULL, strat, out, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "'src_dir' is NULL");
    st = reshard_unify(src, strat, out, "{\"merge\": true}", &err);
    check_error(st, &err, RESHARD_STATUS_INVALID_OPTIONS, "unknown option \"merge\"");
}

/* reshard_plan with these arguments fails with status `want` and an error naming `needle`, and
 * leaves plan_out NULL. */
static void plan_fails(const char *src, const char *src_strategy, const char *dst_strategy, const char *options,
                       int32_t want, const char *needle)
{
    ReshardPlan *plan = NULL;
    ReshardError *err = NULL;
    int32_t st = reshard_plan(src, src_strategy, dst_strategy, options, &plan, &err);
    check_error(st, &err, want, needle);
    CHECK(plan == NULL, "plan_out written on failure (%s)", needle);
}

static void test_bad_plans(void)
{
    char src[PATH_LEN], strat[PATH_LEN], ckpt[PATH_LEN], missing[PATH_LEN];
    ReshardPlan *plan = NULL;
    ReshardError *err = NULL;

    /* NULL where a path or out-pointer is required. */
    plan_fails(NULL, NULL, NULL, NULL, RESHARD_STATUS_NULL_ARGUMENT, "'src_ckpt_dir' is NULL");
    snprintf(src, sizeof src, "%s/complete_to_dp2mp2/src", fixtures);
    int32_t st = reshard_plan(src, NULL, NULL, NULL, NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "'plan_out' is NULL");
    CHECK(reshard_plan(NULL, NULL, NULL, NULL, &plan, NULL) == RESHARD_STATUS_NULL_ARGUMENT,
          "status without error_out");
    plan_fails("", NULL, NULL, NULL, RESHARD_STATUS_INVALID_ARGUMENT, "empty path");

    /* Missing source folder and strategy file. */
    snprintf(missing, sizeof missing, "%s/no_such_case/src", fixtures);
    plan_fails(missing, NULL, NULL, NULL, RESHARD_STATUS_SOURCE, "no_such_case/src");
    snprintf(strat, sizeof strat, "%s/complete_to_dp2mp2/no_such_strategy.ckpt", fixtures);
    plan_fails(src, NULL, strat, NULL, RESHARD_STATUS_IO, "no_such_strategy.ckpt");

    /* A checkpoint where a strategy belongs. */
    snprintf(ckpt, sizeof ckpt, "%s/complete_to_dp2mp2/src/rank_0/llama_tiny.ckpt", fixtures);
    plan_fails(src, NULL, ckpt, NULL, RESHARD_STATUS_MALFORMED, "llama_tiny.ckpt");

    /* The wrong strategy for the sources: an 8-rank pipeline strategy for 4 ranks. */
    snprintf(src, sizeof src, "%s/dp2mp2_to_complete/src", fixtures);
    snprintf(strat, sizeof strat, "%s/dp2mp2pp2_to_dp1mp2pp2/src_strategy.ckpt", fixtures);
    plan_fails(src, strat, NULL, NULL, RESHARD_STATUS_SOURCE, "rank folders are missing: rank_4..rank_7 (4 ranks)");
    /* A strategy of another layout whose tensor_shape contradicts the stored slices. */
    snprintf(strat, sizeof strat, "%s/json_dp2mp2pp2_opt_to_dp1mp4/dst_strategy.json", fixtures);
    plan_fails(src, strat, NULL, NULL, RESHARD_STATUS_SHAPE_MISMATCH, "tensor_shape");

    /* Options. */
    snprintf(src, sizeof src, "%s/complete_to_dp2mp2/src", fixtures);
    plan_fails(src, NULL, NULL, "{\"skip_crc\": 1}", RESHARD_STATUS_INVALID_OPTIONS, "\"skip_crc\" must be a boolean");
    plan_fails(src, NULL, NULL, "{\"prefix\": \"x\"}", RESHARD_STATUS_INVALID_OPTIONS, "unknown option \"prefix\"");
    st = reshard_plan(src, NULL, NULL, "{\"skip_crc\": true, \"src_ckpt_name\": null}", &plan, &err);
    CHECK(st == RESHARD_STATUS_OK && plan != NULL, "valid plan options: %d", st);
    reshard_error_free(err);
    reshard_plan_free(plan);
    plan = NULL;
    CHECK(plan == NULL, "plan still NULL after failures");

    /* Functions on NULL handles. */
    CHECK(reshard_plan_dst_rank_count(NULL) == 0, "count of NULL");
    CHECK(reshard_plan_to_json(NULL) == NULL, "json of NULL");
    CHECK(reshard_error_code(NULL) == RESHARD_STATUS_NULL_ARGUMENT, "code of NULL");
    CHECK(reshard_error_message(NULL) != NULL, "message of NULL");
    reshard_plan_free(NULL);
    reshard_error_free(NULL);
    reshard_string_free(NULL);
    passed++;
}

/* Makes reshard_auto's output folder scratch/<name> (into `out`) with the strategy files the
 * runtime leaves there for ranks 0..n-1: strategy/ckpt_strategy_rank_<r>.ckpt, each a copy of
 * complete_to_mp2's mp2 strategy. */
static void auto_output_with_strategies(char *out, const char *name, int n)
{
    char strat[PATH_LEN], from[PATH_LEN], to[PATH_LEN];
    fmt_path(out, "%s/%s", scratch, name);
    fmt_path(strat, "%s/strategy", out);
    mkdir(out, 0755);
    mkdir(strat, 0755);
    fmt_path(from, "%s/complete_to_mp2/dst_strategy.ckpt", fixtures);
    for (int r = 0; r < n; r++) {
        fmt_path(to, "%s/ckpt_strategy_rank_%d.ckpt", strat, r);
        CHECK(copy_file(from, to) == 0, "cannot copy %s", from);
    }
}

/* reshard_auto: the runtime left ckpt_strategy_rank_{0,1}.ckpt (mp2); each rank converts the
 * complete checkpoint for itself; the results equal MindSpore's transform. Then bad calls. */
static void test_auto(void)
{
    char out[PATH_LEN], opts[3 * PATH_LEN];
    auto_output_with_strategies(out, "auto_output", 2);
    for (uint32_t r = 0; r < 2; r++) {
        snprintf(opts, sizeof opts,
                 "{\"load_checkpoint\": \"%s/complete_to_mp2/src\", \"output_dir\": \"%s\", "
                 "\"rank\": %u, \"world_size\": 2, \"timeout\": 10, \"quiet\": true}",
                 fixtures, out, r);
        char *load = NULL;
        ReshardError *err = NULL;
        int32_t st = reshard_auto(opts, &load, &err);
        CHECK(st == 0, "reshard_auto rank %u: %s", r, err ? reshard_error_message(err) : "");
        reshard_error_free(err);
        char want[PATH_LEN + 96];
        snprintf(want, sizeof want, "%s/transformed_checkpoint/rank_%u/checkpoint_%u.ckpt", out, r, r);
        CHECK(load != NULL && strcmp(load, want) == 0, "load path %s, want %s", load ? load : "NULL", want);
        reshard_string_free(load);
        char tdir[PATH_LEN + 32];
        snprintf(tdir, sizeof tdir, "%s/transformed_checkpoint", out);
        check_rank_output("complete_to_mp2", tdir, r, "checkpoint_", "ckpt");
    }
    char *load = NULL;
    ReshardError *err = NULL;
    int32_t st = reshard_auto(NULL, &load, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "options_json");
    st = reshard_auto("{\"load_checkpoint\": \"x\", \"bogus\": 1}", &load, &err);
    check_error(st, &err, RESHARD_STATUS_INVALID_OPTIONS, "bogus");
    st = reshard_auto("{\"output_dir\": \"x\"}", &load, &err);
    check_error(st, &err, RESHARD_STATUS_INVALID_OPTIONS, "load_checkpoint");
    st = reshard_auto("{\"load_checkpoint\": \"/nonexistent/ckpt\", \"rank\": 0, \"world_size\": 1}", &load,
                      &err);
    check_error(st, &err, RESHARD_STATUS_SOURCE, "does not exist");
    st = reshard_auto("{\"load_checkpoint\": \"x\"}", NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "load_path_out");
    CHECK(load == NULL, "load_path_out written on failure");
}

struct auto_job {
    const char *opts;
    ReshardCancel *cancel;
    struct outcome out;
};

static void *run_auto(void *arg)
{
    struct auto_job *j = arg;
    char *load = NULL;
    ReshardError *err = NULL;
    int32_t st = reshard_auto_cancellable(j->opts, j->cancel, &load, &err);
    record(&j->out, st, err);
    reshard_string_free(load);
    return NULL;
}

/* reshard_auto_cancellable waiting for a strategy file that never comes (rank 1 of 2): another
 * thread's request ends the wait with CANCELLED (not the timeout's SOURCE), nothing written. */
static void test_auto_cancel(void)
{
    char out[PATH_LEN], opts[3 * PATH_LEN];
    auto_output_with_strategies(out, "auto_cancel", 1);
    snprintf(opts, sizeof opts,
             "{\"load_checkpoint\": \"%s/complete_to_mp2/src\", \"output_dir\": \"%s\", "
             "\"rank\": 0, \"world_size\": 2, \"timeout\": 30, \"quiet\": true}",
             fixtures, out);
    struct auto_job job = {opts, reshard_cancel_new(), {-1, ""}};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, run_auto, &job) == 0, "pthread_create");
    CHECK(reshard_cancel_request(job.cancel) == RESHARD_STATUS_OK, "reshard_cancel_request");
    pthread_join(t, NULL);
    CHECK(job.out.status == RESHARD_STATUS_CANCELLED, "reshard_auto_cancellable returned %d: %s", job.out.status,
          job.out.message);
    CHECK(strstr(job.out.message, "cancelled") != NULL, "message \"%s\"", job.out.message);
    char tdir[PATH_LEN + 32];
    snprintf(tdir, sizeof tdir, "%s/transformed_checkpoint/rank_0", out);
    CHECK(!exists(tdir), "a cancelled auto wrote %s", tdir);
    reshard_cancel_free(job.cancel);
}

/* reshard_strategy_new writes stage files and the merged file; bad requests are errors. */
static void test_strategy_new(void)
{
    char opts[3 * PATH_LEN], merged[PATH_LEN + 64];
    snprintf(opts, sizeof opts,
             "{\"from\": \"%s/complete_to_mp2/src\", \"dp\": 1, \"mp\": 2, \"out\": \"%s/new_strategy\"}",
             fixtures, scratch);
    ReshardError *err = NULL;
    int32_t st = reshard_strategy_new(opts, &err);
    CHECK(st == 0, "reshard_strategy_new: %s", err ? reshard_error_message(err) : "");
    reshard_error_free(err);
    snprintf(merged, sizeof merged, "%s/new_strategy/merged_ckpt_strategy.ckpt", scratch);
    CHECK(exists(merged), "%s missing", merged);
    err = NULL;
    st = reshard_strategy_new(NULL, &err);
    check_error(st, &err, RESHARD_STATUS_NULL_ARGUMENT, "options_json");
    snprintf(opts, sizeof opts, "{\"from\": \"%s/complete_to_mp2/src\", \"dp\": 1, \"mp\": 5, \"out\": \"%s/x\"}",
             fixtures, scratch);
    st = reshard_strategy_new(opts, &err);
    CHECK(st != 0 && err != NULL, "mp 5 accepted");
    reshard_error_free(err);
}

HARNESS_MAIN("", test_version, test_complete_to_dp2mp2, test_cancel, test_output_inside_source,
             test_dp2mp2_to_complete, test_pipeline_threads, test_safetensors, test_merge, test_unify,
             test_bad_plans, test_auto, test_auto_cancel, test_strategy_new)
