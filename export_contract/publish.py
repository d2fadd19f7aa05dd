"""The publish protocol, both halves: how training puts a model folder into an exports folder, and
which folders a server takes for models.

- A folder is written under a hidden name (`.NAME.*.tmp`) and renamed into place only once whole;
  a server never reads hidden folders, so it sees no half-written model. An existing folder is
  replaced in one step where the filesystem can swap two folders (Linux renameat2 exchange: ext4,
  xfs, tmpfs, overlayfs), so a server watching it never finds it missing.
- A published model is not silently replaced by a worse one: a new export of the same name whose
  test figures are worse on the same test split, or that cannot be compared (another split), needs
  `replace=True` (`--replace` on the command line).
"""
import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import export_contract as contract


class PublishError(Exception):
    """The folder would replace a published model it must not replace silently; the message says why."""


def model_folders(exports_dir: Path) -> list[Path]:
    """Every model folder, in name order: the sub-folders, but not hidden ones (exports being written)."""
    with os.scandir(exports_dir) as entries:
        return sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir())


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temporary sibling of `final` (hidden: a server never reads it); rename it into place
    only if the block succeeds. A crash leaves no half-written folder under `final`'s name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; others (a container's user) must read it
    try:
        yield staging
        if not final.exists():
            staging.rename(final)
        elif exchange(staging, final):
            shutil.rmtree(staging)  # it holds the previous folder now
        else:
            retired = staging.with_suffix(".old")
            final.rename(retired)
            staging.rename(final)
            shutil.rmtree(retired)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or the
    filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_replacement(final: Path, manifest: dict, replace: bool) -> None:
    """Raise PublishError where the export `manifest` describes must not silently replace `final`."""
    try:
        published = json.loads((final / contract.MANIFEST_FILE).read_text())
        old, new = published["metrics"]["test"], manifest["metrics"]["test"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing published there, or nothing a server would serve
    if replace:
        return
    if test_split_of(published) != test_split_of(manifest):
        raise PublishError(f"{final} holds a model measured on another test split ({old['errors']}/{old['n']} "
                           f"errors there): export under another name (--name), or pass --replace")
    if (new["errors"], new["nll"]) > (old["errors"], old["nll"]):
        raise PublishError(f"{final} holds a better model ({old['errors']}/{old['n']} test errors, NLL "
                           f"{old['nll']:.4f}; this one {new['errors']}/{new['n']}, {new['nll']:.4f}): export under "
                           f"another name (--name), or pass --replace")


def test_split_of(manifest: dict) -> tuple:
    """What identifies the split a manifest's test figures were measured on."""
    data = manifest.get("data", {})
    return data.get("name"), manifest["metrics"]["test"]["n"], data.get("test_file", {}).get("md5")


def publish(export_folder: Path, exports_dir: Path, replace: bool = False) -> Path:
    """Copy a finished export into a serving exports folder, replacing any export of that name atomically
    (unless it is better, or not comparable, and `replace` is not given: PublishError)."""
    final = exports_dir / export_folder.name
    check_replacement(final, json.loads((export_folder / contract.MANIFEST_FILE).read_text()), replace)
    with atomic_folder(final) as staging:
        shutil.copytree(export_folder, staging, dirs_exist_ok=True)
    return final
