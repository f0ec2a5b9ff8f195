// Example: load one destination rank into a single preallocated arena (a runtime's weight pool,
// pinned staging memory, ...), each tensor at a 64-byte aligned offset, without writing any file.
//
//   load_arena SRC_CKPT_DIR SRC_STRATEGY|- DST_STRATEGY|- RANK
//
// The arena is sized by a first pass that skips every tensor (so only learns their sizes).
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "reshard.hpp"

struct ArenaTensor {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    size_t offset;  // in the arena
    size_t nbytes;
};

struct Arena {
    std::unique_ptr<std::byte[]> base;  // uninitialised: reshard writes every byte of each tensor
    size_t capacity = 0;
    size_t used = 0;
    std::vector<ArenaTensor> tensors;
};

inline Arena load_into_arena(const reshard::Plan &plan, uint32_t rank, const reshard::LoadOptions &options = {}) {
    constexpr size_t align = 64;
    Arena arena;
    // First pass: a callback that returns nullptr for every tensor only learns the sizes (no
    // data moves). Then one allocation for all of them.
    reshard::load_rank(
        plan, rank,
        [&](const reshard::TensorInfo &t) -> void * {
            arena.capacity += (t.nbytes + align - 1) / align * align;
            return nullptr;
        },
        options);
    arena.base.reset(new std::byte[arena.capacity]);
    reshard::load_rank(
        plan, rank,
        [&](const reshard::TensorInfo &t) -> void * {
            const size_t at = (arena.used + align - 1) / align * align;
            if (t.nbytes > arena.capacity - std::min(at, arena.capacity)) {
                throw std::length_error("arena full at tensor " + std::string(t.name));
            }
            arena.tensors.push_back({std::string(t.name), std::string(t.dtype), t.dims(), at, t.nbytes});
            arena.used = at + t.nbytes;
            return arena.base.get() + at;
        },
        options);
    return arena;
}

#ifndef RESHARD_EXAMPLE_NO_MAIN
#include "example_main.hpp"

int main(int argc, char **argv) {
    return run_example(argc, argv, [](const reshard::Plan &plan, uint32_t rank) {
        Arena arena = load_into_arena(plan, rank);
        for (const ArenaTensor &t : arena.tensors) {
            std::printf("%s %s at %zu, %zu bytes\n", t.name.c_str(), t.dtype.c_str(), t.offset, t.nbytes);
        }
        std::printf("%zu of %zu arena bytes used\n", arena.used, arena.capacity);
    });
}
#endif
