"""digitserve-predict (serving/predict.py): files, folders and globs; jsonl and csv; failed files as
rows (exit 1); a URL that answers nothing, --url with --exports, and an exports folder with no usable
model (exit 2, one message); the two modes' rows identical; a server at --max-queue 1 under the
client's own load, every image answered (retries); and the examples of docs/api.md's "Python client
and batch prediction", run as written (bar the address and the exports folder)."""
import csv
import json
import re
import shutil

import httpx
import numpy as np
import pytest

from bench.harness import ROOT, copy_committed, free_port, running_server
from serving import predict
from tests.helpers import digit_png, flip_last_byte, tampered

COMMITTED = ("digits-cnn", "digits-mlp", "digits-photo-cnn", "svhn-synthetic-cnn")
DOCS = (ROOT / "docs" / "api.md").read_text()
SECTION = DOCS[DOCS.index("## Python client and batch prediction"):DOCS.index("## Outside this checkout")]
CLI_EXAMPLES = [line for line in SECTION.splitlines() if line.startswith("digitserve-predict ")]


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("committed")
    copy_committed(folder, *COMMITTED)
    return folder


@pytest.fixture(scope="module")
def server(committed):
    """One HTTP process taking one inference request at a time: the client's own concurrency is load."""
    with running_server(committed, "--workers", "1", "--max-queue", "1") as process:
        yield process


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """digits/ (12 test digits), digits/deeper/ (4), the samples, a broken PNG and a text file."""
    root = tmp_path_factory.mktemp("tree")
    with np.load(ROOT / "exports" / "digits-cnn" / "test_set.npz") as data:
        x = data["x"][:16, 0]
    (root / "digits" / "deeper").mkdir(parents=True)
    for i, image in enumerate(x):
        (root / "digits" / ("deeper" if i >= 12 else "") / f"{i:02d}.png").write_bytes(digit_png(image))
    for sample in ("digit-8x8-2.png", "house-number-32x32-6.png", "photo-4.jpg"):
        shutil.copy(ROOT / "samples" / sample, root / sample)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image")
    return root


def rows_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_files_folders_and_globs_expand_in_order(tree):
    found = predict.expand([str(tree / "digits"), str(tree / "*.jpg"), str(tree / "**" / "0[0-1].png"),
                            str(tree / "notes.txt"), str(tree / "missing.png"), str(tree / "none-*.png")])
    relative = [p.removeprefix(str(tree) + "/") for p in found]
    assert relative == ([f"digits/{i:02d}.png" for i in range(12)] + [f"digits/deeper/{i:02d}.png" for i in range(12, 16)]
                        + ["photo-4.jpg", "notes.txt", "missing.png", "none-*.png"])  # a folder's text files skipped


def test_url_rows_in_jsonl_failed_files_are_rows_and_exit_1(server, tree, capsys):
    status = predict.main([str(tree), str(tree / "missing.png"), "--url", server.url])
    out, err = capsys.readouterr()
    rows = {r["path"].removeprefix(str(tree) + "/"): r for r in rows_of(out)}
    assert status == 1 and len(rows) == 21
    assert rows["broken.png"]["error"].startswith("BadInput (400): truncated or corrupt image") or \
        rows["broken.png"]["error"].startswith("BadInput (400): corrupt image")
    assert rows["missing.png"]["error"] == "UnreadableFile: cannot read it: No such file or directory"
    assert rows["photo-4.jpg"]["error"].startswith("BadInput (422): image is 240x200")
    assert rows["house-number-32x32-6.png"] == {**rows["house-number-32x32-6.png"], "label": 6,
                                                "model": "svhn-synthetic-cnn", "decision": "digit", "error": None}
    assert all(set(r) == set(predict.COLUMNS) for r in rows.values())
    assert re.search(r"21 images in [\d.]+ s \([\d,]+ images/s; .*\): 18 answered, 3 failed", err), err
    assert "1 × UnreadableFile: cannot read it: No such file or directory" in err


def test_csv_to_a_file_with_options(server, tree, tmp_path):
    out = tmp_path / "rows.csv"
    status = predict.main([str(tree / "*.png"), str(tree / "*.jpg"), "--url", server.url, "--resize", "--format",
                           "csv", "--out", str(out), "--model", "digits-photo-cnn"])
    rows = list(csv.DictReader(out.open()))
    assert status == 1 and [r["path"].removeprefix(str(tree) + "/") for r in rows] == [
        "broken.png", "digit-8x8-2.png", "house-number-32x32-6.png", "photo-4.jpg"]
    assert list(rows[0]) == list(predict.COLUMNS) and rows[0]["label"] == "" and rows[0]["error"]
    assert [r["label"] for r in rows[1:]] == ["2", "6", "4"] and {r["model"] for r in rows[1:]} == {"digits-photo-cnn"}
    assert all(re.fullmatch(r"(\d( \d)*)?", r["candidates"]) for r in rows[1:]) and rows[1]["candidates"] == "2"


