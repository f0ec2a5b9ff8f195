// The command line the load examples share, so that each example file shows only its loading:
//
//   PROGRAM SRC_CKPT_DIR SRC_STRATEGY|- DST_STRATEGY|- RANK      ("-" = complete weights)
//
// run_example() builds the plan, hands it and the rank to the example's body, and turns errors
// into a message on stderr and exit status 1 (2 for a wrong command line).
#pragma once

#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>

#include "reshard.hpp"

template <class Body>
int run_example(int argc, char **argv, Body &&body) {
    if (argc != 5) {
        std::fprintf(stderr, "usage: %s SRC_CKPT_DIR SRC_STRATEGY|- DST_STRATEGY|- RANK\n", argv[0]);
        return 2;
    }
    auto opt = [](const char *s) { return std::string(s) == "-" ? std::nullopt : std::optional<std::string>(s); };
    try {
        reshard::Plan plan = reshard::Plan::build(argv[1], opt(argv[2]), opt(argv[3]));
        body(plan, static_cast<uint32_t>(std::stoul(argv[4])));
    } catch (const reshard::Error &e) {
        std::fprintf(stderr, "%s: %s (status %d)\n", argv[0], e.what(), e.code());
        return 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "%s: %s\n", argv[0], e.what());
        return 1;
    }
    return 0;
}
