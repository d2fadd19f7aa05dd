"""Memory across reloads: the same model published again and again into a running server, each time
a new folder (renamed into place) that every HTTP process checks, loads, warms, verifies on its test
split and swaps in, while a little traffic keeps every version in use. Target: after 100 reloads the
server's processes together hold at most 50 MB more resident memory than after the first.

    .venv/bin/python -m bench.reload_memory [--reloads 100] [--model svhn-synthetic-cnn]
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.harness import copy_committed, process_tree, rss_mb, running_server
from export_contract.publish import atomic_folder  # what --export-to and publish use


def republish(source: Path, exports: Path) -> None:
    """The same files as a new folder, renamed into place (a new inode: the server reloads it)."""
    with atomic_folder(exports / source.name) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)


def total_rss(root: int) -> float:
    return sum(rss_mb(pid) or 0 for pid in process_tree(root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reloads", type=int, default=100)
    parser.add_argument("--model", default="svhn-synthetic-cnn")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reload-memory-"))
    exports, source = work / "exports", work / "source" / args.model
    copy_committed(exports, "digits-cnn", args.model)
    copy_committed(source.parent, args.model)
    shape = (32, 32, 3) if args.model.startswith("svhn") else (8, 8)  # JSON pixels: H x W (x RGB)
    body = {"model": args.model, "pixels": [np.zeros(shape, dtype=np.uint8 if len(shape) == 3 else float).tolist()]}
    try:
        with running_server(exports, "--reload-interval", "0") as server:  # reloads on request only, counted
            samples, started = [], time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for reload in range(1, args.reloads + 1):
                    republish(source, exports)
                    changes = client.post("/models/reload").json()["changes"]
                    assert [c["event"] for c in changes] == ["served"], changes
                    for _ in range(20):  # traffic on the new version, in whichever process answers
                        assert client.post("/predict", json=body).status_code == 200
                    if reload == 1 or reload % 10 == 0 or reload == args.reloads:
                        time.sleep(1)  # the other processes' reloads (forwarded by SIGHUP) have finished
                        samples.append((reload, total_rss(server.process.pid)))
                        print(f"reload {reload:4d}: {samples[-1][1]:7.1f} MB resident, all processes", flush=True)
            elapsed = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    growth = samples[-1][1] - samples[0][1]
    print(f"\n{args.reloads} reloads of {args.model} in {elapsed:.0f} s: {samples[0][1]:.1f} MB after the first, "
          f"{samples[-1][1]:.1f} MB after the last: {growth:+.1f} MB (target <= 50 MB)")


if __name__ == "__main__":
    main()