def test_the_two_modes_give_identical_rows(server, committed, tree, cli, tmp_path):
    """--exports in two forked worker processes (groups of 8), against the server's answers."""
    by_url, offline = tmp_path / "url.jsonl", tmp_path / "exports.jsonl"
    common = [str(tree), "--resize", "--batch-size", "8"]
    assert cli("serving.predict", *common, "--url", server.url, "--out", str(by_url)).returncode == 1
    result = cli("serving.predict", *common, "--exports", str(committed), "--concurrency", "2", "--out", str(offline))
    assert result.returncode == 1, result.stderr
    url_rows, offline_rows = rows_of(by_url.read_text()), rows_of(offline.read_text())
    assert len(url_rows) == 20 and [r["error"] is None for r in url_rows].count(False) == 1  # broken.png
    assert offline_rows == url_rows


def test_max_queue_1_every_image_answered_by_retrying(server, tree, capsys):
    def shed():
        text = httpx.get(server.url + "/metrics").text
        return float(re.search(r"^digitserve_shed_requests_total (\S+)", text, re.M).group(1))
    before = shed()
    status = predict.main([str(tree / "digits"), "--url",
                           server.url, "--concurrency", "6", "--batch-size", "2"])
    rows = rows_of(capsys.readouterr().out)
    assert status == 0 and len(rows) == 16 and all(r["error"] is None for r in rows)
    assert shed() > before  # some requests were refused at capacity and retried


def test_a_url_that_answers_nothing_is_one_line_and_exit_2(cli, tree):
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("serving.predict", str(tree), "--url", url)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"digitserve-predict: error: {url} does not answer: Connection refused\n"


def test_bad_flags_and_unusable_exports_exit_2(tree, tmp_path, capsys, server, committed, cli):
    with pytest.raises(SystemExit) as exited:
        predict.main([str(tree), "--url", "http://127.0.0.1:8000", "--exports", "exports"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert predict.main([str(tree), "--exports", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err == (f"digitserve-predict: error: no usable model in {tmp_path / 'empty'} (the "
                                       "folder is empty)\n")
    tampered(ROOT / "exports" / "digits-cnn", tmp_path / "broken", flip_last_byte)
    assert predict.main([str(tree), "--exports", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert "no usable model" in err and "digits-cnn: model.onnx does not match the sha256" in err
    forked = cli("serving.predict", str(tree), "--exports", str(tmp_path / "broken"), "--concurrency", "2",
                 "--batch-size", "8")  # said by the worker processes
    assert forked.returncode == 2 and forked.stderr == err and forked.stdout == ""
    assert predict.main([str(tree), "--exports", str(tmp_path / "nowhere")]) == 2
    assert predict.main([str(tree), "--url", server.url, "--model", "nope"]) == 2
    assert predict.main([str(tree), "--exports", str(committed), "--model", "nope", "--concurrency", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("nope") == 2


def test_the_docs_have_cli_examples():
    assert len(CLI_EXAMPLES) >= 2 and all(re.search(r"# \d+ rows, exit \d$", line) for line in CLI_EXAMPLES)


@pytest.mark.parametrize("example", CLI_EXAMPLES, ids=lambda line: line[:50])
def test_docs_cli_example_answers_each_sample_its_digit(example, server, committed, cli, tmp_path):
    rows, status = map(int, re.search(r"# (\d+) rows, exit (\d)$", example).groups())
    command = re.sub(r"\s+#.*$", "", example).replace("http://127.0.0.1:8000", server.url)
    command = command.replace("--exports exports", f"--exports {committed}").replace(
        "--out answers.csv", f"--out {tmp_path / 'answers.csv'}")
    args = [arg.strip("'") for arg in command.split()[1:]]
    result = cli("serving.predict", *args)
    assert result.returncode == status, result.stderr
    if "--out" in args:
        answered = list(csv.DictReader((tmp_path / "answers.csv").open()))
    else:
        answered = rows_of(result.stdout)
    assert len(answered) == rows
    for row in answered:  # samples/NAME-DIGIT.ext
        assert str(row["label"]) == re.search(r"(\d)\.\w+$", row["path"]).group(1), row
