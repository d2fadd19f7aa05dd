"""The routes, in-process (FastAPI's TestClient): prediction, models, v2, errors, metrics, auth.
Process, signal and multi-worker behaviour: tests/test_server.py, against a real server."""
import base64
import io
import json
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime
import pytest
import scipy.io
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import export_contract as contract
from export_contract import svhn_mat
from serving import resize
from serving import inference
from serving_helpers import build_svhn_export, copy_committed, in_process, png, png_chunk, saved, synthetic_svhn
from training import digits

API_KEY = "test-key-123"
VALID_DIGIT = png(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def client(exports):
    with in_process(exports, max_batch_size=32, batch_timeout=0.01) as c:
        yield c


@pytest.fixture(scope="module")
def test_digits():
    images, labels = digits.split_arrays("test")
    return images, labels


def digit_png(image: np.ndarray) -> bytes:
    return png(np.round(image * 255 / 16).astype(np.uint8), "L")


def offline(exports, name, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(exports / name / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.exp(session.run(None, {"pixels": x})[0])


# --- health, readiness, models ---

def test_health_ready_and_v2_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and set(ready["models"]) == {"digits-cnn", "digits-mlp", "svhn-tiny"}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["name"] == "digitserve"


def test_models_list_metrics_and_unavailable_reason(client, exports):
    body = client.get("/models").json()
    models = {m["name"]: m for m in body["models"]}
    assert body["backend"] == "onnx"
    manifest = json.loads((exports / "digits-cnn" / "model.json").read_text())
    cnn = models["digits-cnn"]
    assert cnn["status"] == "ready" and cnn["default_for"] == "8x8" and cnn["task"] == "digits"
    assert cnn["test"]["errors"] == manifest["metrics"]["test"]["errors"] and cnn["test"]["n"] == 447
    assert cnn["best_epoch"] == manifest["metrics"]["best_epoch"] + 1  # counted from 1, as training says it
    assert cnn["input"]["dtype"] == "float32"
    assert models["svhn-tiny"]["default_for"] == "32x32"
    assert models["digits-broken"]["status"] == "unavailable"
    assert "sha256" in models["digits-broken"]["reason"]
    assert models["digits-garbage"]["status"] == "unavailable"
    assert "ONNX Runtime cannot load model.onnx" in models["digits-garbage"]["reason"]


def test_model_detail_and_curves(client):
    detail = client.get("/models/digits-mlp").json()
    assert len(detail["manifest"]["metrics"]["val_nll"]) == detail["epochs_run"]
    curves = client.get(detail["curves_url"])
    assert curves.status_code == 200 and curves.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/models/nope").status_code == 404
    broken = client.get("/models/digits-broken").json()  # unavailable: why, and its history, but no manifest
    assert broken["status"] == "unavailable" and "does not match the sha256" in broken["reason"]
    assert broken["history"][-1]["event"] == "rejected" and "manifest" not in broken
    assert client.get("/models/digits-broken/curves.png").status_code == 503


def test_evaluate_matches_manifest(client):
    body = client.post("/models/digits-cnn/evaluate").json()
    assert body["agrees"] is True and body["served"]["n"] == 447
    assert body["served"]["errors"] == body["manifest"]["errors"]
    svhn = client.post("/models/svhn-tiny/evaluate").json()  # its 200 test crops travel in the export
    assert svhn["agrees"] is True and svhn["served"]["n"] == 200


def test_evaluate_reads_an_svhn_test_file_from_the_data_dir(tmp_path):
    """The official SVHN test file is too large to carry in an export: /evaluate reads it from
    --data-dir, checked against the MD5 the manifest recorded, and says plainly what is missing."""
    x, y = synthetic_svhn(200, 2)  # the test crops build_svhn_export measures on, in the official layout
    data = tmp_path / "data"
    data.mkdir()
    scipy.io.savemat(data / "test_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None]})
    test_file = {"file": "test_32x32.mat", "md5": svhn_mat.md5(data / "test_32x32.mat"), "n": 200}
    build_svhn_export(tmp_path / "exports", "svhn-cnn", data={"name": "svhn", "description": "SVHN", "test_file": test_file})
    assert "test_set" not in json.loads((tmp_path / "exports" / "svhn-cnn" / "model.json").read_text())
    with in_process(tmp_path / "exports", data_dir=data) as c:
        body = c.post("/models/svhn-cnn/evaluate").json()
        assert body["agrees"] is True and body["served"]["n"] == 200
        assert c.get("/models").json()["models"][0]["data"]["test_file"] == test_file
    with in_process(tmp_path / "exports") as c:
        answer = c.post("/models/svhn-cnn/evaluate")
        assert answer.status_code == 422 and "start the server with --data-dir" in answer.json()["error"]
    other = tmp_path / "other"
    other.mkdir()
    with in_process(tmp_path / "exports", data_dir=other) as c:  # given a data folder, the model is verified
        detail = c.get("/models/svhn-cnn").json()
        assert detail["status"] == "unavailable" and "data folder has no test_32x32.mat" in detail["reason"]
        scipy.io.savemat(other / "test_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": np.ones((200, 1))})
        (change,) = c.post("/models/reload").json()["changes"]  # the data folder changed: checked again
        assert change["event"] == "rejected" and "is not the file model 'svhn-cnn' was tested on" in change["reason"]
        shutil.copy(data / "test_32x32.mat", other / "test_32x32.mat")
        (change,) = c.post("/models/reload").json()["changes"]
        assert change["event"] == "served" and c.get("/models/svhn-cnn").json()["verified"]["reproduced"] is True
        (other / "test_32x32.mat").write_bytes(b"replaced since")
        answer = c.post("/models/svhn-cnn/evaluate")
        assert answer.status_code == 422 and "is not the file model 'svhn-cnn' was tested on" in answer.json()["error"]
        assert str(tmp_path) not in answer.text  # the server's folders are not the client's business


# --- prediction ---

def test_predict_multipart_routes_by_size_and_matches_offline(client, exports, test_digits):
    images, labels = test_digits
    svhn_x, svhn_y = synthetic_svhn(3, seed=7)
    files = [("file", (f"d{i}.png", digit_png(images[i]), "image/png")) for i in range(3)]
    files.append(("file", ("s.png", png(svhn_x[0].transpose(1, 2, 0), "RGB"), "image/png")))
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["model"] for p in predictions] == ["digits-cnn"] * 3 + ["svhn-tiny"]
    assert [p["input"] for p in predictions] == ["d0.png", "d1.png", "d2.png", "s.png"]
    # the PNG round trip quantises 0..16 to 0..255 and back; the offline reference does the same
    quantised = (np.round(images[:3] * 255 / 16) * (16 / 255)).astype(np.float32)[:, None]
    expected = offline(exports, "digits-cnn", quantised)
    for p, probs in zip(predictions[:3], expected):
        assert np.allclose(p["probabilities"], probs, atol=2e-6)
        assert p["label"] == int(np.argmax(probs)) and abs(sum(p["probabilities"]) - 1) < 1e-4
    assert predictions[3]["label"] == svhn_y[0]


def test_predict_json_base64_and_pixels_with_explicit_model(client, test_digits):
    images, labels = test_digits
    encoded = base64.b64encode(digit_png(images[5])).decode()
    body = {"model": "digits-mlp", "images": [f"data:image/png;base64,{encoded}"], "pixels": [images[6].tolist()]}
    predictions = client.post("/predict", json=body).json()["predictions"]
    assert [p["model"] for p in predictions] == ["digits-mlp", "digits-mlp"]
    assert [p["input"] for p in predictions] == ["images[0]", "pixels[0]"]
    assert predictions[1]["label"] == labels[6]
    version = client.get("/models/digits-mlp").json()["version"]
    assert predictions[0]["version"] == version


def test_invert_and_exact_sizes(client, test_digits):
    images, labels = test_digits
    light = 255 - np.round(images[10] * 255 / 16).astype(np.uint8)  # dark ink on white paper
    normal = client.post("/predict?model_input=true", files={"file": ("d.png", digit_png(images[10]))}
                         ).json()["predictions"][0]
    inverted = client.post("/predict?invert=true", files={"file": ("d.png", png(light, "L"))}).json()["predictions"][0]
    assert inverted["label"] == normal["label"]
    assert np.allclose(inverted["probabilities"], normal["probabilities"], atol=1e-5)
    assert np.allclose(normal["model_input"], images[10], atol=0.04)  # what the model saw: the digit (8-bit PNG)
    big = np.asarray(Image.fromarray(np.round(images[10] * 255 / 16).astype(np.uint8)).resize((64, 64), Image.NEAREST))
    refused = client.post("/predict", files={"file": ("big.png", png(big, "L"))})
    assert refused.status_code == 422 and "8x8" in refused.json()["error"] and "32x32" in refused.json()["error"]


# --- resize=true: photos and drawings turned into what the models were trained on ---

def on_paper(digit: np.ndarray, scale: int, top: int, left: int, size=(300, 260), dark_ink=True,
             paper: int | None = None, contrast: int = 200) -> np.ndarray:
    """An 8x8 digit drawn `scale` times larger at (top, left) on a large sheet, as a scan would show it:
    ink `contrast` levels from the paper, darker or brighter."""
    ink = np.kron(digit / 16, np.ones((scale, scale)))
    sheet = np.zeros(size)
    sheet[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    paper = (235 if dark_ink else 20) if paper is None else paper
    values = paper - contrast * sheet if dark_ink else paper + contrast * sheet
    return np.round(values).astype(np.uint8)


def test_resize_recovers_the_dataset_digit_from_an_enlarged_scan(exports, test_digits):
    """The preprocessing inverts the dataset's own: test digits enlarged and placed anywhere on a
    large sheet classify as the 8x8 originals do (the former whole-image shrink got ~10 % right)."""
    images, _ = test_digits
    rng = np.random.default_rng(0)
    fitted = np.stack([resize.digit_bitmap_counts(
        on_paper(digit, int(rng.integers(12, 25)), int(rng.integers(0, 100)), int(rng.integers(0, 60))), None)
        for digit in images[:100]])
    assert np.abs(fitted - images[:100]).mean() < 2.0  # counts on 0..16
    exact, recovered = (offline(exports, "digits-cnn", x[:, None].astype(np.float32)).argmax(1)
                        for x in (images[:100], fitted))
    assert (exact == recovered).mean() >= 0.95


def test_resize_detects_the_ink_polarity_and_ignores_position_and_scale(test_digits):
    images, _ = test_digits
    reference = resize.digit_bitmap_counts(on_paper(images[5], 20, 10, 10), None)
    moved = resize.digit_bitmap_counts(on_paper(images[5], 20, 130, 90), None)
    assert np.array_equal(moved, reference)
    # counts on 0..16: within 8-bit rounding (polarity), and resampling (a sheet over WORK_SIDE)
    for sheet, tolerance in ((on_paper(images[5], 20, 10, 10, dark_ink=False), 0.25),
                             (on_paper(images[5], 20, 60, 40, size=(500, 700)), 0.5)):
        assert np.abs(resize.digit_bitmap_counts(sheet, None) - reference).max() < tolerance
    told = resize.digit_bitmap_counts(on_paper(images[5], 20, 10, 10), True)
    assert np.array_equal(told, reference)


def test_resize_through_the_api_shows_what_the_model_saw(client, test_digits):
    images, labels = test_digits
    sheet = on_paper(images[30], 18, 40, 50)
    answer = client.post("/predict", params={"resize": "true", "model_input": "true"},
                         files={"file": ("scan.png", png(sheet, "L"))})
    assert answer.status_code == 200
    prediction = answer.json()["predictions"][0]
    assert prediction["model"] == "digits-cnn" and prediction["label"] == labels[30]
    again = client.post("/predict", json={"pixels": [prediction["model_input"]]}).json()["predictions"][0]
    assert again["label"] == prediction["label"]
    assert np.allclose(again["probabilities"], prediction["probabilities"], atol=1e-4)


def test_resize_finds_dark_ink_on_dim_paper(test_digits):
    images, _ = test_digits
    """Paper darker than mid-grey (115 of 255) with black ink used to be read as bright ink: 422."""
    bright = resize.digit_bitmap_counts(on_paper(images[5], 20, 10, 10), None)
    for dim in (on_paper(images[5], 20, 10, 10, paper=115, contrast=110),  # dark ink
                on_paper(images[5], 20, 10, 10, paper=140, contrast=110, dark_ink=False)):  # chalk, brighter
        assert np.abs(resize.digit_bitmap_counts(dim, None) - bright).max() < 0.5


def test_resize_keeps_one_pixel_strokes(client):
    """A 1-px pen on a large canvas (a median filter used to erase it: "no digit found")."""
    sheet = np.full((600, 600), 255, np.uint8)
    sheet[120:480, 300] = 0  # a "1"
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("one.png", png(sheet, "L"))})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == 1


@pytest.mark.parametrize("mark", [(slice(98, 101), slice(98, 101)), (slice(90, 108), slice(90, 108))])
def test_resize_of_a_dot_or_a_tap_is_not_a_digit(client, mark):
    """A dot used to be blown up to fill the bitmap and classified at p = 1.0."""
    sheet = np.full((200, 200), 255, np.uint8)
    sheet[mark] = 0
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("dot.png", png(sheet, "L"))})
    assert answer.status_code == 422 and "crop the photo to the digit" in answer.json()["error"]


