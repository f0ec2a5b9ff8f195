# find_package(reshard) for an installed reshard: the release archive of scripts/package.sh,
# unpacked anywhere (this file is <prefix>/lib/cmake/reshard/reshardConfig.cmake).
#
#   cmake -S app -B build -DCMAKE_PREFIX_PATH=<where the archive was unpacked>
#
#   find_package(reshard 0.1 REQUIRED)
#   target_link_libraries(app PRIVATE reshard::cpp)      # C++ wrapper (header-only, C++17)
#   target_link_libraries(capp PRIVATE reshard::reshard) # C API, libreshard.so
#   target_link_libraries(capp PRIVATE reshard::static)  # C API, libreshard.a
#
# Every path is relative to this file, so the prefix can be moved. The targets are defined by
# reshardTargets.cmake next to this file, which the source tree's own cmake/reshardConfig.cmake
# shares (over target/release).

get_filename_component(_reshard_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(reshard_INCLUDE_DIR "${_reshard_prefix}/include")
set(reshard_CPP_INCLUDE_DIR "${_reshard_prefix}/include")
set(_reshard_shared "${_reshard_prefix}/lib/libreshard.so")
set(_reshard_static "${_reshard_prefix}/lib/libreshard.a")

set(_reshard_missing_hint "unpack the whole archive")
unset(_reshard_prefix)
include("${CMAKE_CURRENT_LIST_DIR}/reshardTargets.cmake")
