"""Image formats and modes a client may upload (palette, RGBA, 16-bit, CMYK JPEG, GIF, WebP, BMP,
EXIF-rotated): each gives the answer of the plain 8-bit PNG. In-process (FastAPI's TestClient)."""
import io

import numpy as np
import pytest
from PIL import Image

from bench.harness import png, saved


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
