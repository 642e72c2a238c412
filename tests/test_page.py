"""The page at `/` in a real browser: Debian's chromium, headless, driven by selenium through chromium-driver, its
fake microphone playing sample.wav once, against a real server process (the embedded defaults: silero VAD,
pocketsphinx, the loopback-only mode, where the page's token is just a name).

What it checks: the transcript fills with the server's words in two speaker colours (the segments came over
/v4/listen from the page's AudioWorklet frames), the timeline canvas shows those colours, enrolling "my voice" uploads
a WAV the server accepts, naming a speaker (a person; or "me", then labelled "you") relabels their segments, and
the VAD drop zone lists and draws the same regions /v1/vad answers. A screenshot is saved under pytest's tmp_path
(its path printed).

`make test` installs chromium and chromium-driver when missing (Makefile, `browser`); without them this test skips
and says why."""

from __future__ import annotations

import contextlib
import shutil
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import SAMPLE_WAV, read_wav

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# sample.wav plays for 30 s in real time; a region's words come when it closes, later on a busy 2-core machine.
TRANSCRIPT_TIMEOUT_S = 90


def _missing_browser() -> str | None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "Debian's chromium and chromium-driver are not installed (`make test` installs them as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (requirements-dev.txt)"
    if not SAMPLE_WAV.exists():
        return f"{SAMPLE_WAV} is missing (the shared data beside the checkout)"
    return None


pytestmark = pytest.mark.skipif(_missing_browser() is not None, reason=str(_missing_browser()))


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root (CI containers), where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--window-size=1100,1400",
        "--autoplay-policy=no-user-gesture-required",
        # The fake microphone: sample.wav (16-bit PCM) played once, permission granted without a prompt.
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={SAMPLE_WAV}%noloop",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drivers = []

    def launch():
        """A fresh browser: its fake microphone plays sample.wav once, from the start."""
        drivers.append(webdriver.Chrome(options=options, service=Service(CHROMEDRIVER)))
        return drivers[-1]

    try:
        yield launch
    finally:
        for driver in drivers:
            with contextlib.suppress(Exception):  # one the test already quit
                driver.quit()


def wait_for(condition, timeout_s: float, what: str, driver):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    status = driver.find_element("id", "status").text
    console = [entry["message"] for entry in driver.get_log("browser")][-10:]
    raise AssertionError(f"timed out waiting for {what}; page status {status!r}; transcript {segments(driver)}; "
                         f"console {console}")


def segments(driver) -> list[dict]:
    return driver.execute_script("""
        return [...document.querySelectorAll('#transcript .segment')].map((row) => ({
          speakerId: row.dataset.speakerId, isUser: row.dataset.isUser,
          label: row.querySelector('.speaker').textContent,
          colour: getComputedStyle(row.querySelector('.speaker')).color,
          text: row.querySelector('.text').textContent}));""")


def canvas_colours(driver, canvas_id: str) -> dict[str, int]:
    """Pixel counts per opaque colour drawn on a canvas (as '#rrggbb')."""
    return driver.execute_script("""
        const canvas = document.getElementById(arguments[0]);
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const counts = {};
        for (let i = 0; i < data.length; i += 4) {
          if (data[i + 3] !== 255) continue;
          const hex = '#' + [data[i], data[i + 1], data[i + 2]].map((v) => v.toString(16).padStart(2, '0')).join('');
          counts[hex] = (counts[hex] || 0) + 1;
        }
        return counts;""", canvas_id)


