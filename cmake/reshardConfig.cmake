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

if(NOT EXISTS "${_reshard_shared}" OR NOT EXISTS "${reshard_INCLUDE_DIR}/reshard.h")
  set(reshard_FOUND FALSE)
  string(CONCAT reshard_NOT_FOUND_MESSAGE
    "${_reshard_shared} or ${reshard_INCLUDE_DIR}/reshard.h is missing: build the library with "
    "'cargo build --release -p reshard-ffi' in ${_reshard_root}, or set RESHARD_LIBRARY_DIR")
  return()
endif()

include(CMakeFindDependencyMacro)
find_dependency(Threads)

if(NOT TARGET reshard::reshard)
  add_library(reshard::reshard SHARED IMPORTED)
  set_target_properties(reshard::reshard PROPERTIES
    IMPORTED_LOCATION "${_reshard_shared}"
    IMPORTED_SONAME "libreshard.so"
    INTERFACE_INCLUDE_DIRECTORIES "${reshard_INCLUDE_DIR}")
endif()

if(NOT TARGET reshard::static AND EXISTS "${_reshard_static}")
  add_library(reshard::static STATIC IMPORTED)
  set_target_properties(reshard::static PROPERTIES
    IMPORTED_LOCATION "${_reshard_static}"
    IMPORTED_LINK_INTERFACE_LANGUAGES "C"
    INTERFACE_INCLUDE_DIRECTORIES "${reshard_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m")
endif()

if(NOT TARGET reshard::cpp)
  add_library(reshard::cpp INTERFACE IMPORTED)
  set_target_properties(reshard::cpp PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${reshard_CPP_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "reshard::reshard"
    INTERFACE_COMPILE_FEATURES "cxx_std_17")
endif()

set(reshard_LIBRARIES reshard::reshard)
set(reshard_INCLUDE_DIRS "${reshard_INCLUDE_DIR}")
unset(_reshard_root)
unset(_reshard_default_libdir)
unset(_reshard_shared)
unset(_reshard_static)
