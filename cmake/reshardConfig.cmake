# find_package(reshard) for libreshard built in this source tree.
#
#   cargo build --release -p reshard-ffi
#   cmake -S app -B build -Dreshard_DIR=<repo>/cmake      (or -DCMAKE_PREFIX_PATH=<repo>)
#
#   find_package(reshard 0.1 REQUIRED)
#   target_link_libraries(app PRIVATE reshard::cpp)      # C++ wrapper (header-only, C++17)
#   target_link_libraries(capp PRIVATE reshard::reshard) # C API, libreshard.so
#   target_link_libraries(capp PRIVATE reshard::static)  # C API, libreshard.a
#
# The libraries are taken from RESHARD_LIBRARY_DIR (default: $CARGO_TARGET_DIR/release, else
# <repo>/target/release); the headers from <repo>/include and <repo>/bindings/cpp. Programs
# linked to reshard::reshard get that folder in their build RPATH.

get_filename_component(_reshard_root "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
if(DEFINED ENV{CARGO_TARGET_DIR} AND NOT "$ENV{CARGO_TARGET_DIR}" STREQUAL "")
  set(_reshard_default_libdir "$ENV{CARGO_TARGET_DIR}/release")
else()
  set(_reshard_default_libdir "${_reshard_root}/target/release")
endif()
set(RESHARD_LIBRARY_DIR "${_reshard_default_libdir}" CACHE PATH
    "Folder holding libreshard.so and libreshard.a (cargo build --release -p reshard-ffi)")

set(reshard_INCLUDE_DIR "${_reshard_root}/include")
set(reshard_CPP_INCLUDE_DIR "${_reshard_root}/bindings/cpp")
set(_reshard_shared "${RESHARD_LIBRARY_DIR}/libreshard.so")
set(_reshard_static "${RESHARD_LIBRARY_DIR}/libreshard.a")

set(_reshard_missing_hint
    "build the library with 'cargo build --release -p reshard-ffi' in ${_reshard_root}, or set RESHARD_LIBRARY_DIR")
unset(_reshard_root)
unset(_reshard_default_libdir)
include("${CMAKE_CURRENT_LIST_DIR}/reshardTargets.cmake")
