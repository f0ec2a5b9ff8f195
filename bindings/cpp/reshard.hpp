// reshard.hpp: header-only C++17 wrapper over the C API in reshard.h.
//
// - reshard::Plan is a move-only RAII handle (a unique_ptr with reshard_plan_free as deleter);
//   a moved-from Plan is empty and its methods throw reshard::Error with code
//   RESHARD_STATUS_NULL_ARGUMENT rather than crashing.
// - Every failure throws reshard::Error, carrying the status code and reshard's full message;
//   C error objects and strings are freed on every path, including when an exception is thrown.
// - A Plan may be used from several threads at once (const methods only; execute of disjoint
//   ranks in parallel is supported by the library).
//
//   reshard::Plan plan = reshard::Plan::build("src", "src_strategy.ckpt", "dst_strategy.ckpt");
//   plan.execute("dst");                       // all ranks
//   plan.execute("dst", {0, 1}, {"ckpt_", "safetensors"});
//   // One rank straight into memory (no files): the lambda returns each tensor's buffer.
//   std::map<std::string, std::vector<std::byte>> weights;
//   reshard::load_rank(plan, 3, [&](const reshard::TensorInfo &t) -> void * {
//       auto &buf = weights[std::string(t.name)];
//       buf.resize(t.nbytes);
//       return buf.data();        // or nullptr to skip the tensor
//   });
#ifndef RESHARD_HPP
#define RESHARD_HPP

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "reshard.h"

namespace reshard {

/// A failed reshard call: the RESHARD_STATUS_* code and reshard's message (file, rank, parameter).
class Error : public std::runtime_error {
public:
    Error(int32_t code, const std::string &message) : std::runtime_error(message), code_(code) {}

    /// The RESHARD_STATUS_* code.
    [[nodiscard]] int32_t code() const noexcept { return code_; }

private:
    int32_t code_;
};

namespace detail {

struct ErrorDeleter {
    void operator()(ReshardError *e) const noexcept { reshard_error_free(e); }
};
struct PlanDeleter {
    void operator()(ReshardPlan *p) const noexcept { reshard_plan_free(p); }
};
struct StringDeleter {
    void operator()(char *s) const noexcept { reshard_string_free(s); }
};
struct CancelDeleter {
    void operator()(ReshardCancel *c) const noexcept { reshard_cancel_free(c); }
};

/// Throws for a non-zero status, taking ownership of `err` (freed whatever happens).
inline void check(int32_t status, ReshardError *err) {
    std::unique_ptr<ReshardError, ErrorDeleter> owned(err);
    if (status == RESHARD_STATUS_OK) {
        return;
    }
    std::string message = owned ? reshard_error_message(owned.get())
                                : "reshard: call failed with status " + std::to_string(status);
    throw Error(status, message);
}

/// A JSON string literal.
inline std::string quote(const std::string &s) {
    static const char hex[] = "0123456789abcdef";
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\t': out += "\\t"; break;
        case '\r': out += "\\r"; break;
        default:
            if (c < 0x20) {
                out += "\\u00";
                out += hex[c >> 4];
                out += hex[c & 15];
            } else {
                out += static_cast<char>(c);
            }
        }
    }
    return out + "\"";
}

inline const char *c_str_or_null(const std::optional<std::string> &s) {
    return s ? s->c_str() : nullptr;
}

} // namespace detail

/// Options of Plan::build (the options_json of reshard_plan).
struct PlanOptions {
    /// The file to use in each rank folder when it holds several ("{rank}" = the rank number).
    std::optional<std::string> src_ckpt_name;
    /// Do not verify crc trailers of the sources.
    bool skip_crc = false;
    /// How sources are read while indexing: "mmap", "pread" or "auto" (pread on network filesystems).
    std::string io = "auto";

    [[nodiscard]] std::string to_json() const {
        std::string j = "{\"skip_crc\": ";
        j += skip_crc ? "true" : "false";
        j += ", \"io\": " + detail::quote(io);
        if (src_ckpt_name) {
            j += ", \"src_ckpt_name\": " + detail::quote(*src_ckpt_name);
        }
        return j + "}";
    }
};

