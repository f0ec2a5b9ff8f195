"""reshard from Python, through ctypes (no compiled extension): MindSpore's checkpoint transform
functions, with the same signatures, so an old script switches by changing its import::

    # from mindspore import transform_checkpoints, merge_pipeline_strategys, rank_list_for_transform
    from reshard import transform_checkpoints, merge_pipeline_strategys, rank_list_for_transform

plus :class:`Plan` for finer control (some ranks, threads, progress, :class:`Cancel`), and :func:`load_rank` /
:func:`load_rank_param_dict` to load one destination rank straight into memory (numpy arrays,
or MindSpore Parameters for ``load_param_into_net``) without writing files. Failures raise
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
    "Cancel",
    "Plan",
    "ReshardError",
    "Status",
    "library_path",
    "load_rank",
    "load_rank_param_dict",
    "merge_pipeline_strategys",
    "rank_list_for_transform",
    "transform_checkpoints",
    "unified_safetensors",
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


class _TensorInfo(ctypes.Structure):
    """ReshardTensorInfo of reshard.h."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_char_p),
        ("ndim", ctypes.c_uint32),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("nbytes", ctypes.c_uint64),
    ]


_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_TensorInfo))

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
        "reshard_execute_cancellable": (
            i32,
            [p, s, ctypes.POINTER(u32), size, s, _PROGRESS, p, p, pp],
        ),
        "reshard_cancel_new": (p, []),
        "reshard_cancel_request": (i32, [p]),
        "reshard_cancel_free": (None, [p]),
        "reshard_load_rank": (i32, [p, u32, _ALLOC, p, s, pp]),
        "reshard_merge_strategies": (i32, [s, s, pp]),
        "reshard_unify": (i32, [s, s, s, s, pp]),
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


class Cancel:
    """A request to stop :meth:`Plan.execute` from another thread, used like a
    :class:`threading.Event`: ``set()`` makes the call running with it raise
    :class:`ReshardError` with code :attr:`Status.CANCELLED` at its next block of work, leaving
    no partial output (outputs of ranks finished before stay, complete). Once set it stays set.
    ``set()`` may be called from any thread, also while the call holds the library."""

    def __init__(self):
        self._lock = threading.Lock()
        self._set = False
        self._h = _library().reshard_cancel_new()
        if not self._h:
            raise MemoryError("reshard_cancel_new failed")

    def set(self):
        """Asks every call given this object to stop."""
        with self._lock:
            self._set = True
            if self._h:
                _library().reshard_cancel_request(self._h)

    def is_set(self):
        """Whether :meth:`set` was called."""
        return self._set

    def _handle(self):
        return self._h

    def __del__(self):
        h, self._h = getattr(self, "_h", None), None
        if h and _lib is not None:
            _lib.reshard_cancel_free(h)


