// C++ test of bindings/cpp/reshard.hpp through the CMake package (reshard::cpp), on the
// MindSpore-made fixtures: outputs byte for byte equal to MindSpore's, errors as reshard::Error.
//
// usage: test_reshard_cpp FIXTURES_CONFORMANCE_DIR SCRATCH_DIR
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "reshard.hpp"

namespace fs = std::filesystem;

static_assert(!std::is_copy_constructible_v<reshard::Plan>, "Plan must be move-only");
static_assert(!std::is_copy_assignable_v<reshard::Plan>, "Plan must be move-only");
static_assert(std::is_nothrow_move_constructible_v<reshard::Plan>, "Plan moves must not throw");
static_assert(std::is_nothrow_move_assignable_v<reshard::Plan>, "Plan moves must not throw");
static_assert(std::is_base_of_v<std::exception, reshard::Error>, "Error is an exception");

namespace {

int passed = 0;
int failed = 0;
fs::path fixtures;
fs::path scratch;

void check(bool ok, const std::string &what, int line) {
    if (ok) {
        ++passed;
    } else {
        ++failed;
        std::cerr << "FAIL line " << line << ": " << what << "\n";
    }
}
#define CHECK(cond, what) check((cond), std::string(#cond) + ": " + (what), __LINE__)

std::string slurp(const fs::path &p) {
    std::ifstream f(p, std::ios::binary);
    if (!f) {
        return "<missing " + p.string() + ">";
    }
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

bool same_bytes(const fs::path &a, const fs::path &b) {
    return fs::exists(a) && fs::exists(b) && slurp(a) == slurp(b);
}

void check_output(const std::string &case_name, const fs::path &dst, uint32_t r, const std::string &prefix = "checkpoint_",
                  const std::string &ext = "ckpt") {
    const std::string n = std::to_string(r);
    fs::path got = dst / ("rank_" + n) / (prefix + n + "." + ext);
    fs::path want = fixtures / case_name / "expected" / ("rank_" + n) / ("checkpoint_" + n + "." + ext);
    CHECK(same_bytes(got, want), got.string() + " differs from MindSpore's " + want.string());
}

std::string case_path(const std::string &c, const std::string &rel) { return (fixtures / c / rel).string(); }

// Runs f, which must throw reshard::Error with `code` and a message containing `needle`.
template <typename F> void expect_error(F &&f, int32_t code, const std::string &needle, int line) {
    try {
        f();
        check(false, "no exception, expected status " + std::to_string(code), line);
    } catch (const reshard::Error &e) {
        check(e.code() == code, "status " + std::to_string(e.code()) + " want " + std::to_string(code) + ": " + e.what(),
              line);
        check(std::string(e.what()).find(needle) != std::string::npos,
              std::string("message \"") + e.what() + "\" lacks \"" + needle + "\"", line);
    } catch (const std::exception &e) {
        check(false, std::string("unexpected exception: ") + e.what(), line);
    }
}
#define EXPECT_ERROR(expr, code, needle) expect_error([&] { (void)(expr); }, (code), (needle), __LINE__)

void test_version() {
    CHECK(reshard::abi_version() == RESHARD_ABI_VERSION, "abi version");
    CHECK(!reshard::version().empty(), "version");
}

void test_complete_to_dp2mp2() {
    const std::string c = "complete_to_dp2mp2";
    reshard::Plan plan = reshard::Plan::build(case_path(c, "src"), std::nullopt, case_path(c, "dst_strategy.ckpt"));
    CHECK(plan.dst_rank_count() == 4, "count");
    CHECK(plan.src_ranks(3) == std::vector<uint32_t>{0}, "src ranks of 3");
    const fs::path dst = scratch / "c2d";
    plan.execute(dst.string());
    for (uint32_t r = 0; r < 4; ++r) {
        check_output(c, dst, r);
    }
    // Again, some ranks, custom options: rewritten atomically, same bytes.
    reshard::ExecuteOptions o;
    o.prefix = "ckpt_";
    o.threads = 1;
    o.resume = false;
    o.sync = false;
    plan.execute(dst.string(), {2, 0}, o);
    check_output(c, dst, 2, "ckpt_");
    check_output(c, dst, 0, "ckpt_");

    const std::string json = plan.to_json();
    CHECK(json.find("\"dst_ranks\":4") != std::string::npos, json.substr(0, 200));

    // Progress through a lambda.
    uint64_t last = 0, total = 0;
    int calls = 0;
    plan.execute((scratch / "c2d_progress").string(), {1}, {}, [&](uint64_t d, uint64_t t) {
        ++calls;
        last = d;
        total = t;
    });
    CHECK(calls > 0 && last == total && total > 0, "progress calls " + std::to_string(calls));
    check_output(c, scratch / "c2d_progress", 1);

    // An exception from the callback comes back after the call; the output is still complete.
    bool rethrown = false;
    try {
        plan.execute((scratch / "c2d_throw").string(), {3}, {}, [](uint64_t, uint64_t) {
            throw std::runtime_error("stop from callback");
        });
    } catch (const std::runtime_error &e) {
        rethrown = std::string(e.what()) == "stop from callback";
    }
    CHECK(rethrown, "callback exception rethrown");
    check_output(c, scratch / "c2d_throw", 3);

    // Errors.
    EXPECT_ERROR(plan.src_ranks(4), RESHARD_STATUS_RANK_OUT_OF_RANGE, "4 destination rank");
    EXPECT_ERROR(plan.execute((scratch / "bad").string(), {99}), RESHARD_STATUS_RANK_OUT_OF_RANGE,
                 "destination rank 99 does not exist");
    EXPECT_ERROR(plan.execute((scratch / "bad").string(), {1, 1}), RESHARD_STATUS_INVALID_ARGUMENT,
                 "more than once");
    reshard::ExecuteOptions bad;
    bad.prefix = "../escape_";
    EXPECT_ERROR(plan.execute((scratch / "bad").string(), {}, bad), RESHARD_STATUS_INVALID_OPTIONS, "without '/'");
    bad = {};
    bad.output_format = "npz";
    EXPECT_ERROR(plan.execute((scratch / "bad").string(), {}, bad), RESHARD_STATUS_INVALID_OPTIONS, "npz");
    CHECK(!fs::exists(scratch / "bad"), "failed calls wrote outputs");

    // Busy: rank 0 is held open by a blocking progress callback in another thread.
    std::mutex mu;
    std::condition_variable cv;
    bool started = false, released = false;
    const fs::path busy = scratch / "c2d_busy";
    bool held_ok = false;
    std::thread holder([&] {
        try {
            plan.execute(busy.string(), {0}, {}, [&](uint64_t, uint64_t) {
                std::unique_lock<std::mutex> lock(mu);
                started = true;
                cv.notify_all();
                cv.wait(lock, [&] { return released; });
            });
            held_ok = true;
        } catch (const std::exception &e) {
            std::cerr << "held execute: " << e.what() << "\n";
            std::lock_guard<std::mutex> lock(mu);
            started = true; // do not leave the main thread waiting
            cv.notify_all();
        }
    });
    {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return started; });
    }
    EXPECT_ERROR(plan.execute(busy.string(), {0}), RESHARD_STATUS_BUSY, "being written");
    {
        std::lock_guard<std::mutex> lock(mu);
        released = true;
    }
    cv.notify_all();
    holder.join();
    CHECK(held_ok, "the held execute failed");
    check_output(c, busy, 0);
    plan.execute(busy.string(), {0}); // once the first call has returned, it may run again
    check_output(c, busy, 0);