/// Options of Plan::execute (the options_json of reshard_execute).
struct ExecuteOptions {
    /// Outputs are rank_{r}/{prefix}{r}.{ckpt|safetensors}.
    std::string prefix = "checkpoint_";
    /// "ckpt" or "safetensors".
    std::string output_format = "ckpt";
    /// Worker threads; 0 = all cores.
    unsigned threads = 0;
    /// Append MindSpore's crc32 trailer.
    bool crc = false;
    /// Keep outputs this plan already wrote and that still verify (false: always rewrite).
    bool resume = true;
    /// fsync each output before renaming it into place.
    bool sync = true;
    /// How sources are read: "mmap", "pread" (no maps: no SIGBUS if a source is truncated, no page
    /// faults on network filesystems) or "auto" (pread on network filesystems, mmap elsewhere).
    std::string io = "auto";

    [[nodiscard]] std::string to_json() const {
        auto flag = [](bool b) { return b ? "true" : "false"; };
        return "{\"prefix\": " + detail::quote(prefix) + ", \"output_format\": " + detail::quote(output_format) +
               ", \"threads\": " + std::to_string(threads) + ", \"crc\": " + flag(crc) +
               ", \"resume\": " + flag(resume) + ", \"sync\": " + flag(sync) + ", \"io\": " + detail::quote(io) +
               "}";
    }
};

/// Progress: (bytes written so far, total bytes). Called from worker threads, one call at a time.
using Progress = std::function<void(uint64_t done, uint64_t total)>;

/// A request to stop a Plan::execute from another thread (see reshard_cancel_request). Move-only;
/// it must outlive the calls given it. Once requested it stays requested.
///
///   reshard::Cancel cancel;
///   std::thread worker([&] { plan.execute("dst", {}, {}, cancel); });   // throws on a stop
///   cancel.request();                                                   // from any thread
class Cancel {
public:
    Cancel() : ptr_(reshard_cancel_new()) {
        if (!ptr_) {
            throw std::bad_alloc();
        }
    }

    /// Asks every execute given this handle to stop: it throws reshard::Error with code
    /// RESHARD_STATUS_CANCELLED, leaving no partial output. Safe from any thread.
    void request() const noexcept { reshard_cancel_request(ptr_.get()); }

    /// The C handle (still owned by this Cancel; NULL when moved from).
    [[nodiscard]] const ReshardCancel *get() const noexcept { return ptr_.get(); }

private:
    std::unique_ptr<ReshardCancel, detail::CancelDeleter> ptr_;
};

/// A compiled transform (see reshard_plan). Move-only; freed by the destructor.
class Plan {
public:
    /// Builds a plan. Strategies are files or folders of stage files; std::nullopt = complete.
    [[nodiscard]] static Plan build(const std::string &src_ckpt_dir,
                                    const std::optional<std::string> &src_strategy = std::nullopt,
                                    const std::optional<std::string> &dst_strategy = std::nullopt,
                                    const PlanOptions &options = {}) {
        ReshardPlan *raw = nullptr;
        ReshardError *err = nullptr;
        const std::string json = options.to_json();
        int32_t status = reshard_plan(src_ckpt_dir.c_str(), detail::c_str_or_null(src_strategy),
                                      detail::c_str_or_null(dst_strategy), json.c_str(), &raw, &err);
        Plan plan(raw); // owns raw (NULL on failure) before anything can throw
        detail::check(status, err);
        return plan;
    }

    Plan(Plan &&) noexcept = default;
    Plan &operator=(Plan &&) noexcept = default;
    Plan(const Plan &) = delete;
    Plan &operator=(const Plan &) = delete;
    ~Plan() = default;

    /// Number of destination ranks.
    [[nodiscard]] uint32_t dst_rank_count() const {
        require();
        return reshard_plan_dst_rank_count(ptr_.get());
    }

    /// Source ranks that destination rank `dst_rank` reads, highest first.
    [[nodiscard]] std::vector<uint32_t> src_ranks(uint32_t dst_rank) const {
        std::vector<uint32_t> out;
        size_t len = 0;
        int32_t status = reshard_plan_src_ranks(ptr_.get(), dst_rank, nullptr, 0, &len);
        while (status == RESHARD_STATUS_BUFFER_TOO_SMALL) {
            out.resize(len);
            status = reshard_plan_src_ranks(ptr_.get(), dst_rank, out.data(), out.size(), &len);
        }
        if (status != RESHARD_STATUS_OK) {
            throw Error(status, "reshard_plan_src_ranks(" + std::to_string(dst_rank) +
                                    ") failed with status " + std::to_string(status) +
                                    (status == RESHARD_STATUS_RANK_OUT_OF_RANGE
                                         ? ": the plan has " + std::to_string(reshard_plan_dst_rank_count(ptr_.get())) +
                                               " destination rank(s)"
                                         : std::string()));
        }
        out.resize(len);
        return out;
    }