def test_resized_grey_rgb_photos_go_to_digits_colour_ones_to_svhn(client, test_digits):
    images, labels = test_digits
    grey = np.repeat(on_paper(images[30], 18, 40, 50)[..., None], 3, axis=2)  # a scan saved as RGB (JPEG, canvas)
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("scan.png", png(grey, "RGB"))})
    assert answer.json()["predictions"][0]["model"] == "digits-cnn"
    warm = np.clip(grey * np.array([1.0, 0.94, 0.82]), 0, 255).astype(np.uint8)  # a scan under a warm lamp
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("warm.png", png(warm, "RGB"))})
    assert answer.json()["predictions"][0]["model"] == "digits-cnn"  # was sent to the house-number model
    assert "no colour" in answer.json()["predictions"][0]["routed"]
    photo = grey.copy()
    photo[:, :130, 0], photo[:, 130:, 2] = 255, 255  # half red, half blue: a colour photo
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("photo.png", png(photo, "RGB"))})
    assert answer.json()["predictions"][0]["model"] == "svhn-tiny"


def test_an_image_sent_as_the_body_is_an_upload(client, test_digits):
    images, labels = test_digits
    answer = client.post("/predict", content=digit_png(images[3]), headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == labels[3]
    empty = client.post("/predict", content=b"", headers={"content-type": "image/jpeg"})
    assert empty.status_code == 422 and "no image" in empty.json()["error"]


@pytest.mark.parametrize("where", ["form", "json"])
def test_an_option_in_the_body_wins_over_the_query(client, test_digits, where):
    images, _ = test_digits
    big = np.kron(np.round(images[10] * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8))  # 32x32, grey

    def send(params: dict):  # resize=false in the body, the query's resize=true to be overridden
        if where == "form":
            return client.post("/predict", params=params, files={"file": ("d.png", png(big, "L"))},
                               data={"resize": "false"})
        return client.post("/predict", params=params, json={"resize": False, "images": [
            base64.b64encode(png(big, "L")).decode()]})
    answer = send({"resize": "true", "invert": "bogus-but-checked"})
    assert answer.status_code == 422 and "invert must be true or false" in answer.json()["error"]
    answer = send({"resize": "true"})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["model"] == "svhn-tiny"  # exact 32x32


def test_model_input_comes_when_asked_and_only_with_uploads(client, test_digits):
    """20 KB for a 32x32 upload: only when asked (the page asks); a pixels[] entry is what the client sent."""
    images, _ = test_digits
    upload = {"file": ("d.png", digit_png(images[0]))}
    assert "model_input" not in client.post("/predict", files=upload).json()["predictions"][0]
    assert "model_input" in client.post("/predict", data={"model_input": "true"}, files=upload).json()["predictions"][0]
    answer = client.post("/predict", json={"pixels": [images[0].tolist()], "model_input": True}).json()["predictions"][0]
    assert "model_input" not in answer


@pytest.mark.parametrize("pixels", [np.full((120, 90), 200, np.uint8), np.full((120, 90), 200, np.uint8) + 
                                    np.random.default_rng(0).integers(0, 8, (120, 90), dtype=np.uint8)])
def test_resize_of_a_blank_image_says_no_digit_was_found(client, pixels):
    answer = client.post("/predict", params={"resize": "true"}, files={"file": ("blank.png", png(pixels, "L"))})
    assert answer.status_code == 422 and "no digit found" in answer.json()["error"]


def test_resize_of_a_colour_photo_cuts_the_centre_square_for_svhn(client):
    photo = np.zeros((64, 96, 3), np.uint8)
    photo[:, :16] = photo[:, -16:] = (0, 0, 255)  # blue beyond the centre square
    photo[:, 16:-16] = (255, 0, 0)
    answer = client.post("/predict", params={"resize": "true", "model_input": "true"},
                         files={"file": ("p.png", png(photo, "RGB"))})
    prediction = answer.json()["predictions"][0]
    assert prediction["model"] == "svhn-tiny"
    assert np.array_equal(np.unique(np.reshape(prediction["model_input"], (-1, 3)), axis=0), [[255, 0, 0]])


@pytest.mark.parametrize("kind", ["palette", "rgba", "16bit", "cmyk_jpeg", "gif", "webp", "bmp", "exif_rotated"])
def test_image_formats_and_modes(client, test_digits, kind):
    images, _ = test_digits
    gray = np.round(images[20] * 255 / 16).astype(np.uint8)
    reference = client.post("/predict", files={"file": ("d.png", png(gray, "L"))}).json()["predictions"][0]
    if kind == "palette":
        data = saved(Image.fromarray(gray, "L").convert("P"), "PNG")
    elif kind == "rgba":
        rgba = np.stack([gray, gray, gray, np.full_like(gray, 255)], -1)
        data = png(rgba, "RGBA")
    elif kind == "16bit":
        data = saved(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    elif kind == "cmyk_jpeg":
        data = saved(Image.fromarray(gray, "L").convert("CMYK"), "JPEG", quality=100)
    elif kind == "gif":
        frames = [Image.fromarray(gray, "L").convert("P"), Image.fromarray(255 - gray, "L").convert("P")]
        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
        data = buffer.getvalue()
    elif kind == "webp":
        data = saved(Image.fromarray(gray, "L"), "WEBP", lossless=True)
    elif kind == "bmp":
        data = saved(Image.fromarray(gray, "L"), "BMP")
    else:  # stored rotated 90 degrees, with EXIF orientation 6 saying "rotate back"
        image = Image.fromarray(np.rot90(gray, 1).copy(), "L")
        exif = Image.Exif()
        exif[0x0112] = 6
        data = saved(image, "PNG", exif=exif)
    response = client.post("/predict", files={"file": ("x", data)})
    assert response.status_code == 200, response.text
    got = response.json()["predictions"][0]
    tolerance = 0.05 if kind == "cmyk_jpeg" else 1e-4  # JPEG is lossy
    assert got["label"] == reference["label"]
    assert np.allclose(got["probabilities"], reference["probabilities"], atol=tolerance)


# --- bad input: right status, JSON error, and the service keeps serving ---

def bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels, with a tiny body."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("request_kwargs, status, message", [
    ({"files": {"file": ("x.png", b"hello, not an image")}}, 400, "not an image"),
    ({"files": {"file": ("x.png", png(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))[:300])}},
     400, "truncated"),
    ({"files": {"file": ("x.png", png(np.zeros((10, 12), np.uint8), "L"))}}, 422, "the served models take"),
    ({"json": {"pixels": [[[1, 2], [3, 4]]]}}, 422, "accepted"),
    ({"json": {"pixels": [[["a"] * 8] * 8]}}, 422, "numbers"),
    ({"json": {"pixels": [np.full((8, 8), 17).tolist()]}}, 422, "[0, 16]"),
    ({"json": {"images": "not-a-list"}}, 422, "images"),
    ({"json": {"images": ["%%%"]}}, 400, "base64"),
    ({"json": {}}, 422, "no image"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid JSON"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart/form-data, application/json or an image"),
    ({"json": {"model": "resnet", "pixels": [np.zeros((8, 8)).tolist()]}}, 404, "unknown model"),
    ({"json": {"model": "svhn-tiny", "pixels": [np.zeros((8, 8)).tolist()]}}, 422, "svhn"),
    ({"files": {"file": ("x.png", b"\0" * (1 << 20 + 1))}}, 413, "limit"),
    ({"files": {"file": ("bomb.png", bomb_png())}}, 413, "declares"),
])
def test_bad_input(client, request_kwargs, status, message):
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.get("/health").status_code == 200
    ok = client.post("/predict", json={"pixels": [np.zeros((8, 8)).tolist()]})
    assert ok.status_code == 200


