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