    /// The JSON summary of reshard_plan_to_json.
    [[nodiscard]] std::string to_json() const {
        require();
        std::unique_ptr<char, detail::StringDeleter> s(reshard_plan_to_json(ptr_.get()));
        if (!s) {
            throw Error(RESHARD_STATUS_PANIC, "reshard_plan_to_json failed");
        }
        return std::string(s.get());
    }

    /// Writes the given destination ranks (all when empty) into `dst_ckpt_dir`.
    void execute(const std::string &dst_ckpt_dir, const std::vector<uint32_t> &ranks = {},
                 const ExecuteOptions &options = {}) const {
        ReshardError *err = nullptr;
        const std::string json = options.to_json();
        int32_t status = reshard_execute(ptr_.get(), dst_ckpt_dir.c_str(), ranks.empty() ? nullptr : ranks.data(),
                                         ranks.size(), json.c_str(), &err);
        detail::check(status, err);
    }

    /// As execute, reporting progress. An exception thrown by `progress` stops further
    /// reports and is rethrown once the library call has returned (the call itself completes;
    /// use the overload with a Cancel to stop it).
    void execute(const std::string &dst_ckpt_dir, const std::vector<uint32_t> &ranks, const ExecuteOptions &options,
                 Progress progress) const {
        run(dst_ckpt_dir, ranks, options, std::move(progress), nullptr, false);
    }

    /// As execute, stopped when `cancel.request()` is called (from another thread, or from
    /// `progress`): then throws reshard::Error with code RESHARD_STATUS_CANCELLED. The output
    /// being written is removed; outputs of ranks finished before stay, complete.
    void execute(const std::string &dst_ckpt_dir, const std::vector<uint32_t> &ranks, const ExecuteOptions &options,
                 const Cancel &cancel, Progress progress = nullptr) const {
        run(dst_ckpt_dir, ranks, options, std::move(progress), cancel.get(), true);
    }

    /// The C handle, for calling the C API directly (still owned by this Plan).
    [[nodiscard]] const ReshardPlan *get() const noexcept { return ptr_.get(); }

    /// False for a moved-from Plan.
    explicit operator bool() const noexcept { return static_cast<bool>(ptr_); }

private:
    explicit Plan(ReshardPlan *raw) noexcept : ptr_(raw) {}

    void run(const std::string &dst_ckpt_dir, const std::vector<uint32_t> &ranks, const ExecuteOptions &options,
             Progress progress, const ReshardCancel *cancel, bool cancellable) const {
        struct Context {
            Progress fn;
            std::exception_ptr failure;
        } ctx{std::move(progress), nullptr};
        auto trampoline = [](uint64_t done, uint64_t total, void *user) noexcept {
            auto *c = static_cast<Context *>(user);
            if (c->failure || !c->fn) {
                return;
            }
            try {
                c->fn(done, total);
            } catch (...) {
                c->failure = std::current_exception();
            }
        };
        ReshardError *err = nullptr;
        const std::string json = options.to_json();
        const uint32_t *rank_ptr = ranks.empty() ? nullptr : ranks.data();
        int32_t status = cancellable ? reshard_execute_cancellable(ptr_.get(), dst_ckpt_dir.c_str(), rank_ptr,
                                                                   ranks.size(), json.c_str(), trampoline, &ctx,
                                                                   cancel, &err)
                                     : reshard_execute_with_progress(ptr_.get(), dst_ckpt_dir.c_str(), rank_ptr,
                                                                     ranks.size(), json.c_str(), trampoline, &ctx,
                                                                     &err);
        detail::check(status, err);
        if (ctx.failure) {
            std::rethrow_exception(ctx.failure);
        }
    }

    void require() const {
        if (!ptr_) {
            throw Error(RESHARD_STATUS_NULL_ARGUMENT, "reshard::Plan is empty (moved from)");
        }
    }