def test_concurrent_mixed_requests_each_get_their_own_answer(client, exports, test_digits):
    images, _ = test_digits
    svhn_x, svhn_y = synthetic_svhn(100, seed=11)
    digit_pngs = [digit_png(images[i]) for i in range(120)]
    quantised = (np.round(images[:120] * 255 / 16) * (16 / 255)).astype(np.float32)[:, None]
    expected_digits = offline(exports, "digits-cnn", quantised)

    def one(i):
        if i % 2 == 0 and i // 2 < 120:
            data = digit_pngs[i // 2]
        else:
            data = png(svhn_x[i % 100].transpose(1, 2, 0), "RGB")
        return i, client.post("/predict", files={"file": (f"req{i}.png", data)})

    with ThreadPoolExecutor(32) as pool:  # requests in flight together on the app's event loop
        results = list(pool.map(one, range(240)))
    batch_sizes = []
    for i, response in results:
        assert response.status_code == 200, response.text
        (p,) = response.json()["predictions"]
        assert p["input"] == f"req{i}.png"
        if i % 2 == 0 and i // 2 < 120:
            assert p["model"] == "digits-cnn"
            assert np.allclose(p["probabilities"], expected_digits[i // 2], atol=2e-6)
        else:
            assert p["model"] == "svhn-tiny" and p["label"] == svhn_y[i % 100]
        batch_sizes.append(p["batch_size"])
    assert max(batch_sizes) > 1  # concurrent requests shared inference calls


# --- KServe v2 ---

def test_v2_metadata_and_infer_round_trip(client, exports, test_digits):
    images, _ = test_digits
    meta = client.get("/v2/models/digits-cnn").json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert client.get("/v2/models/digits-cnn/ready").status_code == 200
    x = images[:4, None].astype(np.float32)
    request = {"id": "req-42", "inputs": [{"name": "pixels", "shape": [4, 1, 8, 8], "datatype": "FP32",
                                           "data": x.ravel().tolist()}]}
    body = client.post("/v2/models/digits-cnn/infer", json=request).json()
    assert body["id"] == "req-42" and body["model_name"] == "digits-cnn"
    (output,) = body["outputs"]
    assert output["shape"] == [4, 10] and output["datatype"] == "FP32"
    log_probs = np.asarray(output["data"]).reshape(4, 10)
    assert np.allclose(np.exp(log_probs), offline(exports, "digits-cnn", x), atol=1e-5)

    svhn_x, svhn_y = synthetic_svhn(2, seed=3)
    request = {"inputs": [{"name": "pixels", "shape": [2, 3, 32, 32], "datatype": "UINT8", "data": svhn_x.ravel().tolist()}]}
    body = client.post("/v2/models/svhn-tiny/infer", json=request).json()
    assert np.asarray(body["outputs"][0]["data"]).reshape(2, 10).argmax(1).tolist() == svhn_y.tolist()


@pytest.mark.parametrize("request_body, message", [
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP64", "data": [0] * 64}]}, "datatype"),
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 7], "datatype": "FP32", "data": [0] * 56}]}, "shape"),
    ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 63}]}, "values"),
    ({"inputs": "nope"}, "invalid inference request"),
])
def test_v2_errors(client, request_body, message):
    response = client.post("/v2/models/digits-cnn/infer", json=request_body)
    assert response.status_code == 400 and message in response.json()["error"]
    assert client.post("/v2/models/nope/infer", json=request_body).status_code == 404


