"""Request IDs (serving/request_ids.py): every answer carries X-Request-ID, the client's where it is
usable, else a new one; each prediction echoes it as its `id`; a log line written while a request is
handled carries it. In-process (FastAPI's TestClient) and on a bare ASGI app."""
import logging
import re

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.request_ids import RequestIdFilter, RequestIds
from tests.helpers import digit_png

NEW = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("sent, kept", [
    ("order-17", True), ("a.b:c_d-E9", True), ("x" * 128, True),
    ("x" * 129, False), ("has space", False), ("", False), ("ümlaut", False), ("a/b", False), ("a\tb", False),
])
def test_a_usable_request_id_is_echoed_and_any_other_replaced(client, test_digits, sent, kept):
    response = client.post("/predict", files={"file": ("d.png", digit_png(test_digits[0][0]))},
                           headers={"X-Request-ID": sent.encode("utf-8")})
    returned = response.headers["x-request-id"]
    assert returned == sent if kept else NEW.fullmatch(returned)
    assert response.json()["predictions"][0]["id"] == returned


def test_every_answer_carries_one_and_several_inputs_get_an_id_each(client, test_digits):
    images = test_digits[0]
    files = [("file", (f"d{i}.png", digit_png(images[i]))) for i in range(3)]
    answer = client.post("/predict", files=files, headers={"X-Request-ID": "batch-9"})
    assert [p["id"] for p in answer.json()["predictions"]] == ["batch-9/0", "batch-9/1", "batch-9/2"]
    for response in (client.get("/health"), client.get("/nowhere"), client.post("/predict", content=b"junk"),
                     client.get("/models/unknown")):
        assert NEW.fullmatch(response.headers["x-request-id"]), response.status_code
    two = [client.get("/health").headers["x-request-id"] for _ in range(2)]
    assert two[0] != two[1]


def test_two_request_id_headers_are_one_too_many():
    app = RequestIds(PlainTextResponse("ok"))
    response = TestClient(app).get("/", headers=[("X-Request-ID", "a"), ("X-Request-ID", "b")])
    assert NEW.fullmatch(response.headers["x-request-id"])


def test_a_log_line_written_while_a_request_is_handled_carries_its_id(caplog):
    async def handler(request):
        logging.getLogger("digitserve").warning("handling it")
        return PlainTextResponse("ok")
    app = RequestIds(Starlette(routes=[Route("/", handler)]))
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.WARNING, logger="digitserve"):
        TestClient(app).get("/", headers={"X-Request-ID": "complaint-42"})
        logging.getLogger("digitserve").warning("not about a request")
    assert [(r.message, r.request_id) for r in caplog.records] == [("handling it", "complaint-42"),
                                                                   ("not about a request", "-")]


def test_an_internal_error_answers_with_the_request_id_too(client, test_digits, monkeypatch):
    async def fails(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(client.app.state.service, "prepare", fails)
    response = client.post("/predict", files={"file": ("d.png", digit_png(test_digits[0][0]))},
                           headers={"X-Request-ID": "bug-report-1"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "bug-report-1"