    // Move-only: the moved-from plan is empty and throws, the new one works.
    reshard::Plan moved = std::move(plan);
    CHECK(!plan && static_cast<bool>(moved), "moved");
    CHECK(moved.dst_rank_count() == 4, "moved count");
    EXPECT_ERROR(plan.dst_rank_count(), RESHARD_STATUS_NULL_ARGUMENT, "moved from");
    EXPECT_ERROR(plan.execute((scratch / "bad").string()), RESHARD_STATUS_NULL_ARGUMENT, "'plan' is NULL");
    EXPECT_ERROR(plan.src_ranks(0), RESHARD_STATUS_NULL_ARGUMENT, "status 100");
    plan = std::move(moved);
    CHECK(plan.dst_rank_count() == 4, "moved back");
}

// A Cancel requested from the progress callback (that is, from a reshard worker thread while
// rank 1 is being written): the call throws CANCELLED and the rank's folder holds no output, no
// temporary file and no manifest; a new Cancel then lets the same call write it whole.
void test_cancel() {
    static_assert(!std::is_copy_constructible_v<reshard::Cancel>, "Cancel must be move-only");
    const std::string c = "complete_to_dp2mp2";
    auto plan = reshard::Plan::build(case_path(c, "src"), std::nullopt, case_path(c, "dst_strategy.ckpt"));
    const fs::path dst = scratch / "c2d_cancel";
    reshard::Cancel cancel;
    reshard::ExecuteOptions one_thread;
    one_thread.threads = 1;
    EXPECT_ERROR(plan.execute(dst.string(), {1}, one_thread, cancel, [&](uint64_t, uint64_t) { cancel.request(); }),
                 RESHARD_STATUS_CANCELLED, "checkpoint_1.ckpt");
    std::vector<std::string> left;
    for (const auto &e : fs::directory_iterator(dst / "rank_1")) {
        if (e.path().filename() != ".reshard_manifest.lock") {
            left.push_back(e.path().filename().string());
        }
    }
    CHECK(left.empty(), "a cancelled run left " + (left.empty() ? std::string() : left.front()));
    reshard::Cancel fresh;
    plan.execute(dst.string(), {1}, one_thread, fresh);
    check_output(c, dst, 1);
}

