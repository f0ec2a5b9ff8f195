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
# Every path is relative to this file, so the prefix can be moved. The source tree's own
# cmake/reshardConfig.cmake defines the same targets over target/release.

get_filename_component(_reshard_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(reshard_INCLUDE_DIR "${_reshard_prefix}/include")
set(reshard_CPP_INCLUDE_DIR "${_reshard_prefix}/include")
set(_reshard_shared "${_reshard_prefix}/lib/libreshard.so")
set(_reshard_static "${_reshard_prefix}/lib/libreshard.a")

if(NOT EXISTS "${_reshard_shared}" OR NOT EXISTS "${reshard_INCLUDE_DIR}/reshard.h")
  set(reshard_FOUND FALSE)
  set(reshard_NOT_FOUND_MESSAGE
    "${_reshard_shared} or ${reshard_INCLUDE_DIR}/reshard.h is missing: unpack the whole archive")
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
unset(_reshard_prefix)
unset(_reshard_shared)
unset(_reshard_static)
