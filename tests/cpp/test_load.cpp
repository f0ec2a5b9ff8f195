// C++ test of reshard::load_rank through the two examples (examples/cpp/load_vectors.cpp: one
// std::vector<std::byte> per tensor; examples/cpp/load_arena.cpp: one preallocated arena):
// every conformance fixture and every rank, with mmap and pread, must hold the tensors (names,
// order, dtypes, shapes, bytes) of the file MindSpore wrote for that rank. Also: a rank out of
// range throws reshard::Error with RESHARD_STATUS_RANK_OUT_OF_RANGE, an exception thrown by the
// allocation lambda comes back out of load_rank, names and nullptr skips.
//
// usage: test_load FIXTURES_CONFORMANCE_DIR
#define RESHARD_EXAMPLE_NO_MAIN
#include "../../examples/cpp/load_arena.cpp"
#include "../../examples/cpp/load_vectors.cpp"

#include <cstring>
#include <dirent.h>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>

namespace {

int passed = 0;
int failed = 0;

void check(bool ok, const std::string &what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        std::cerr << "FAIL: " << what << "\n";
    }
}

std::string read_file(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
}

struct FileTensor {
    std::string dtype;  // empty for safetensors (another naming)
    std::vector<int64_t> shape;
    std::string bytes;
};

// name -> tensor, and the names in file order.
struct FileTensors {
    std::map<std::string, FileTensor> by_name;
    std::vector<std::string> order;
};

bool varint(const std::string &b, size_t &i, size_t end, uint64_t &v) {
    v = 0;
    for (int shift = 0; shift < 64 && i < end; shift += 7) {
        auto c = static_cast<unsigned char>(b[i++]);
        v |= uint64_t(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            return true;
        }
    }
    return false;
}

// Calls f(field, wire type, varint value, byte offset, length) for each field of b[i, end).
template <class F>
bool fields(const std::string &b, size_t i, size_t end, F &&f) {
    while (i < end) {
        uint64_t key, v;
        if (!varint(b, i, end, key)) {
            return false;
        }
        if ((key & 7) == 0) {
            if (!varint(b, i, end, v)) {
                return false;
            }
            f(key >> 3, 0, v, size_t(0), size_t(0));
        } else if ((key & 7) == 2) {
            if (!varint(b, i, end, v) || v > end - i) {
                return false;
            }
            f(key >> 3, 2, v, i, size_t(v));
            i += v;
        } else {
            return true;  // the crc_num trailer
        }
    }
    return true;
}

FileTensors read_ckpt(const std::string &path) {
    const std::string b = read_file(path);
    FileTensors out;
    fields(b, 0, b.size(), [&](uint64_t num, int, uint64_t, size_t at, size_t len) {
        if (num != 1) {
            return;
        }
        std::string tag;
        FileTensor t;
        fields(b, at, at + len, [&](uint64_t n2, int, uint64_t, size_t a2, size_t l2) {
            if (n2 == 1) {
                tag = b.substr(a2, l2);
            } else if (n2 == 2) {
                fields(b, a2, a2 + l2, [&](uint64_t n3, int w3, uint64_t v3, size_t a3, size_t l3) {
                    if (n3 == 1 && w3 == 0) {
                        t.shape.push_back(int64_t(v3));
                    } else if (n3 == 1) {
                        for (size_t j = a3; j < a3 + l3;) {
                            uint64_t d;
                            if (!varint(b, j, a3 + l3, d)) {
                                break;
                            }
                            t.shape.push_back(int64_t(d));
                        }
                    } else if (n3 == 2) {
                        t.dtype = b.substr(a3, l3);
                    } else if (n3 == 3) {
                        t.bytes = b.substr(a3, l3);
                    }
                });
            }
        });
        auto it = out.by_name.find(tag);
        if (it != out.by_name.end() && out.order.back() == tag) {
            it->second.bytes += t.bytes;  // the next chunk of a cut tensor
        } else {
            out.order.push_back(tag);
            out.by_name[tag] = t;
        }
    });
    return out;
}

