"""The web chat page in headless Debian Chromium (selenium + chromedriver): pick an image, ask, read the streamed
answer and the TTFT stages; a screenshot lands in tests/artifacts/web_chat.png."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

import edgevlm

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts"
IMAGE = Path(edgevlm.__file__).parent / "assets" / "examples" / "shapes-1.png"


DROP = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
"""


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium and chromium-driver are missing: the test command installs them")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,760", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_answers_about_an_image(serve, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = serve()
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "shapes-fastvlm")
    browser.find_element(By.ID, "file").send_keys(str(IMAGE))
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())

    def ask(question: str) -> str:
        n = len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant"))
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")) == n + 1
                   and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
        return browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant p")[-1].text

    assert ask("What color is the star?") == "blue"
    ttft = browser.find_element(By.ID, "ttft").text
    stages = browser.find_element(By.ID, "stages").text
    print("TTFT shown:", ttft, "| stages:", stages.replace("\n", " "))
    assert ttft.endswith(" ms") and float(ttft.split()[0]) > 0
    assert all(s in stages for s in ("preprocess", "encode", "embed", "prefill"))
    # a second turn: the image travels in the history, and the page's chat is the library's chat. (The demo is
    # trained on single questions; its answers in later turns are weaker, so the oracle here is the library.)
    chat = edgevlm.load().chat()
    chat.send("What color is the star?", image=IMAGE.read_bytes())
    assert ask("What color is the star?") == chat.send("What color is the star?")
    browser.find_element(By.ID, "reset").click()  # a new chat about the same picture, dropped this time
    browser.execute_script(DROP, base64.b64encode(IMAGE.read_bytes()).decode())
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    assert ask("What color is the star?") == "blue"
    figures, stages = browser.find_element(By.ID, "figures").text, browser.find_element(By.ID, "stages").text
    print("new chat, same image:", figures.replace("\n", " "), "|", stages.replace("\n", " "))
    assert "image cache hits\n1" in figures and "encode" not in stages  # the server encoded the image once
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web_chat.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script errors, no Content-Security-Policy violations


DROP_FILE = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], arguments[1], {type: arguments[2]}));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
"""


def test_page_says_why_it_cannot_send_a_file(serve, browser, tmp_path):
    """A text file and a damaged PNG are refused on the page, with the reason; an image past the server's pixel cap
    gets the server's 413 message, and the question and its image come back to be sent again without it."""
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = serve("--max-image-pixels", "1000000")
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "shapes-fastvlm")
    error, preview = browser.find_element(By.ID, "error"), browser.find_element(By.ID, "preview")

    def refused(text: str) -> str:
        wait.until(lambda d: error.is_displayed() and error.text.startswith(text))
        assert not preview.is_displayed() and browser.execute_script("return pendingImage") is None
        return error.text

    (tmp_path / "notes.txt").write_text("not a picture")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
    print(refused("notes.txt: not an image this page can send (text/plain); pick a PNG, JPEG, WebP, GIF or BMP"))
    damaged = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    browser.execute_script(DROP_FILE, base64.b64encode(damaged).decode(), "damaged.png", "image/png")
    print(refused("damaged.png: cannot be read as an image (image/png)"))

    buf = io.BytesIO()
    Image.new("RGB", (1200, 1000), (30, 80, 225)).save(buf, "PNG")  # 1.2 MP, past the server's 1 MP
    (tmp_path / "big.png").write_bytes(buf.getvalue())
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "big.png"))
    wait.until(lambda d: preview.is_displayed() and not error.is_displayed())  # a good image clears the error
    browser.find_element(By.ID, "question").send_keys("What color is the star?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: error.is_displayed() and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    print(error.text)
    assert error.text == "an image has 1200x1000 pixels; this server accepts at most 1000000 pixels per image"
    assert browser.find_element(By.ID, "question").get_attribute("value") == "What color is the star?"
    assert preview.is_displayed() and not browser.find_elements(By.CSS_SELECTOR, "#log .msg")  # nothing was said

    browser.find_element(By.ID, "clear-image").click()
    browser.find_element(By.ID, "send").click()  # the same question, without the image
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")) == 1
               and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert not error.is_displayed() and not browser.find_elements(By.CSS_SELECTOR, "#log .msg img")
    assert "generated" in browser.find_element(By.ID, "figures").text
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "status of 413" not in e["message"]]
    assert not severe, severe  # the refused request is the only failure the browser logs
