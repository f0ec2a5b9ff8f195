"""reshard from Python, through ctypes (no compiled extension): MindSpore's checkpoint transform
functions, with the same signatures, so an old script switches by changing its import::

    # from mindspore import transform_checkpoints, merge_pipeline_strategys, rank_list_for_transform
    from reshard import transform_checkpoints, merge_pipeline_strategys, rank_list_for_transform

plus :class:`Plan` for finer control (some ranks, threads, progress). Failures raise
:class:`ReshardError` (a ``ValueError``, as most of MindSpore's are) carrying reshard's status
code and its message, which names the file, rank and parameter.

The library (libreshard.so) is found, on first use, at ``$RESHARD_LIBRARY`` (a file or a
folder), next to this module, or in the ``target/release`` folder of the reshard source tree this
module lives in (``$CARGO_TARGET_DIR/release`` first when that is set).
"""

import ctypes
import enum
import json
import operator
import os
import threading
import warnings

__all__ = [
    "ABI_VERSION",
    "Plan",
    "ReshardError",
    "Status",
    "library_path",
    "merge_pipeline_strategys",
    "rank_list_for_transform",
    "transform_checkpoints",
    "version",
]

#: The C ABI version this module is written for (RESHARD_ABI_VERSION in reshard.h).
ABI_VERSION = 1

_LIB_NAME = "libreshard.so"
_U32_MAX = 2**32 - 1


class Status(enum.IntEnum):
    """The RESHARD_STATUS_* codes of reshard.h."""

    OK = 0
    IO = 2
    MALFORMED = 3
    BAD_TENSOR = 4
    CRC = 5
    UNSUPPORTED = 6
    BAD_LAYOUT = 7
    SHAPE_MISMATCH = 8
    SOURCE = 9
    INVALID_ARGUMENT = 10
    CANCELLED = 11
    DISTRIBUTED = 12
    NULL_ARGUMENT = 100
    INVALID_UTF8 = 101
    INVALID_OPTIONS = 102
    RANK_OUT_OF_RANGE = 103
    BUFFER_TOO_SMALL = 104
    BUSY = 105
    PANIC = 106


class ReshardError(ValueError):
    """A failed reshard call. ``code`` is a :class:`Status` (or the raw int for a code this module
    does not know), ``message`` reshard's full message."""

    def __init__(self, code, message):
        try:
            code = Status(code)
        except ValueError:
            pass
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self):
        return self.message


_PROGRESS = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p)

_lib = None
_lib_path = None
_lib_lock = threading.Lock()


def _candidates():
    env = os.environ.get("RESHARD_LIBRARY")
    if env:
        yield os.path.join(env, _LIB_NAME) if os.path.isdir(env) else env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    yield os.path.join(here, _LIB_NAME)
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        yield os.path.join(target, "release", _LIB_NAME)
    yield os.path.join(here, os.pardir, os.pardir, "target", "release", _LIB_NAME)