// A safetensors file: the header is compact JSON written by the safetensors library.
FileTensors read_safetensors(const std::string &path) {
    const std::string b = read_file(path);
    FileTensors out;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) {
        n = n << 8 | static_cast<unsigned char>(b[size_t(i)]);
    }
    const std::string h = b.substr(8, n);
    const std::string body = b.substr(8 + n);
    for (size_t at = h.find("\":{\""); at != std::string::npos; at = h.find("\":{\"", at + 1)) {
        const size_t start = h.rfind('"', at - 1) + 1;
        const std::string name = h.substr(start, at - start);
        const size_t close = h.find('}', at);
        if (name == "__metadata__") {
            continue;
        }
        FileTensor t;
        std::istringstream shape(h.substr(h.find("\"shape\":[", at) + 9));
        for (int64_t d; shape.peek() != ']' && shape >> d;) {
            t.shape.push_back(d);
            if (shape.peek() == ',') {
                shape.get();
            }
        }
        std::istringstream offs(h.substr(h.find("\"data_offsets\":[", at) + 16, close));
        uint64_t a = 0, e = 0;
        char comma;
        offs >> a >> comma >> e;
        t.bytes = body.substr(a, e - a);
        out.order.push_back(name);
        out.by_name[name] = t;
    }
    return out;
}

std::string only_file(const std::string &dir) {
    std::string found;
    if (DIR *d = opendir(dir.c_str())) {
        while (dirent *e = readdir(d)) {
            std::string n = e->d_name;
            if (n.size() > 5 && (n.substr(n.size() - 5) == ".ckpt" || n.find(".safetensors") != std::string::npos)) {
                found = dir + "/" + n;
            }
        }
        closedir(d);
    }
    return found;
}

std::string case_string(const std::string &json, const std::string &key) {
    const size_t at = json.find("\"" + key + "\": \"");
    if (at == std::string::npos) {
        return "";
    }
    const size_t s = at + key.size() + 5;
    return json.substr(s, json.find('"', s) - s);
}

bool same_shape(const std::vector<int64_t> &file, const std::vector<int64_t> &loaded) {
    // safetensors keeps a 0-d scalar as [], .ckpt (and so the load) as [0].
    return file == loaded || (file.empty() && loaded == std::vector<int64_t>{0});
}

// The case whose outputs differ from MindSpore's as the README documents: reshard's complete
// optimizer states where MindSpore writes the source rank's slice.
const std::string deviating_case = "dp2mp2pp2_to_mp2";

struct Loaded {
    std::string name, dtype;
    std::vector<int64_t> shape;
    const std::byte *data;
    size_t nbytes;
};

void compare(const std::string &what, const std::string &case_name, const reshard::Plan &plan, uint32_t rank,
             const std::string &file, const std::vector<Loaded> &got, const std::string &scratch) {
    const bool st = file.find(".safetensors") != std::string::npos;
    FileTensors want = st ? read_safetensors(file) : read_ckpt(file);
    check(got.size() == want.order.size(), what + ": " + std::to_string(got.size()) + " tensors, " + file +
                                               " has " + std::to_string(want.order.size()));
    std::optional<FileTensors> executed;
    for (size_t i = 0; i < got.size(); i++) {
        const Loaded &g = got[i];
        auto it = want.by_name.find(g.name);
        if (it == want.by_name.end()) {
            check(false, what + ": '" + g.name + "' is not in " + file);
            continue;
        }
        const FileTensor &w = it->second;
        if (!st) {
            check(i < want.order.size() && want.order[i] == g.name, what + ": '" + g.name + "' out of order");
        }
        const std::string bytes(reinterpret_cast<const char *>(g.data), g.nbytes);
        bool same = (st || w.dtype == g.dtype) && same_shape(w.shape, g.shape) && w.bytes == bytes;
        if (!same && case_name == deviating_case && !same_shape(w.shape, g.shape)) {
            if (!executed) {
                const std::string dst = scratch + "/" + case_name + "-" + std::to_string(rank);
                reshard::ExecuteOptions o;
                o.sync = false;
                plan.execute(dst, {rank}, o);
                executed = read_ckpt(only_file(dst + "/rank_" + std::to_string(rank)));
            }
            const FileTensor &e = executed->by_name[g.name];
            same = same_shape(e.shape, g.shape) && e.bytes == bytes;
        }
        check(same, what + ": '" + g.name + "' differs from " + file);
    }
}

