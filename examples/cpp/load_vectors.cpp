// Example: load one destination rank of a transform into memory, one std::vector<std::byte> per
// tensor, without writing any file.
//
//   load_vectors SRC_CKPT_DIR SRC_STRATEGY|- DST_STRATEGY|- RANK
//
// prints each tensor's name, dtype, shape and size. ("-" = complete weights.)
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "reshard.hpp"

struct LoadedTensor {
    std::string name;
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> data;
};

// The rank's tensors in the order of its .ckpt file. A vector's heap buffer stays where it is
// when the vector itself is moved (out grows), so the pointers handed to reshard stay valid.
inline std::vector<LoadedTensor> load_into_vectors(const reshard::Plan &plan, uint32_t rank,
                                                   const reshard::LoadOptions &options = {}) {
    std::vector<LoadedTensor> out;
    static std::byte empty[1];
    reshard::load_rank(
        plan, rank,
        [&](const reshard::TensorInfo &t) -> void * {
            out.push_back({std::string(t.name), std::string(t.dtype), t.dims(), std::vector<std::byte>(t.nbytes)});
            return t.nbytes ? out.back().data.data() : empty;  // nullptr would skip the tensor
        },
        options);
    return out;
}

#ifndef RESHARD_EXAMPLE_NO_MAIN
#include "example_main.hpp"

int main(int argc, char **argv) {
    return run_example(argc, argv, [](const reshard::Plan &plan, uint32_t rank) {
        for (const LoadedTensor &t : load_into_vectors(plan, rank)) {
            std::string shape;
            for (int64_t d : t.shape) {
                shape += (shape.empty() ? "" : ", ") + std::to_string(d);
            }
            std::printf("%s %s [%s] %zu bytes\n", t.name.c_str(), t.dtype.c_str(), shape.c_str(), t.data.size());
        }
    });
}
#endif