def _declare(lib):
    p, u32, i32, size = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int32, ctypes.c_size_t
    s = ctypes.c_char_p
    pp = ctypes.POINTER(ctypes.c_void_p)
    sigs = {
        "reshard_plan": (i32, [s, s, s, s, pp, pp]),
        "reshard_plan_free": (None, [p]),
        "reshard_plan_dst_rank_count": (u32, [p]),
        "reshard_plan_src_ranks": (
            i32,
            [p, u32, ctypes.POINTER(u32), size, ctypes.POINTER(size)],
        ),
        # c_void_p, not c_char_p: the string must be handed back to reshard_string_free.
        "reshard_plan_to_json": (p, [p]),
        "reshard_string_free": (None, [p]),
        "reshard_execute": (i32, [p, s, ctypes.POINTER(u32), size, s, pp]),
        "reshard_execute_with_progress": (
            i32,
            [p, s, ctypes.POINTER(u32), size, s, _PROGRESS, p, pp],
        ),
        "reshard_merge_strategies": (i32, [s, s, pp]),
        "reshard_error_code": (i32, [p]),
        "reshard_error_message": (s, [p]),
        "reshard_error_free": (None, [p]),
        "reshard_version": (s, []),
        "reshard_abi_version": (u32, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _library():
    global _lib, _lib_path
    with _lib_lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in _candidates():
            path = os.path.normpath(path)
            if not os.path.exists(path):
                tried.append(path + " (missing)")
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            _declare(lib)
            abi = lib.reshard_abi_version()
            if abi != ABI_VERSION:
                raise ReshardError(
                    Status.INVALID_ARGUMENT,
                    f"{path} has C ABI version {abi}, but this reshard.py needs {ABI_VERSION}",
                )
            _lib, _lib_path = lib, path
            return lib
        raise ReshardError(
            Status.IO,
            "cannot find libreshard.so (build it with 'cargo build --release -p reshard-ffi', or set "
            "RESHARD_LIBRARY); tried: " + "; ".join(tried),
        )


def library_path():
    """The path of the loaded libreshard.so (loading it if needed)."""
    _library()
    return _lib_path


def version():
    """The version of the loaded library, e.g. "0.1.0"."""
    return _library().reshard_version().decode()


def _check(status, err):
    """Raises for a non-zero status; frees the error object in any case."""
    lib = _library()
    if not err.value:
        if status != Status.OK:
            raise ReshardError(status, f"reshard call failed with status {status}")
        return
    try:
        code = lib.reshard_error_code(err)
        message = lib.reshard_error_message(err).decode("utf-8", "replace")
    finally:
        lib.reshard_error_free(err)
    raise ReshardError(code if code else status, message)


def _path(value, name, required=True):
    if value is None:
        if required:
            raise TypeError(f"{name} must be a path (str, bytes or os.PathLike), got None")
        return None
    try:
        encoded = os.fsencode(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a path (str, bytes or os.PathLike), got {type(value).__name__}"
        ) from None
    # C strings end at the first NUL: the library would see a shorter, different path.
    if b"\0" in encoded:
        raise ValueError(f"{name} contains a NUL byte: {value!r}")
    return encoded


def _rank(value, name):
    # ctypes would silently wrap -1 to 4294967295: check first.
    if isinstance(value, bool):
        raise TypeError(f"{name} should be an int, got bool")
    try:
        value = operator.index(value)  # int, numpy integers, ...
    except TypeError:
        raise TypeError(f"{name} should be an int, got {type(value).__name__}") from None
    if not 0 <= value <= _U32_MAX:
        raise ReshardError(
            Status.RANK_OUT_OF_RANGE, f"{name} {value} is not a valid rank (0 to {_U32_MAX})"
        )
    return value


class Plan:
    """A compiled transform (reshard_plan): built once, executed for all or some destination
    ranks, from one or several threads (disjoint ranks). Close it, or use it as a context
    manager; it is also freed when garbage collected.

    ``src_strategy_file`` / ``dst_strategy_file`` are strategy files or folders of per-stage
    files; None means complete weights.
    """

    def __init__(
        self,
        src_checkpoints_dir,
        src_strategy_file=None,
        dst_strategy_file=None,
        *,
        src_ckpt_name=None,
        skip_crc=False,
    ):
        lib = _library()
        self._lock = threading.Lock()
        self._handle = None
        self._users = 0
        self._closing = False
        options = {"skip_crc": bool(skip_crc)}
        if src_ckpt_name is not None:
            options["src_ckpt_name"] = src_ckpt_name
        handle, err = ctypes.c_void_p(), ctypes.c_void_p()
        status = lib.reshard_plan(
            _path(src_checkpoints_dir, "src_checkpoints_dir"),
            _path(src_strategy_file, "src_strategy_file", required=False),
            _path(dst_strategy_file, "dst_strategy_file", required=False),
            json.dumps(options).encode(),
            ctypes.byref(handle),
            ctypes.byref(err),
        )
        _check(status, err)
        self._handle = handle

    # Keeps the handle alive while a call uses it, even if another thread closes the plan.
    def _acquire(self):
        with self._lock:
            if self._handle is None or self._closing:
                raise ReshardError(Status.NULL_ARGUMENT, "the reshard Plan is closed")
            self._users += 1
            return self._handle

    def _release(self):
        with self._lock:
            self._users -= 1
            if self._closing and self._users == 0:
                self._free()

    def _free(self):
        if self._handle is not None:
            _library().reshard_plan_free(self._handle)
            self._handle = None

    def close(self):
        """Frees the plan (once every call using it has returned). Idempotent."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before the plan existed
            return
        with lock:
            self._closing = True
            if self._users == 0:
                self._free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass

    @property
    def dst_rank_count(self):
        """Number of destination ranks (1 for a complete destination)."""
        h = self._acquire()
        try:
            return _library().reshard_plan_dst_rank_count(h)
        finally:
            self._release()

    def src_ranks(self, dst_rank):
        """The source ranks destination rank ``dst_rank`` reads, highest first."""
        dst_rank = _rank(dst_rank, "dst_rank")
        lib = _library()
        h = self._acquire()
        try:
            n = ctypes.c_size_t(0)
            buf = (ctypes.c_uint32 * 0)()
            while True:
                status = lib.reshard_plan_src_ranks(h, dst_rank, buf, len(buf), ctypes.byref(n))
                if status != Status.BUFFER_TOO_SMALL:
                    break
                buf = (ctypes.c_uint32 * n.value)()
        finally:
            self._release()
        if status == Status.RANK_OUT_OF_RANGE:
            raise ReshardError(
                status,
                f"destination rank {dst_rank} does not exist: the plan has "
                f"{self.dst_rank_count} destination rank(s)",
            )
        if status != Status.OK:
            raise ReshardError(status, f"reshard_plan_src_ranks failed with status {status}")
        return list(buf[: n.value])

    def to_json(self):
        """The plan summary of reshard_plan_to_json, as a string."""
        lib = _library()
        h = self._acquire()
        try:
            s = lib.reshard_plan_to_json(h)
        finally:
            self._release()
        if not s:
            raise ReshardError(Status.PANIC, "reshard_plan_to_json failed")
        try:
            return ctypes.string_at(s).decode("utf-8", "replace")
        finally:
            lib.reshard_string_free(s)

    @property
    def warnings(self):
        """What reshard wants the user to know about this plan (differences from MindSpore)."""
        return json.loads(self.to_json()).get("warnings", [])

    def execute(
        self,
        dst_checkpoints_dir,
        ranks=None,
        *,
        prefix="checkpoint_",
        output_format="ckpt",
        threads=0,
        crc=False,
        resume=True,
        sync=True,
        progress=None,
        distributed=False,
        process_index=None,
        process_count=None,
        timeout=None,
    ):
        """Writes ``dst_checkpoints_dir/rank_{r}/{prefix}{r}.{output_format}`` for ``ranks``
        (all destination ranks when None or empty).

        ``distributed=True``: this call is one process of a job spread over several (``reshard
        transform --distributed``), started by mpirun, srun, torchrun or msrun with the same
        arguments and an output folder they all see. It writes its share of ``ranks`` (balanced
        by bytes), records it in ``reshard_share_{i}_of_{n}.json`` and returns when every share
        is done and verified; another share's failure or silence raises :class:`ReshardError`
        with ``Status.DISTRIBUTED``. ``process_index`` and ``process_count`` default to the
        launcher's environment; ``timeout`` (seconds, default 600) is how long a share may stay
        silent.

        ``threads``: workers, 0 = all cores. ``crc``: append MindSpore's crc32 trailer.
        ``resume``: keep an output this plan already wrote that still verifies against the
        folder's manifest (False: always rewrite). ``sync``: fsync outputs before renaming them
        into place. ``progress(done, total)``, if given, is called with bytes written so far
        (from a worker thread); an exception it raises is re-raised when the call returns."""
        if not isinstance(prefix, str):
            raise TypeError("The ckpt_prefix should be a str.")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise TypeError(f"threads must be a non-negative int, got {threads!r}")
        rank_list = [_rank(r, "rank") for r in ([] if ranks is None else ranks)]
        arr = (ctypes.c_uint32 * len(rank_list))(*rank_list)
        options = json.dumps(
            {
                "prefix": prefix,
                "output_format": output_format,
                "threads": threads,
                "crc": bool(crc),
                "resume": bool(resume),
                "sync": bool(sync),
                **_distributed_options(distributed, process_index, process_count, timeout),
            }
        ).encode()
        dst = _path(dst_checkpoints_dir, "dst_checkpoints_dir")
        lib = _library()
        err = ctypes.c_void_p()
        failure = []
        if progress is not None:

            def on_progress(done, total, _user):
                if failure:
                    return
                try:
                    progress(done, total)
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    failure.append(e)

            callback = _PROGRESS(on_progress)  # kept alive until the call returns
        h = self._acquire()
        try:
            if progress is None:
                status = lib.reshard_execute(
                    h, dst, arr, len(rank_list), options, ctypes.byref(err)
                )
            else:
                status = lib.reshard_execute_with_progress(
                    h, dst, arr, len(rank_list), options, callback, None, ctypes.byref(err)
                )
        finally:
            self._release()
        _check(status, err)
        if failure:
            raise failure[0]


def _distributed_options(distributed, process_index, process_count, timeout):
    """The process-share keys of reshard_execute's options (only those given)."""
    opts = {}
    if distributed:
        opts["distributed"] = True
    for key, value in (("process_index", process_index), ("process_count", process_count)):
        if value is not None:
            opts[key] = _rank(value, key)
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
        opts["timeout"] = timeout
    return opts


def transform_checkpoints(
    src_checkpoints_dir,
    dst_checkpoints_dir,
    ckpt_prefix,
    src_strategy_file=None,
    dst_strategy_file=None,
    process_num=1,
    output_format="ckpt",
    *,
    distributed=False,
    process_index=None,
    process_count=None,
    timeout=None,
):
    """MindSpore's ``transform_checkpoints``: converts ``src_checkpoints_dir/rank_{i}/*`` saved
    under ``src_strategy_file`` into ``dst_checkpoints_dir/rank_{r}/{ckpt_prefix}{r}.ckpt`` (or
    ``.safetensors``) for ``dst_strategy_file`` (None = complete weights, on either side).

    Same signature as MindSpore 2.10 (``process_num`` sits before ``output_format`` there).
    ``process_num`` is accepted and ignored: reshard uses all cores in one process. Strategy
    arguments may also be folders of per-stage files. Plan warnings are issued with
    :func:`warnings.warn`. The keywords ``distributed``, ``process_index``, ``process_count``
    and ``timeout`` spread one transform over the processes of a launcher, as
    :meth:`Plan.execute` describes.
    """
    if not isinstance(ckpt_prefix, str):
        raise TypeError("The ckpt_prefix should be a str.")
    if isinstance(process_num, bool) or not isinstance(process_num, int) or process_num < 1:
        raise ValueError(f"process_num should be a positive int, got {process_num!r}")
    with Plan(src_checkpoints_dir, src_strategy_file, dst_strategy_file) as plan:
        for w in plan.warnings:
            warnings.warn(w, stacklevel=2)
        plan.execute(
            dst_checkpoints_dir,
            prefix=ckpt_prefix,
            output_format=output_format,
            distributed=distributed,
            process_index=process_index,
            process_count=process_count,
            timeout=timeout,
        )


def merge_pipeline_strategys(src_strategy_dirs, dst_strategy_file):
    """MindSpore's ``merge_pipeline_strategys``: merges the per-stage strategy files in the folder
    ``src_strategy_dirs`` (all ``*.ckpt`` or all ``*.json``) into ``dst_strategy_file``, byte for
    byte as MindSpore does. The folder of ``dst_strategy_file`` is created if needed."""
    lib = _library()
    err = ctypes.c_void_p()
    status = lib.reshard_merge_strategies(
        _path(src_strategy_dirs, "src_strategy_dirs"),
        _path(dst_strategy_file, "dst_strategy_file"),
        ctypes.byref(err),
    )
    _check(status, err)


def rank_list_for_transform(
    rank_id, src_strategy_file=None, dst_strategy_file=None, *, src_checkpoints_dir=None
):
    """MindSpore's ``rank_list_for_transform``: the source ranks that destination rank
    ``rank_id`` needs, highest first.

    With ``src_strategy_file=None`` (complete source) the answer is ``[0]``, as in MindSpore.
    Otherwise reshard needs the source checkpoints as well as the strategies (it takes full
    tensor shapes from the stored slices instead of guessing them), so pass the keyword
    ``src_checkpoints_dir=`` (the folder with the ``rank_N`` sub-folders); without it a
    :class:`ReshardError` (``Status.INVALID_ARGUMENT``) says so.

    The list is the set of ranks reshard reads, which can differ from MindSpore's: where slices
    are replicated reshard may pick other replicas, and it leaves out ranks whose data is not
    needed.
    """
    if isinstance(rank_id, bool) or not isinstance(rank_id, int):
        raise TypeError("The rank_id should be a int.")
    if src_strategy_file is None:
        return [0]
    if src_checkpoints_dir is None:
        raise ReshardError(
            Status.INVALID_ARGUMENT,
            "rank_list_for_transform: reshard plans from the source checkpoints as well as the "
            "strategy files; pass src_checkpoints_dir=<folder with the rank_N sub-folders>",
        )
    with Plan(src_checkpoints_dir, src_strategy_file, dst_strategy_file) as plan:
        return plan.src_ranks(_rank(rank_id, "rank_id"))