void test_every_fixture_and_rank(const std::string &fixtures, const std::string &scratch) {
    std::vector<std::string> cases;
    if (DIR *d = opendir(fixtures.c_str())) {
        while (dirent *e = readdir(d)) {
            if (e->d_name[0] != '.' && !read_file(fixtures + "/" + e->d_name + "/case.json").empty()) {
                cases.push_back(e->d_name);
            }
        }
        closedir(d);
    }
    check(cases.size() >= 23, "only " + std::to_string(cases.size()) + " cases");
    for (const std::string &c : cases) {
        const std::string base = fixtures + "/" + c;
        const std::string spec = read_file(base + "/case.json");
        auto strategy = [&](const std::string &key) -> std::optional<std::string> {
            std::string v = case_string(spec, key);
            return v.empty() ? std::nullopt : std::optional<std::string>(base + "/" + v);
        };
        reshard::Plan plan = reshard::Plan::build(base + "/src", strategy("src_strategy"), strategy("dst_strategy"));
        for (uint32_t r = 0; r < plan.dst_rank_count(); r++) {
            const std::string file = only_file(base + "/expected/rank_" + std::to_string(r));
            for (const char *io : {"mmap", "pread"}) {
                reshard::LoadOptions o;
                o.io = io;
                o.threads = r % 2;
                const std::string what = c + " rank " + std::to_string(r) + " (" + io + ")";
                std::vector<LoadedTensor> vectors = load_into_vectors(plan, r, o);
                std::vector<Loaded> got;
                for (const LoadedTensor &t : vectors) {
                    got.push_back({t.name, t.dtype, t.shape, t.data.data(), t.data.size()});
                }
                compare(what + " vectors", c, plan, r, file, got, scratch);
                Arena arena = load_into_arena(plan, r, o);
                got.clear();
                for (const ArenaTensor &t : arena.tensors) {
                    check(t.offset % 64 == 0, what + ": arena offset " + std::to_string(t.offset));
                    got.push_back({t.name, t.dtype, t.shape, arena.base.get() + t.offset, t.nbytes});
                }
                compare(what + " arena", c, plan, r, file, got, scratch);
            }
        }
    }
}

void test_errors_skips_and_names(const std::string &fixtures) {
    const std::string base = fixtures + "/complete_to_dp2mp2";
    reshard::Plan plan = reshard::Plan::build(base + "/src", std::nullopt, base + "/dst_strategy.ckpt");
    int calls = 0;
    try {
        reshard::load_rank(plan, 4, [&](const reshard::TensorInfo &) -> void * { return ++calls, nullptr; });
        check(false, "rank 4 of 4 loaded");
    } catch (const reshard::Error &e) {
        check(e.code() == RESHARD_STATUS_RANK_OUT_OF_RANGE && calls == 0, std::string("rank 4: ") + e.what());
    }
    // An exception from the lambda comes back out; the tensors after it are skipped.
    try {
        reshard::load_rank(plan, 1, [&](const reshard::TensorInfo &t) -> void * {
            calls++;
            throw std::runtime_error("no memory for " + std::string(t.name));
        });
        check(false, "the lambda's exception was lost");
    } catch (const std::runtime_error &e) {
        check(std::string(e.what()).find("no memory for model.") == 0 && calls == 1, e.what());
    }
    // nullptr skips: every other tensor.
    std::vector<LoadedTensor> all = load_into_vectors(plan, 1);
    std::vector<std::vector<std::byte>> kept;
    size_t i = 0;
    reshard::load_rank(plan, 1, [&](const reshard::TensorInfo &t) -> void * {
        if (i++ % 2) {
            return nullptr;
        }
        kept.emplace_back(t.nbytes);
        return kept.back().data();
    });
    check(i == all.size() && kept.size() == (all.size() + 1) / 2, "skip: offered " + std::to_string(i));
    for (size_t k = 0; k < kept.size(); k++) {
        check(kept[k] == all[2 * k].data, "skip: tensor " + std::to_string(2 * k) + " differs");
    }
    reshard::LoadOptions o;
    o.names = {all[2].name};
    std::vector<LoadedTensor> one = load_into_vectors(plan, 1, o);
    check(one.size() == 1 && one[0].name == all[2].name && one[0].data == all[2].data, "names");
    o.names = {"no_such_param"};
    try {
        (void)load_into_vectors(plan, 1, o);
        check(false, "unknown name loaded");
    } catch (const reshard::Error &e) {
        check(e.code() == RESHARD_STATUS_INVALID_ARGUMENT && std::strstr(e.what(), "no_such_param"), e.what());
    }
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " FIXTURES_CONFORMANCE_DIR SCRATCH_DIR\n";
        return 2;
    }
    try {
        test_every_fixture_and_rank(argv[1], argv[2]);
        test_errors_skips_and_names(argv[1]);
    } catch (const std::exception &e) {
        check(false, std::string("unexpected exception: ") + e.what());
    }
    std::cout << passed << " passed, " << failed << " failed\n";
    return failed == 0 ? 0 : 1;
}
