"""Read CIFAR-10's python batches without running code from them.

The official files (`test_batch`, `data_batch_1..5`, `batches.meta`) are pickles, and a plain `pickle.load` runs
whatever a crafted file asks for: anyone who can write into a data folder (`--data-root`, `$TTA_SURGICAL_DATA`, a
shared cluster folder) could run code as the user. The official files hold only dicts, lists, strings, integers
and one uint8 numpy array, so the unpickler here resolves exactly the globals numpy's own array pickling needs
(the official files' `numpy.core.multiarray._reconstruct` / `numpy.ndarray` / `numpy.dtype`, and the names the
same array gets when re-saved by numpy 2 or Python 3: `numpy._core.*`, protocol 5's `_frombuffer`, protocol 2's
`_codecs.encode` of bytes) and refuses every other one before anything is called.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NotCifarFileError", "read_cifar_pickle"]


class NotCifarFileError(OSError):
    """A file in a CIFAR-10 folder is not a pickle of the kind the official release holds."""


class _Refused(pickle.UnpicklingError):
    """The file asks for something the official files never do (as opposed to being cut short or garbled)."""


class _Allowed:
    """One allowed global as the unpickler hands it out: callable with positional arguments, never a type (so
    NEWOBJ refuses it) and never modified by the file (BUILD, which would set attributes on it, raises)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, name: str, fn: Callable[..., Any] | None) -> None:
        self._name, self._fn = name, fn

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            raise _Refused(f"{self._name} is not called by numpy's array pickling")
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"it tries to change {self._name}")

    def __repr__(self) -> str:
        return self._name


# The array reconstruction functions of the installed numpy, found the way numpy itself pickles (1.x and 2.x).
_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]
_NUMPY_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]
_NDARRAY = _Allowed("numpy.ndarray", None)  # only ever the first argument of _reconstruct


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b"b") and then fills it (BUILD): the call itself
    # never needs a subclass or a large shape, so anything else (an allocation bomb, a subclass) is refused.
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or shape != (0,):
        raise _Refused(f"unexpected array reconstruction ({subtype!r}, {shape!r})")
    return _NUMPY_RECONSTRUCT(np.ndarray, (0,), dtype)


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3 writes bytes as _codecs.encode(str, "latin1") under pickle protocol 2; no other codec is needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"unexpected _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], _Allowed] = {
    ("numpy.core.multiarray", "_reconstruct"): _Allowed("_reconstruct", _reconstruct),  # official files (numpy 1)
    ("numpy._core.multiarray", "_reconstruct"): _Allowed("_reconstruct", _reconstruct),  # re-saved with numpy 2
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Allowed("numpy.dtype", np.dtype),
    ("numpy.core.numeric", "_frombuffer"): _Allowed("_frombuffer", _NUMPY_FROMBUFFER),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"): _Allowed("_frombuffer", _NUMPY_FROMBUFFER),
    ("_codecs", "encode"): _Allowed("_codecs.encode", _latin1_bytes),  # bytes under protocol 2 from Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals in `_ALLOWED`; persistent ids are refused by the base class."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"it asks for {module}.{name}") from None


def read_cifar_pickle(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """The dict in the CIFAR-10 python batch `path`, keys as str; a one-line `NotCifarFileError` naming the file
    (with `hint`, what to do) when it is not one. `what` names the file's role in the message."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as err:
        raise NotCifarFileError(
            f"{what} {path} is not an official CIFAR-10 file and was not read ({err}; only plain lists, strings, "
            f"numbers and uint8 arrays are accepted, nothing that runs code); {hint}"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as err:
        raise NotCifarFileError(f"{what} {path} is truncated or corrupt ({err!r}); {hint}") from None
    if not isinstance(obj, dict):
        raise NotCifarFileError(f"{what} {path} holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch; {hint}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
