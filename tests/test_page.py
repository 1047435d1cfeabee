"""The page at / in a real headless browser (Debian's chromium, driven by selenium): a message sent in the chat box
streams back the model's answer (the same text as the API's), a refused one leaves the chat, and the rank table
shows every rank of a 3-rank server with its stage and layers; the chat's log scrolls itself to a streaming answer,
Enter while an input method composes does not send, and New chat mid-answer starts an empty conversation."""
import shutil
import time

import pytest

from test_serve import MPIRUN, Served, model  # noqa: F401 - the model fixture

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER and MPIRUN), reason="needs chromium, chromedriver, mpirun")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_and_rank_table(browser, model):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    server = Served(model, 3, ("--ratios", "2:1*1"))
    try:
        want = server.client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=12,
            temperature=0).choices[0].message.content
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#ranks tr.rank")) == 3)
        rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in browser.find_elements(By.CSS_SELECTOR, "#ranks tr.rank")]
        assert [r[0] for r in rows] == ["0", "1", "2"]
        assert [r[3] for r in rows] == ["0", "0", "1"]  # stages
        assert rows[0][4] == rows[1][4] != rows[2][4]  # the first stage's layers, then the second's
        assert "chat.gguf" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("12")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("5")  # refused (400): left out of the chat
        browser.find_element(By.ID, "prompt").send_keys("Tell me more")
        browser.find_element(By.ID, "send").click()
        note = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".note"))
        assert "temperature" in note.text and "left out of the chat" in note.text
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "prompt").send_keys("Once upon a time")
        browser.find_element(By.ID, "send").click()
        answer = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        assert answer.text.strip() == want.strip()  # the answer to this message alone
        users = browser.find_elements(By.CSS_SELECTOR, ".user")
        assert [u.get_attribute("class") for u in users] == ["msg user refused", "msg user"]
        assert users[1].text.endswith("Once upon a time")
        wait.until(lambda b: "1 requests served" not in b.find_element(By.ID, "figures").text and
                   "2 requests served" in b.find_element(By.ID, "figures").text)
    finally:
        assert server.stop() == 0, "".join(server.lines)


def test_the_log_follows_an_answer_and_new_chat_or_an_input_method_do_not_mix_turns(browser, model):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    server = Served(model, 1, env={"SPMD_TEST_SLOW": "0:50"})  # (tokens slow enough to catch an answer midway)
    try:
        want = server.client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=12,
            temperature=0).choices[0].message.content
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 120, poll_frequency=0.05)
        done = "return document.querySelectorAll('.assistant[data-done]').length"

        def field(name, value):
            browser.find_element(By.ID, name).clear()
            browser.find_element(By.ID, name).send_keys(value)

        def enter(composing):
            browser.execute_script("arguments[0].dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', "
                                   "isComposing: arguments[1], bubbles: true}))", browser.find_element(By.ID, "prompt"),
                                   composing)

        field("max-tokens", "24")
        browser.execute_script("document.getElementById('prompt').value = arguments[0]",
                               "\n".join(f"line {i}" for i in range(40)))
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.execute_script(done) == 1)
        log = browser.execute_script("const l = document.getElementById('log'); "
                                     "return [l.scrollHeight, l.clientHeight, l.scrollTop];")
        assert log[0] > log[1] and log[2] + log[1] >= log[0] - 2, log  # its own scroll bar, at the answer's end
        browser.find_element(By.ID, "prompt").send_keys("にほん")
        enter(composing=True)  # (the input method's Enter: ends the word, sends nothing)
        time.sleep(1)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".user")) == 1
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "にほん"
        field("max-tokens", "400")
        enter(composing=False)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant:not([data-done])").text.strip())
        busy = browser.execute_script("const busy = !document.getElementById('stop').disabled; "
                                      "document.getElementById('reset').click(); return busy;")
        assert busy and browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []  # New chat, mid-answer
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
        field("max-tokens", "12")
        field("temperature", "0")
        browser.find_element(By.ID, "prompt").send_keys("Once upon a time")
        browser.find_element(By.ID, "send").click()
        answer = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        assert answer.text.strip() == want.strip()  # the new chat holds this message alone
        assert [m.get_attribute("class") for m in browser.find_elements(By.CSS_SELECTOR, "#log .msg")] == [
            "msg user", "msg assistant"]
        assert not [e for e in browser.get_log("browser") if "favicon" in e["message"]]
    finally:
        assert server.stop() == 0, "".join(server.lines)
