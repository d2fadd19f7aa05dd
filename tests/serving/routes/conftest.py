"""The in-process app the route tests share (FastAPI's TestClient, no LitServe): the committed digits
models, a tiny SVHN-shaped export, and two broken folders, built once for every test in this folder."""
import json
import shutil

import pytest

import export_contract as contract
from bench.harness import copy_committed
from tests.helpers import build_svhn_export, in_process


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    copy_committed(folder, "digits-mlp", "digits-cnn")
    build_svhn_export(folder)
    broken = folder / "digits-broken"
    shutil.copytree(folder / "digits-mlp", broken)
    manifest = json.loads((broken / "model.json").read_text())
    manifest["name"] = "digits-broken"
    (broken / "model.json").write_text(json.dumps(manifest))
    (broken / "model.onnx").write_bytes(b"tampered")
    garbage = folder / "digits-garbage"  # hashes match, but the graph is not ONNX
    shutil.copytree(folder / "digits-mlp", garbage)
    (garbage / "model.onnx").write_bytes(b"not a graph")
    manifest = json.loads((garbage / "model.json").read_text())
    manifest["name"] = "digits-garbage"
    manifest["artifacts"]["onnx"]["sha256"] = contract.sha256(garbage / "model.onnx")
    (garbage / "model.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="session")
def client(exports):
    with in_process(exports, max_batch_size=32, batch_timeout=0.01) as c:
        yield c