void test_dp2mp2_to_complete() {
    const std::string c = "dp2mp2_to_complete";
    auto plan = reshard::Plan::build(case_path(c, "src"), case_path(c, "src_strategy.ckpt"));
    CHECK(plan.dst_rank_count() == 1, "count");
    CHECK((plan.src_ranks(0) == std::vector<uint32_t>{1, 0}), "MindSpore's rank list [1, 0]");
    plan.execute((scratch / "d2c").string());
    check_output(c, scratch / "d2c", 0);
    // Positioned reads instead of maps, planned and executed: the same bytes.
    reshard::PlanOptions po;
    po.io = "pread";
    auto pplan = reshard::Plan::build(case_path(c, "src"), case_path(c, "src_strategy.ckpt"), std::nullopt, po);
    reshard::ExecuteOptions eo;
    eo.io = "pread";
    pplan.execute((scratch / "d2c-pread").string(), {}, eo);
    check_output(c, scratch / "d2c-pread", 0);
    eo.io = "paged";
    EXPECT_ERROR(pplan.execute((scratch / "d2c-bad").string(), {}, eo), RESHARD_STATUS_INVALID_OPTIONS, "paged");
}

void test_pipeline_threads() {
    const std::string c = "dp2mp2pp2_to_dp1mp2pp2";
    const auto plan = reshard::Plan::build(case_path(c, "src"), case_path(c, "src_strategy_stages"),
                                           case_path(c, "dst_strategy_stages"));
    CHECK(plan.dst_rank_count() == 4, "count");
    const fs::path dst = scratch / "pp";
    std::vector<std::thread> threads;
    std::atomic<int> errors{0};
    for (uint32_t r = 0; r < 4; ++r) {
        threads.emplace_back([&, r] {
            try {
                reshard::ExecuteOptions o;
                o.threads = 1;
                plan.execute(dst.string(), {r}, o);
            } catch (const std::exception &e) {
                std::cerr << "rank " << r << ": " << e.what() << "\n";
                ++errors;
            }
        });
    }
    for (auto &t : threads) {
        t.join();
    }
    CHECK(errors == 0, "thread errors");
    for (uint32_t r = 0; r < 4; ++r) {
        check_output(c, dst, r);
    }
}

void test_safetensors_and_merge() {
    const std::string c = "safetensors_dp2mp2_to_dp1mp4";
    auto plan = reshard::Plan::build(case_path(c, "src"), case_path(c, "src_strategy.ckpt"),
                                     case_path(c, "dst_strategy.ckpt"), reshard::PlanOptions{std::nullopt, true});
    reshard::ExecuteOptions o;
    o.output_format = "safetensors";
    plan.execute((scratch / "st").string(), {}, o);
    for (uint32_t r = 0; r < 4; ++r) {
        check_output(c, scratch / "st", r, "checkpoint_", "safetensors");
    }

    const std::string p = "dp2mp2pp2_to_dp1mp2pp2";
    const fs::path merged = scratch / "merged" / "src_strategy.ckpt";
    reshard::merge_strategies(case_path(p, "src_strategy_stages"), merged.string());
    CHECK(same_bytes(merged, case_path(p, "src_strategy.ckpt")), "merged strategy differs from MindSpore's");
    EXPECT_ERROR(reshard::merge_strategies((scratch / "nope").string(), merged.string()), RESHARD_STATUS_IO, "nope");
}

void test_bad_builds() {
    EXPECT_ERROR(reshard::Plan::build((fixtures / "no_such_case" / "src").string()), RESHARD_STATUS_SOURCE,
                 "no_such_case");
    EXPECT_ERROR(reshard::Plan::build(case_path("complete_to_dp2mp2", "src"), std::nullopt,
                                      case_path("complete_to_dp2mp2", "missing.ckpt")),
                 RESHARD_STATUS_IO, "missing.ckpt");
    EXPECT_ERROR(reshard::Plan::build(case_path("dp2mp2_to_complete", "src"),
                                      case_path("dp2mp2pp2_to_dp1mp2pp2", "src_strategy.ckpt")),
                 RESHARD_STATUS_SOURCE, "rank folders are missing");
    EXPECT_ERROR(reshard::Plan::build(""), RESHARD_STATUS_INVALID_ARGUMENT, "empty path");
    // Many failures in a row: under LeakSanitizer any leaked error object would show.
    for (int i = 0; i < 50; ++i) {
        try {
            (void)reshard::Plan::build((scratch / "missing").string());
        } catch (const reshard::Error &) {
        }
    }
    ++passed;
}

} // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " FIXTURES_CONFORMANCE_DIR SCRATCH_DIR\n";
        return 2;
    }
    fixtures = argv[1];
    scratch = argv[2];
    fs::remove_all(scratch);
    fs::create_directories(scratch);
    try {
        test_version();
        test_complete_to_dp2mp2();
        test_cancel();
        test_dp2mp2_to_complete();
        test_pipeline_threads();
        test_safetensors_and_merge();
        test_bad_builds();
    } catch (const std::exception &e) {
        ++failed;
        std::cerr << "FAIL: uncaught exception: " << e.what() << "\n";
    }
    std::cout << passed << " passed, " << failed << " failed\n";
    return failed == 0 ? 0 : 1;
}
