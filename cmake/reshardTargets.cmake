# The part of reshardConfig.cmake common to the source tree's (cmake/reshardConfig.cmake) and the
# installed package's (cmake/install/reshardConfig.cmake, installed next to this file as
# <prefix>/lib/cmake/reshard/reshardConfig.cmake). The including file sets reshard_INCLUDE_DIR,
# reshard_CPP_INCLUDE_DIR, _reshard_shared and _reshard_static (libreshard.so and .a) and
# _reshard_missing_hint (what to do when they are missing), and includes this file last.
# It checks that the library and header are there and defines reshard::reshard,
# reshard::static (when libreshard.a is there) and reshard::cpp.

if(NOT EXISTS "${_reshard_shared}" OR NOT EXISTS "${reshard_INCLUDE_DIR}/reshard.h")
  set(reshard_FOUND FALSE)
  set(reshard_NOT_FOUND_MESSAGE
    "${_reshard_shared} or ${reshard_INCLUDE_DIR}/reshard.h is missing: ${_reshard_missing_hint}")
  unset(_reshard_missing_hint)
  return()
endif()
unset(_reshard_missing_hint)

include(CMakeFindDependencyMacro)
find_dependency(Threads)

# An imported C library target NAME of TYPE (SHARED or STATIC) at LOCATION, with the C header
# folder and the further target properties given after, unless it is already defined.
function(_reshard_import_c name type location)
  if(NOT TARGET ${name})
    add_library(${name} ${type} IMPORTED)
    set_target_properties(${name} PROPERTIES
      IMPORTED_LOCATION "${location}" INTERFACE_INCLUDE_DIRECTORIES "${reshard_INCLUDE_DIR}" ${ARGN})
  endif()
endfunction()

_reshard_import_c(reshard::reshard SHARED "${_reshard_shared}" IMPORTED_SONAME "libreshard.so")
if(EXISTS "${_reshard_static}")
  _reshard_import_c(reshard::static STATIC "${_reshard_static}" IMPORTED_LINK_INTERFACE_LANGUAGES "C")
  # What the Rust standard library in libreshard.a links (a list, so not through ARGN).
  set_property(TARGET reshard::static PROPERTY INTERFACE_LINK_LIBRARIES Threads::Threads ${CMAKE_DL_LIBS} m)
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
unset(_reshard_shared)
unset(_reshard_static)