    std::unique_ptr<ReshardPlan, detail::PlanDeleter> ptr_;
};

/// A tensor of the rank being loaded, as reshard_load_rank announces it. Valid only during the
/// allocation callback (copy what you keep).
struct TensorInfo {
    /// Parameter name.
    std::string_view name;
    /// MindSpore tensor_type name: "Float32", "BFloat16", "Int32", ...
    std::string_view dtype;
    /// The rank's shape (`ndim` values), as in the .ckpt file reshard_execute would write (a 0-d
    /// scalar has ndim 0, or ndim 1 and shape[0] == 0 where its source stored dims [0]).
    const int64_t *shape;
    uint32_t ndim;
    /// Bytes the buffer must hold.
    uint64_t nbytes;
    /// The shape as a vector.
    [[nodiscard]] std::vector<int64_t> dims() const { return std::vector<int64_t>(shape, shape + ndim); }
};

/// Options of load_rank (the options_json of reshard_load_rank).
struct LoadOptions {
    /// Worker threads; 0 = all cores.
    unsigned threads = 0;
    /// Load only these parameters (all when empty); a name the rank lacks throws.
    std::vector<std::string> names;
    /// "mmap", "pread" or "auto" (the library's default when empty).
    std::string io;
    [[nodiscard]] std::string to_json() const {
        std::string j = "{\"threads\": " + std::to_string(threads);
        if (!names.empty()) {
            j += ", \"names\": [";
            for (size_t i = 0; i < names.size(); i++) {
                j += (i ? ", " : "") + detail::quote(names[i]);
            }
            j += "]";
        }
        if (!io.empty()) {
            j += ", \"io\": " + detail::quote(io);
        }
        return j + "}";
    }
};

/// Loads destination rank `rank` of `plan` into memory the caller allocates (see
/// reshard_load_rank): `alloc(const TensorInfo &) -> void *` is called on this thread once per
/// tensor, in the order of the rank's .ckpt file, before any data moves, and returns a buffer of
/// at least `nbytes` bytes (any alignment; buffers must not overlap) or nullptr to skip the
/// tensor. Returns once every buffer holds exactly the bytes reshard_execute writes for its
/// tensor; throws reshard::Error on failure (buffer contents are then unspecified). An
/// exception thrown by `alloc` skips the remaining tensors and is rethrown once the library call
/// has returned.
template <class Alloc>
void load_rank(const Plan &plan, uint32_t rank, Alloc &&alloc, const LoadOptions &options = {}) {
    if (!plan) {
        throw Error(RESHARD_STATUS_NULL_ARGUMENT, "reshard::Plan is empty (moved from)");
    }
    struct Context {
        Alloc &fn;
        std::exception_ptr failure;
    } ctx{alloc, nullptr};
    auto trampoline = [](void *user, const ReshardTensorInfo *info) noexcept -> void * {
        auto *c = static_cast<Context *>(user);
        if (c->failure) {
            return nullptr;
        }
        try {
            const TensorInfo t{info->name, info->dtype, info->shape, info->ndim, info->nbytes};
            return c->fn(t);
        } catch (...) {
            c->failure = std::current_exception();
            return nullptr;
        }
    };
    ReshardError *err = nullptr;
    const std::string json = options.to_json();
    int32_t status = reshard_load_rank(plan.get(), rank, trampoline, &ctx, json.c_str(), &err);
    if (ctx.failure) {
        reshard_error_free(err);
        std::rethrow_exception(ctx.failure);
    }
    detail::check(status, err);
}

/// MindSpore's merge_pipeline_strategys: merges the stage files in `src_dir` into `dst_file`.
inline void merge_strategies(const std::string &src_dir, const std::string &dst_file) {
    ReshardError *err = nullptr;
    int32_t status = reshard_merge_strategies(src_dir.c_str(), dst_file.c_str(), &err);
    detail::check(status, err);
}

/// The library version, e.g. "0.1.0".
[[nodiscard]] inline std::string version() { return reshard_version(); }

/// The ABI version of the loaded library; equals RESHARD_ABI_VERSION when header and library match.
[[nodiscard]] inline uint32_t abi_version() noexcept { return reshard_abi_version(); }

} // namespace reshard

#endif // RESHARD_HPP