def test_v2_fractional_values_for_a_uint8_model_are_refused(client):
    request = {"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}]}
    response = client.post("/v2/models/svhn-tiny/infer", json=request)
    assert response.status_code == 400 and "values must be integers" in response.json()["error"]


# --- metrics and OpenAPI ---

def metric(client, name: str, **labels) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_requests_images_and_queue_vs_inference_time(client):
    labels = {"model": "digits-mlp", "route": "/predict", "method": "POST", "status": "200"}
    before = metric(client, "digitserve_http_requests_total", **labels)
    images_before = metric(client, "digitserve_images_total", model="digits-mlp")
    for _ in range(3):
        client.post("/predict", json={"model": "digits-mlp", "pixels": [np.zeros((8, 8)).tolist()] * 2})
    assert metric(client, "digitserve_http_requests_total", **labels) == before + 3
    assert metric(client, "digitserve_images_total", model="digits-mlp") == images_before + 6
    assert metric(client, "digitserve_queue_duration_seconds_count", model="digits-mlp") >= 3
    assert metric(client, "digitserve_inference_duration_seconds_count", model="digits-mlp") >= 3
    assert metric(client, "digitserve_queue_images") == 0
    assert metric(client, "digitserve_model_info", model="digits-cnn", status="ready", device="cpu") == 1
    assert metric(client, "digitserve_http_request_duration_seconds_count", route="/predict") > 0


def test_hostile_requests_cannot_add_series_or_break_the_exposition(client):
    for path in ["/models/a%22b", "/models/a|b", "/models/a%0Ab", "/models/" + "x" * 300, "/no/such", "/v2/models/a%22"]:
        client.get(path)
    client.request("BREW", "/models/digits-cnn")
    families = list(text_string_to_metric_families(client.get("/metrics").text))  # it parses: the format holds
    labels = [sample.labels for family in families for sample in family.samples]
    templates = {*client.get("/openapi.json").json()["paths"], "/"}
    known = {"digits-cnn", "digits-mlp", "svhn-tiny", "digits-broken", "digits-garbage"}
    assert {l["model"] for l in labels if "model" in l} <= known | {"other", ""}
    assert {l["route"] for l in labels if "route" in l} <= templates | {"other"}
    assert {l["method"] for l in labels if "method" in l} <= {"GET", "POST", "other"}


def test_openapi_documents_real_schemas(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert {"application/json", "multipart/form-data"} <= set(predict["requestBody"]["content"])
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("PredictResponse")
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert client.get("/docs").status_code == 200


# --- auth, backends, start-up ---

def test_api_key_guards_prediction_and_model_routes(exports):
    with in_process(exports, api_key=API_KEY) as c:
        body = {"pixels": [np.zeros((8, 8)).tolist()]}
        assert c.post("/predict", json=body).status_code == 401
        assert c.post("/predict", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/predict", json=body, headers={"X-API-Key": API_KEY}).status_code == 200
        assert c.post("/predict", json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert c.get("/models").status_code == 401 and "API key" in c.get("/models").json()["error"]
        assert c.get("/v2/models/digits-cnn").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_torchscript_backend_serves_the_same_predictions(exports, client, test_digits):
    images, _ = test_digits
    body = {"model": "digits-mlp", "pixels": [images[i].tolist() for i in range(5)]}
    onnx_predictions = client.post("/predict", json=body).json()["predictions"]
    with in_process(exports, backend="torchscript") as c:
        models = c.get("/models").json()
        assert models["backend"] == "torchscript"
        assert {m["provider"] for m in models["models"] if m["status"] == "ready"} == {f"torch {torch.__version__}"}
        predictions = c.post("/predict", json=body).json()["predictions"]
        v2 = c.post("/v2/models/svhn-tiny/infer", json={"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32],
                    "datatype": "UINT8", "data": synthetic_svhn(1, seed=5)[0].ravel().tolist()}]})
        assert v2.status_code == 200
    for ts, ort in zip(predictions, onnx_predictions):
        assert ts["label"] == ort["label"]
        assert np.allclose(ts["probabilities"], ort["probabilities"], atol=1e-5)


def test_files_an_export_serves_must_be_regular_files_inside_it(tmp_path):
    exports = tmp_path / "exports"
    copy_committed(exports, "digits-cnn", "digits-mlp")
    outside = tmp_path / "elsewhere.png"
    shutil.copy(exports / "digits-cnn" / "curves.png", outside)  # the same bytes: the sha256 would match
    (exports / "digits-cnn" / "curves.png").unlink()
    (exports / "digits-cnn" / "curves.png").symlink_to(outside)
    with in_process(exports) as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert models["digits-cnn"]["status"] == "unavailable"
        assert models["digits-cnn"]["reason"] == "curves.png is not a regular file"
        assert c.get("/models/digits-cnn/curves.png").status_code == 503
        assert c.get("/models/digits-mlp/curves.png").status_code == 200


def test_a_full_queue_sheds_requests_at_once_with_retry_after(exports, monkeypatch):
    with in_process(exports, max_queue=2) as c:
        predict = inference.predict
        monkeypatch.setattr(inference, "predict", lambda requests: (time.sleep(0.3), predict(requests))[1])
        body = {"model": "digits-cnn", "pixels": [np.zeros((8, 8)).tolist()]}
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: c.post("/predict", json=body), range(8)))
        statuses = sorted(r.status_code for r in responses)
        shed = [r for r in responses if r.status_code == 503]
        assert 200 in statuses and shed and set(statuses) == {200, 503}
        assert all(r.headers["retry-after"] == "1" and "capacity" in r.json()["error"] for r in shed)
        assert metric(c, "digitserve_shed_requests_total") == len(shed)


