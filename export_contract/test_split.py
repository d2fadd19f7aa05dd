"""The test split an export carries (`test_set.npz`), written by training and read by the server.

The format is NumPy's own `np.savez_compressed` (DEFLATE): `x` in the model's input dtype and shape,
`y` int64 labels. The reader does not trust the file: it never unpickles, and it learns every
array's dtype and shape from its header, checks them against the model's input spec, the manifest's
`n` and MAX_ARRAY_BYTES, and only then decompresses exactly that many bytes (zipfile bounds each
DEFLATE step by the bytes asked for). A small file that would expand to gigabytes, or hold a million
repeated images, is refused before any of it is decompressed.
"""
import io
import zipfile

import numpy as np

from export_contract.reader import MAX_BYTES

MAX_ARRAY_BYTES = 16 << 20  # x and y together, decompressed: 2,000 32x32 RGB crops are 6 MB
FILE_NAME = "test_set.npz"
_NPY_HEADER_MAX = 1 << 12  # an .npy header is a line of Python literal of ~100 bytes


class TestSplitError(ValueError):
    """The file is not a test split this model can be checked on; the message says why."""


def fits(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether a split is small enough to be carried (the official SVHN test file is not)."""
    return x.nbytes + y.nbytes <= MAX_ARRAY_BYTES


def write(path, x: np.ndarray, y: np.ndarray) -> bool:
    """Write the split; False (nothing left behind) where it does not fit the limits a reader applies."""
    if not fits(x, y):
        return False
    np.savez_compressed(path, x=np.ascontiguousarray(x), y=np.ascontiguousarray(y, dtype=np.int64))
    if path.stat().st_size > MAX_BYTES["test_set"]:
        path.unlink()
        return False
    return True


def write_images(path, x: np.ndarray) -> None:
    """Unlabelled pictures (the non-digit test set) in the same format: x only."""
    np.savez_compressed(path, x=np.ascontiguousarray(x))


def read(data: bytes, spec: dict, n: int, file_name: str = FILE_NAME) -> tuple[np.ndarray, np.ndarray]:
    """The split in `data` for a model with input `spec`, holding `n` images; TestSplitError otherwise."""
    x, y = arrays(data, spec, n, file_name, labelled=True)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise TestSplitError(f"{file_name}: labels must lie in 0..9")
    return x, y


def read_images(data: bytes, spec: dict, n: int, file_name: str) -> np.ndarray:
    """Unlabelled pictures written by write_images, checked as read() checks a split."""
    return arrays(data, spec, n, file_name, labelled=False)[0]


def arrays(data: bytes, spec: dict, n: int, file_name: str, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    shape = (n, *spec["shape"][1:])
    expected = ["x.npy", "y.npy"] if labelled else ["x.npy"]
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = sorted(archive.namelist())
            if names != expected:
                raise TestSplitError(f"{file_name} must hold exactly {' and '.join(expected)}, not {', '.join(names[:4])}")
            x = member(archive, "x.npy", np.dtype(spec["dtype"]), shape, file_name)
            y = member(archive, "y.npy", np.dtype(np.int64), (n,), file_name) if labelled else None
    except TestSplitError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
        raise TestSplitError(f"{file_name} is not a readable .npz file: {str(err)[:200]}") from None
    return x, y


def member(archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple, file_name: str) -> np.ndarray:
    info = archive.getinfo(name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise TestSplitError(f"{file_name}: {name} must be stored or DEFLATE-compressed (np.savez_compressed); "
                             "export the run again")
    needed = int(np.prod(shape)) * dtype.itemsize
    if needed > MAX_ARRAY_BYTES or info.file_size > needed + _NPY_HEADER_MAX:
        raise TestSplitError(f"{file_name}: {name} declares {info.file_size} bytes; {list(shape)} {dtype} needs "
                             f"{needed} (at most {MAX_ARRAY_BYTES} are read)")
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise TestSplitError(f"{file_name}: {name} has .npy format version {version}")
        found_shape, fortran, found_dtype = read_header(stream, max_header_size=_NPY_HEADER_MAX)
        if found_dtype != dtype or tuple(found_shape) != shape or fortran:
            raise TestSplitError(f"{file_name}: {name} is {list(found_shape)} {found_dtype}, not the model's "
                                 f"{list(shape)} {dtype}")
        values = stream.read(needed)
        if len(values) != needed or stream.read(1):
            raise TestSplitError(f"{file_name}: {name} does not hold exactly {list(shape)} {dtype}")
    return np.frombuffer(bytearray(values), dtype).reshape(shape)  # writable, as np.load's arrays are
