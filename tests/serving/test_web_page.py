"""The web page in headless Chromium, with every request off the machine blocked: upload an image or
draw one, see the right digit and what the model saw; the API docs render offline. Against a real
server on loopback."""
import math
import shutil
from urllib.parse import urlparse

import numpy as np
import pytest

from bench.harness import copy_committed, png, running_server
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
    with running_server(tmp_path / "exports") as server:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            off_machine = []

            def local_only(route):
                if urlparse(route.request.url).hostname == "127.0.0.1":
                    route.continue_()
                else:
                    off_machine.append(route.request.url)
                    route.abort()
            page.route("**/*", local_only)
            page.goto(server.url + "/")
            expect(page.locator("#models tbody tr")).to_have_count(2)
            expect(page.locator("#model option")).to_have_count(3)
            page.set_input_files("#file", str(image_file))
            expect(page.get_by_test_id("digit")).to_have_text(str(labels[index]), timeout=15000)
            expect(page.locator("#bars .bar")).to_have_count(10)
            expect(page.locator("#meta")).to_contain_text("digits-cnn")
            expect(page.get_by_test_id("view")).to_have_attribute("data-ink", str(int(images[index].sum())))
            page.locator("#models a").first.click()
            expect(page.locator("img.curves")).to_be_visible()

            # Draw a 0 on the pad: classified as drawn, and the model's 8x8 view shown.
            page.locator("#pad").scroll_into_view_if_needed()  # the curves link scrolled the page down
            box = page.locator("#pad").bounding_box()
            centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            ring = [(centre_x + 0.28 * box["width"] * math.sin(t / 24 * 2 * math.pi),
                     centre_y - 0.38 * box["height"] * math.cos(t / 24 * 2 * math.pi)) for t in range(26)]
            page.mouse.move(*ring[0])
            page.mouse.down()
            for point in ring[1:]:
                page.mouse.move(*point, steps=2)
            page.mouse.up()
            expect(page.locator("#pad")).to_have_attribute("data-pending", "0", timeout=15000)  # the last answer is in
            expect(page.get_by_test_id("digit")).to_have_text("0")
            expect(page.locator("#preview")).to_have_attribute("width", "224")
            assert float(page.get_by_test_id("view").get_attribute("data-ink")) > 100

            not_an_image = tmp_path / "notes.png"
            not_an_image.write_text("not an image")
            page.set_input_files("#file", str(not_an_image))
            expect(page.locator("#error")).to_contain_text("400: not an image")
            expect(page.get_by_test_id("view")).to_have_attribute("data-ink", "0")  # the last result is gone
            expect(page.get_by_test_id("digit")).to_have_text("–")

            page.goto(server.url + "/docs")  # Swagger UI from the service's own files
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("digitserve", timeout=15000)
            expect(page.locator(".opblock-summary-path", has_text="/predict").first).to_be_visible()
            assert off_machine == []
            browser.close()