def rgb_hex(css: str) -> str:
    """'rgb(31, 95, 191)' -> '#1f5fbf'."""
    r, g, b = (int(part) for part in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _stream_and_enrol(driver, local_server, uid: str, last: bool) -> list[dict] | None:
    """Starts the page's stream as `uid`, enrols "my voice" from it, and waits for words from two speakers: their
    rows, or None when only one speaker came (an AssertionError then on the `last` try)."""
    from selenium.webdriver.common.by import By

    driver.get(local_server.http + "/")
    assert driver.title == "Omi audio server"
    driver.find_element(By.ID, "token").send_keys(uid)  # the loopback-only mode: a name is the uid
    driver.find_element(By.ID, "start").click()
    wait_for(lambda: "ready" in driver.find_element(By.ID, "status").text, 30, "the stream to be ready", driver)

    # Enrol "my voice" from the same microphone while it streams: 5 s, uploaded as a 16 kHz WAV. sample.wav's first
    # 6 s are near silence, so the recording starts once the first words are back (speech is playing by then).
    wait_for(lambda: any(row["text"].strip() for row in segments(driver)), 40, "the first words", driver)
    seconds = driver.find_element(By.ID, "enrol-seconds")
    seconds.clear()
    seconds.send_keys("5")
    driver.find_element(By.ID, "enrol").click()
    enrolled = wait_for(lambda: (t := driver.find_element(By.ID, "speaker-status").text).startswith(
        ("Enrolled", "Enrolment failed")) and t, 30, "the enrolment's answer", driver)
    assert enrolled.startswith("Enrolled: "), enrolled

    # The transcript: the server's words, from two speakers in two colours.
    def two_speakers_with_words():
        rows = [row for row in segments(driver) if row["text"].strip()]
        return rows if len({row["speakerId"] for row in rows}) >= 2 else None

    try:
        return wait_for(two_speakers_with_words, TRANSCRIPT_TIMEOUT_S, "words from two speakers", driver)
    except AssertionError:
        if last:
            raise
        return None


def test_page_streams_the_microphone_and_shows_speakers_and_speech_regions(local_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = httpx.get(local_server.http + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # The live clustering of sample.wav as Chromium's fake microphone delivers it (resampled to the audio context's
    # rate and back) is borderline: in 3 of about 12 runs on a loaded machine it kept one cluster for the whole file
    # (streamed as pcm16 directly it gives two at every start offset tried). So a second browser, as a new user,
    # plays it once more before the test gives up; a page that never shows two speakers fails both.
    for attempt, uid in enumerate(("page-test-user", "page-test-user-2"), 1):
        driver = browser()
        rows = _stream_and_enrol(driver, local_server, uid, last=attempt == 2)
        if rows is not None:
            break
        print(f"attempt {attempt}: one speaker only ({segments(driver)}); a new browser and user")
        driver.quit()
    words = " ".join(row["text"] for row in rows).split()
    assert len(words) >= 10, words
    colours = {row["speakerId"]: rgb_hex(row["colour"]) for row in rows}
    assert len(set(colours.values())) >= 2, colours
    assert all(row["label"] == f"Speaker {row['speakerId']}" for row in rows if row["isUser"] == "false")

    # The timeline shows the speakers' spans in their colours, and the mic level under them.
    drawn = canvas_colours(driver, "timeline")
    for colour in colours.values():
        assert drawn.get(colour, 0) > 50, (colour, drawn)
    assert drawn.get("#71717a", 0) > 50, "no microphone level drawn"

    # Name a speaker: the person is created, speaker_assigned is sent, the server relabels that speaker's segments.
    named_id = rows[0]["speakerId"]
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "speaker-select")).select_by_value(named_id)
    driver.find_element(By.ID, "speaker-name").send_keys("Alice")
    driver.find_element(By.ID, "name-speaker-button").click()
    wait_for(lambda: any(row["label"] == "Alice" for row in segments(driver)), 20,
             "the named speaker's relabelled segments", driver)
    people = httpx.get(local_server.http + "/v1/users/people", headers={"Authorization": f"Bearer {uid}"})
    assert [p["name"] for p in people.json()] == ["Alice"]
    # And another speaker is "me": the server makes their segments the user's (is_user), which the page calls "you".
    other_id = next(row["speakerId"] for row in rows if row["speakerId"] != named_id)
    Select(driver.find_element(By.ID, "speaker-select")).select_by_value(other_id)
    name = driver.find_element(By.ID, "speaker-name")
    name.clear()
    name.send_keys("me")
    driver.find_element(By.ID, "name-speaker-button").click()
    mine = wait_for(lambda: [row for row in segments(driver) if row["isUser"] == "true"], 20,
                    "the user's relabelled segments", driver)
    assert all(row["label"] == "you" and rgb_hex(row["colour"]) == "#1b7f3b" for row in mine), mine

    # The VAD drop zone (its file input): the regions /v1/vad answers, listed and drawn. The file: two stretches of
    # sample.wav's speech with silence around them (sample.wav itself is one region: its speakers leave no gap).
    clip = tmp_path / "two-utterances.wav"
    audio = read_wav(SAMPLE_WAV)
    silence = np.zeros(2 * 16000, np.float32)
    sf.write(clip, np.concatenate([silence, audio[7 * 16000 : 10 * 16000], silence, silence,
                                   audio[22 * 16000 : 25 * 16000], silence]), 16000, subtype="PCM_16")
    expected = httpx.post(local_server.http + "/v1/vad", files={"file": clip.read_bytes()}, timeout=60).json()
    assert len(expected) >= 2, expected
    driver.find_element(By.ID, "vad-file").send_keys(str(clip))
    listed = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#vad-regions li.region"), 60,
                      "the speech regions", driver)
    assert [(float(item.get_attribute("data-start")), float(item.get_attribute("data-end"))) for item in listed] == [
        (r["start"], r["end"]) for r in expected]
    assert all(item.text.endswith(" s)") for item in listed)  # "1.86-5.18 s (3.32 s)"
    assert canvas_colours(driver, "vad-canvas").get("#16a34a", 0) > 100
    assert "speech regions" in driver.find_element(By.ID, "vad-status").text

    screenshot = tmp_path / "page.png"
    driver.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    driver.find_element(By.ID, "stop").click()
    wait_for(lambda: "Not listening" in driver.find_element(By.ID, "status").text, 10, "the stream's close", driver)