def test_a_file_where_an_option_belongs_is_a_client_error(client):
    response = client.post("/predict", files=[("file", ("d.png", VALID_DIGIT)), ("invert", ("x.txt", b"true"))])
    assert response.status_code == 422 and "'invert' must be a value, not a file" in response.json()["error"]


def test_a_model_that_fails_to_load_in_a_process_is_503_and_its_task_falls_to_another(exports, monkeypatch):
    from serving import verify
    from serving.inference import LoadError

    def load_without_cnn(entry, backend, device, warm=True):
        if entry.name == "digits-cnn":  # in the HTTP process, after the start-up check passed
            raise LoadError("CUDA ran out of memory (simulated)")
        return real_load(entry, backend, device, warm)
    real_load = verify.load_runner
    monkeypatch.setattr(verify, "load_runner", load_without_cnn)
    with in_process(exports) as c:
        response = c.post("/predict", json={"model": "digits-cnn", "pixels": [np.zeros((8, 8)).tolist()]})
        assert response.status_code == 503 and "simulated" in response.json()["error"]
        answer = c.post("/predict", json={"pixels": [np.zeros((8, 8)).tolist()]})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["model"] == "digits-mlp"
        info = {s.labels["model"]: s.labels["status"] for f in text_string_to_metric_families(c.get("/metrics").text)
                for s in f.samples if s.name == "digitserve_model_info" and s.value == 1}
        assert info["digits-cnn"] == "unavailable" and info["digits-mlp"] == "ready"