class Plan:
    """A compiled transform (reshard_plan): built once, executed for all or some destination
    ranks, from one or several threads (disjoint ranks). Close it, or use it as a context
    manager; it is also freed when garbage collected.

    ``src_strategy_file`` / ``dst_strategy_file`` are strategy files or folders of per-stage
    files; None means complete weights. ``io``: how sources are read, "mmap", "pread" (no maps:
    a source truncated during a run is an error, never a SIGBUS; no page faults on network
    filesystems) or "auto" (pread on network filesystems, mmap elsewhere).
    """

    def __init__(
        self,
        src_checkpoints_dir,
        src_strategy_file=None,
        dst_strategy_file=None,
        *,
        src_ckpt_name=None,
        skip_crc=False,
        io="auto",
    ):
        lib = _library()
        self._lock = threading.Lock()
        self._handle = None
        self._users = 0
        self._closing = False
        options = {"skip_crc": bool(skip_crc), "io": io}
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
        io="auto",
        cancel=None,
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
        into place. ``io``: "mmap", "pread" or "auto", as for :class:`Plan`. ``progress(done,
        total)``, if given, is called with bytes written so far (from a worker thread); an
        exception it raises is re-raised when the call returns.

        ``cancel``: a :class:`Cancel`, whose ``set()`` from another thread stops the call (it
        raises :class:`ReshardError` with code :attr:`Status.CANCELLED`), or any object with
        ``is_set()`` such as a :class:`threading.Event`, which is looked at when the call starts
        and each time progress is reported."""
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
                "io": io,
                **_distributed_options(distributed, process_index, process_count, timeout),
            }
        ).encode()
        dst = _path(dst_checkpoints_dir, "dst_checkpoints_dir")
        lib = _library()
        err = ctypes.c_void_p()
        failure = []
        # An Event-like object is forwarded to a Cancel of our own when the call starts and at
        # each progress report (the library cannot look at a Python object itself).
        event = None
        if cancel is not None and not isinstance(cancel, Cancel):
            if not callable(getattr(cancel, "is_set", None)):
                raise TypeError(f"cancel must be a reshard.Cancel or have is_set(), got {cancel!r}")
            event, cancel = cancel, Cancel()
            if event.is_set():
                cancel.set()
        if progress is not None or event is not None:

            def on_progress(done, total, _user):
                if progress is not None and not failure:
                    try:
                        progress(done, total)
                    except BaseException as e:  # noqa: BLE001 - re-raised below
                        failure.append(e)
                if event is not None and not cancel.is_set() and event.is_set():
                    cancel.set()

            callback = _PROGRESS(on_progress)  # kept alive until the call returns
        h = self._acquire()
        try:
            if cancel is not None:
                status = lib.reshard_execute_cancellable(
                    h,
                    dst,
                    arr,
                    len(rank_list),
                    options,
                    callback if progress is not None or event is not None else _PROGRESS(),
                    None,
                    cancel._handle(),
                    ctypes.byref(err),
                )
            elif progress is None:
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

    def load_rank(self, rank, *, names=None, threads=0, io=None):
        """Destination rank ``rank``'s tensors in memory: ``{name: numpy.ndarray}`` in the order
        of the rank's ``.ckpt`` file, each array allocated as reshard announces the tensor and
        filled in place (no file, no second copy). See :func:`load_rank`."""
        return _load(self, rank, names, threads, io, raw_bfloat16=False)


def _numpy():
    try:
        import numpy
    except ImportError as e:
        raise ImportError("reshard.load_rank needs numpy ('pip install numpy')") from e
    return numpy


def _bfloat16(name, raw):
    """The numpy dtype of a BFloat16 tensor: ml_dtypes.bfloat16, or its bytes as uint16 (raw)."""
    np = _numpy()
    if raw:
        return np.dtype(np.uint16)
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(
            f"parameter '{name}' is BFloat16, which numpy holds only with the ml_dtypes package: "
            "'pip install ml-dtypes' (or use load_rank_param_dict, which needs only MindSpore)"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


_NUMPY_TYPES = {
    "Int8": "int8",
    "UInt8": "uint8",
    "Int16": "int16",
    "UInt16": "uint16",
    "Int32": "int32",
    "UInt32": "uint32",
    "Int64": "int64",
    "UInt64": "uint64",
    "Float16": "float16",
    "Float32": "float32",
    "Float64": "float64",
    "Bool": "bool",
    # qint4x2, stored one byte per element (as MindSpore's checkpoints hold it).
    "Int4": "int8",
}


def _array_for(info, raw_bfloat16):
    """An uninitialised numpy array for the tensor ``info`` describes."""
    np = _numpy()
    name = info.name.decode("utf-8", "replace")
    ms_type = info.dtype.decode()
    shape = tuple(info.shape[i] for i in range(info.ndim))
    nbytes = info.nbytes
    if ms_type == "str":
        # MindSpore stores a string as UTF-32 (numpy's "U" type): one such scalar.
        if nbytes % 4 == 0 and nbytes > 0:
            return np.empty((), dtype=f"<U{nbytes // 4}")
        return np.empty(nbytes, dtype=np.uint8)
    if ms_type == "BFloat16":
        dtype = _bfloat16(name, raw_bfloat16)
    elif ms_type in _NUMPY_TYPES:
        dtype = np.dtype(_NUMPY_TYPES[ms_type])
    else:
        raise TypeError(f"parameter '{name}' has type {ms_type}, which reshard.py cannot map to numpy")
    # .ckpt files store a 0-d scalar with dims [0].
    if shape == (0,) and nbytes == dtype.itemsize:
        shape = ()
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != nbytes:
        raise ValueError(
            f"parameter '{name}': shape {list(shape)} of {ms_type} is {count * dtype.itemsize} bytes, "
            f"but reshard announced {nbytes}"
        )
    return np.empty(shape, dtype=dtype)


def _load(plan, rank, names, threads, io, raw_bfloat16, types=None):
    """The arrays of ``plan.load_rank``; ``types``, if given, gets each tensor's MindSpore type."""
    rank = _rank(rank, "rank")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise TypeError(f"threads must be a non-negative int, got {threads!r}")
    options = {"threads": threads}
    if names is not None:
        if isinstance(names, (str, bytes)):
            raise TypeError("names must be a list of parameter names, not one string")
        names = list(names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError("names must be a list of str")
        options["names"] = names
    if io is not None:
        options["io"] = io
    _numpy()
    arrays = {}
    failure = []

    def on_tensor(_user, info_p):
        if failure:
            return None  # skip the rest: the call's result is an exception
        try:
            info = info_p.contents
            arr = _array_for(info, raw_bfloat16)
            name = info.name.decode("utf-8", "replace")
            arrays[name] = arr
            if types is not None:
                types[name] = info.dtype.decode()
            return arr.ctypes.data
        except BaseException as e:  # noqa: BLE001 - re-raised below
            failure.append(e)
            return None

    callback = _ALLOC(on_tensor)  # kept alive until the call returns
    lib = _library()
    err = ctypes.c_void_p()
    h = plan._acquire()
    try:
        status = lib.reshard_load_rank(
            h, rank, callback, None, json.dumps(options).encode(), ctypes.byref(err)
        )
    finally:
        plan._release()
    if failure:
        if err.value:
            lib.reshard_error_free(err)
        raise failure[0]
    _check(status, err)
    return arrays


def load_rank(src_ckpt_dir, src_strategy_file, dst_strategy_file, rank_id, *, names=None, threads=0, io=None):
    """Loads destination rank ``rank_id`` of the transform from ``src_ckpt_dir`` (saved under
    ``src_strategy_file``) to ``dst_strategy_file`` straight into memory: ``{name: numpy.ndarray}``,
    in the order of the rank's ``.ckpt`` file, each tensor exactly what
    :func:`transform_checkpoints` would write for it. Nothing is written to disk and only the
    source bytes the rank needs are read. Arrays are allocated as reshard announces each tensor
    and filled in place by reshard's workers (no second copy).

    Strategies are files or folders of per-stage files; None means complete weights. ``names``:
    load only these parameters (a name the rank lacks raises). ``threads``: workers, 0 = all
    cores. ``io``: ``"mmap"``, ``"pread"`` or ``"auto"``. BFloat16 tensors are
    ``ml_dtypes.bfloat16`` arrays (an ImportError naming the package when it is missing); a 0-d
    scalar (global_step) is a 0-d array; Int4 (qint4x2) is int8, one element per byte, as stored.
    To load several ranks, build a :class:`Plan` once and call :meth:`Plan.load_rank`.
    """
    with Plan(src_ckpt_dir, src_strategy_file, dst_strategy_file) as plan:
        return plan.load_rank(rank_id, names=names, threads=threads, io=io)


def load_rank_param_dict(
    src_ckpt_dir, src_strategy_file, dst_strategy_file, rank_id, *, names=None, threads=0, io=None
):
    """:func:`load_rank` as MindSpore's ``load_checkpoint`` returns it: ``{name:
    mindspore.Parameter}`` (a string parameter as its ``str``), ready for
    ``mindspore.load_param_into_net``. Needs MindSpore; BFloat16 and Int4 keep their MindSpore
    types without ml_dtypes. MindSpore's Parameter copies the array it is given."""
    try:
        import mindspore
        from mindspore import Parameter, Tensor
        from mindspore._c_expression import TensorPy
    except ImportError as e:
        raise ImportError("reshard.load_rank_param_dict needs MindSpore ('import mindspore' failed)") from e
    with Plan(src_ckpt_dir, src_strategy_file, dst_strategy_file) as plan:
        types = {}
        arrays = _load(plan, rank_id, names, threads, io, raw_bfloat16=True, types=types)
    out = {}
    special = {"BFloat16": mindspore.bfloat16, "Int4": mindspore.qint4x2}
    for name, arr in arrays.items():
        ms_type = types.get(name)
        if arr.dtype.kind == "U":
            out[name] = str(arr)
        elif ms_type in special:
            data = TensorPy.convert_bytes_to_tensor(arr.tobytes(), tuple(arr.shape), special[ms_type])
            out[name] = Parameter(data, name=name)  # as MindSpore's load_checkpoint does
        else:
            out[name] = Parameter(Tensor.from_numpy(arr), name=name)
    return out


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
    io="auto",
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
    :func:`warnings.warn`. ``io`` (keyword only, not MindSpore's): how sources are read, "mmap",
    "pread" or "auto" (see :class:`Plan`). The keywords ``distributed``, ``process_index``,
    ``process_count`` and ``timeout`` spread one transform over the processes of a launcher, as
    :meth:`Plan.execute` describes.
    """
    if not isinstance(ckpt_prefix, str):
        raise TypeError("The ckpt_prefix should be a str.")
    if isinstance(process_num, bool) or not isinstance(process_num, int) or process_num < 1:
        raise ValueError(f"process_num should be a positive int, got {process_num!r}")
    with Plan(src_checkpoints_dir, src_strategy_file, dst_strategy_file, io=io) as plan:
        for w in plan.warnings:
            warnings.warn(w, stacklevel=2)
        plan.execute(
            dst_checkpoints_dir,
            prefix=ckpt_prefix,
            output_format=output_format,
            io=io,
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


def unified_safetensors(
    src_dir,
    src_strategy_file,
    dst_dir,
    merge_with_redundancy=True,
    file_suffix=None,
    max_process_num=64,
    choice_func=None,
    split_dst_file=(),
):
    """MindSpore's ``unified_safetensors``: merges the distributed safetensors in ``src_dir``
    (``rank_N`` folders, saved with or without ``remove_redundancy``) into ``dst_dir`` as
    ``part{i}.safetensors``, ``hyper_param.safetensors`` and ``param_name_map.json``, the same
    files MindSpore writes. As in MindSpore, the files' ``remove_redundancy`` metadata wins
    over ``merge_with_redundancy``. ``split_dst_file=(current, total)`` writes only that task's
    share of the parts, as in MindSpore. ``max_process_num`` is accepted and ignored (reshard
    streams with all cores in one process); ``choice_func`` is not supported
    (``NotImplementedError`` when given)."""
    if os.path.isfile(os.fsdecode(_path(src_dir, "src_dir"))):
        raise ValueError("For 'unified_safetensors', the 'src_dir' can not be a file.")
    if not isinstance(merge_with_redundancy, bool):
        raise TypeError("merge_with_redundancy should be a bool")
    if isinstance(max_process_num, bool) or not isinstance(max_process_num, int) or max_process_num < 1:
        raise ValueError(f"max_process_num should be a positive int, got {max_process_num!r}")
    if choice_func is not None:
        raise NotImplementedError("unified_safetensors: choice_func is not supported by reshard")
    if split_dst_file and (
        not isinstance(split_dst_file, tuple)
        or len(split_dst_file) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in split_dst_file)
        or split_dst_file[0] > split_dst_file[1]
    ):
        raise ValueError(f"split_dst_file should be (current, total) with 1 <= current <= total, got {split_dst_file!r}")
    if file_suffix is not None and not isinstance(file_suffix, str):
        raise TypeError("file_suffix should be a str or None")
    options = {
        "merge_with_redundancy": merge_with_redundancy,
        "file_suffix": file_suffix,
        "split_dst_file": list(split_dst_file) if split_dst_file else None,
    }
    lib = _library()
    err = ctypes.c_void_p()
    status = lib.reshard_unify(
        _path(src_dir, "src_dir"),
        _path(src_strategy_file, "src_strategy_file"),
        _path(dst_dir, "dst_dir"),
        json.dumps(options).encode(),
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
