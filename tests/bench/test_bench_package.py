"""bench/ as a package: every script runs as `.venv/bin/python -m bench.NAME` from the repository root
and says so in its docstring, nothing in bench/ or tests/ edits the import path, and the load tools
(and the harness they share with the tests) import no torch. Reads the files, and imports the load
tools in one fresh interpreter."""
import ast
import subprocess
import sys

from bench.harness import ROOT

SCRIPTS = sorted(path.stem for path in (ROOT / "bench").glob("*.py") if path.stem not in {"__init__", "harness"})
LOAD_TOOLS = ["load", "serve", "fastapi_baseline", "overload", "soak", "hostile", "decode_bomb", "exhaustion",
              "reload_memory", "insight"]


def test_every_script_shows_its_module_command():
    for name in SCRIPTS:
        docstring = ast.get_docstring(ast.parse((ROOT / "bench" / f"{name}.py").read_text()))
        assert docstring and f".venv/bin/python -m bench.{name}" in docstring, name


def test_nothing_edits_the_import_path():
    files = [path for folder in ("bench", "tests") for path in (ROOT / folder).rglob("*.py")]
    edits = [f"{path.relative_to(ROOT)}:{number}" for path in files
             for number, line in enumerate(path.read_text().splitlines(), 1) if "sys" + ".path" in line]
    assert edits == []


def test_the_load_tools_and_the_harness_import_no_torch():
    code = (f"import sys\nfor name in {['harness', *LOAD_TOOLS]!r}:\n    __import__('bench.' + name)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_connections_by_process_counts_what_each_process_accepted_on_the_port():
    """bench.serve's connections column: the accepting side's sockets on the port, per process holding
    them (here this one: 3 accepted; the clients' own sockets are on other local ports)."""
    import socket

    from bench.harness import connections_by_process
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [listener.accept()[0] for _ in clients]
        try:
            assert connections_by_process(port) == [3]
        finally:
            for sock in clients + accepted:
                sock.close()
