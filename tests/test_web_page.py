"""The web page in headless Chromium: upload an image, see the right digit."""
import shutil

import numpy as np
import pytest

from serving_helpers import ServerProcess, copy_committed, png
from training import digits

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make chromium)")


def test_upload_shows_the_predicted_digit(tmp_path):
    from playwright.sync_api import expect, sync_playwright
    copy_committed(tmp_path / "exports", "digits-mlp", "digits-cnn")
    images, labels = digits.split_arrays("test")
    index = 7
    image_file = tmp_path / "digit.png"
    image_file.write_bytes(png(np.round(images[index] * 255 / 16).astype(np.uint8), "L"))
    server = ServerProcess(tmp_path / "exports")
    try:
        server.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#models tbody tr")).to_have_count(2)
            expect(page.locator("#model option")).to_have_count(3)
            page.set_input_files("#file", str(image_file))
            expect(page.get_by_test_id("digit")).to_have_text(str(labels[index]), timeout=15000)
            expect(page.locator("#bars .bar")).to_have_count(10)
            expect(page.locator("#meta")).to_contain_text("digits-cnn")
            page.locator("#models a").first.click()
            expect(page.locator("img.curves")).to_be_visible()
            browser.close()
    finally:
        server.stop()
