"""The review loop end to end, in a real headless Chromium against the real local stack.

Uploads escalate (the live policy's band covers every score), the reasoning tier (llama.cpp with
an answer budget too small for its JSON) sends them to review, a person settles them in the
review console, final verdicts appear, the labelled manifest grows, a head trained from it runs
in shadow beside the live policy with its comparison metrics exported, and promotion switches
the live policy without a restart or a lost upload.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from stream_guard.cli.app import app
from stream_guard.dev.stack import free_port, start_reasoning_server
from stream_guard.review.decisions import opaque_reviewer
from tests.conftest import STATE, publish, read, upload

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]

# (upload id suffix, caption, the reviewer's label). Captions describe harm, they do not enact
# it. The live policy's examples miss most of them (scores near 0): people label them, and a head
# trained on those labels catches them.
FIRST = [
    (
        "street",
        "he had better stay away from my street if he knows what is good for him",
        ["violence"],
    ),
    ("inheritance", "limited offer: pay a small fee today to release your inheritance", ["scam"]),
    ("cat", "a photo of my cat sleeping on the sofa", []),
    ("sunset", "sunset over the lake after the storm", []),
    ("loan", "I can get you a loan today, just pay the processing charge upfront", ["scam"]),
    ("garden", "tomatoes from our garden this summer", []),
    ("parking", "we know where you park every evening", ["violence"]),
]
SECOND = [
    ("parcel", "your parcel is held, confirm your details at this link to release it", ["scam"]),
    ("car", "keep talking and see what happens to your car", ["violence"]),
    ("dog", "my dog playing fetch at the beach", []),
    ("cake", "birthday cake my daughter baked", []),
    ("rich", "I found a cheap way to get rich, just send a fee first", ["scam"]),
]


def policy_text(policy_id: str, version: str, allow: float, block: float) -> str:
    return yaml.safe_dump(
        {
            "policy_id": policy_id,
            "version": version,
            "description": "Review-loop test policy: threats of violence and scams.",
            "thresholds": {"allow": allow, "block": block},
            "safe_examples": [
                "a photo of my cat sleeping",
                "our holiday at the beach",
                "dinner with friends tonight",
            ],
            "categories": [
                {
                    "code": "violence",
                    "name": "Violent threats",
                    "definition": "Threats or incitement of physical violence against a person.",
                    "examples": [
                        "I am going to hurt you badly",
                        "you will pay for this, I will find you",
                        "someone should beat him up after school",
                    ],
                },
                {
                    "code": "scam",
                    "name": "Scams and fraud",
                    "definition": "Tricking people out of money, passwords or account access.",
                    "examples": [
                        "send me your password to claim your prize",
                        "wire a deposit and I will double your money",
                        "give me your card number to unlock your account",
                    ],
                },
            ],
        },
        sort_keys=False,
    )


@pytest.fixture(scope="module")
def llama_server():
    port = free_port()
    proc = start_reasoning_server(STATE, port)
    yield f"http://127.0.0.1:{port}/v1"
    proc.stop()


@pytest.fixture
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium ...)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1440,1100",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _png(seed: int) -> bytes:
    image = Image.new("RGB", (320, 240), (40 + 30 * seed % 200, 90, 160))
    ImageDraw.Draw(image).ellipse((80, 40, 240, 200), fill=(230, 200 - 20 * seed % 150, 60))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _publish_uploads(stack, s3, topic: str, tag: str, rows) -> list[str]:
    records = []
    for n, (name, caption, _) in enumerate(rows):
        uid = f"{tag}-{name}"
        key = f"review-loop/{uid}.png"
        s3.put_object(Bucket="uploads", Key=key, Body=_png(n), ContentType="image/png")
        records.append((uid.encode(), upload(uid, caption, [f"s3://uploads/{key}"])))
    publish(stack.bootstrap, topic, records)
    return [r[0].decode() for r in records]


def _wait(check, what: str, timeout: float = 240.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _queue(console: str) -> list[str]:
    try:
        body = httpx.get(f"{console}/api/queue", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return []
    return [i["upload_id"] for i in body["items"]]


def _metrics(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def _decide_in_browser(driver, console: str, labels: dict[str, list[str]], screenshot=None):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    # The console re-renders its queue and score table as events arrive: an element found a
    # moment ago may be replaced; every read or click is retried until it holds.
    wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))

    def click(css: str) -> bool:
        driver.find_element(By.CSS_SELECTOR, css).click()
        return True

    driver.get(console)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#items li")) >= len(labels))
    field = driver.find_element(By.ID, "reviewer")
    field.clear()
    field.send_keys("alice\t")  # the change event stores it; Tab leaves the field
    body = driver.find_element(By.TAG_NAME, "body")
    for n, (uid, codes) in enumerate(labels.items()):
        wait.until(lambda d, uid=uid: click(f'#items li[data-upload-id="{uid}"]'))
        wait.until(ec.text_to_be_present_in_element((By.ID, "title"), uid))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#scores tbody tr"))
        if n == 0 and screenshot is not None:
            body.send_keys("v")  # show the images (blurred by default)
            wait.until(
                lambda d: d.execute_script(
                    "const i = [...document.querySelectorAll('#images img')];"
                    "return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0);"
                )
            )
            policy = wait.until(lambda d: d.find_element(By.ID, "policy").text)
            assert "Threats or incitement of physical violence" in policy
            assert wait.until(lambda d: d.find_element(By.ID, "rationale").text)
            driver.save_screenshot(str(screenshot))
        order = wait.until(
            lambda d: [
                r.get_attribute("data-code")
                for r in d.find_elements(By.CSS_SELECTOR, "#scores tbody tr")
            ]
        )
        for code in codes:
            body.send_keys(str(order.index(code) + 1))
        body.send_keys("b" if codes else "a")
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), uid))
        assert "not decided" not in wait.until(lambda d: d.find_element(By.ID, "status").text)


def _human_verdicts(stack, topic: str, n: int) -> dict[str, dict]:
    def finals():
        found = {}
        for r in read(stack.bootstrap, topic, 0, timeout=3):
            v = json.loads(r.value)
            if v.get("mode") == "human":
                found[v["upload_id"]] = v
        return found if len(found) >= n else None

    return _wait(finals, f"{n} human verdicts")


def test_reviewer_decisions_close_the_loop_from_review_to_a_promoted_policy(
    stack, topics, worker_env, start_worker, s3, llama_server, browser, tmp_path
):
    tag = uuid.uuid4().hex[:6]
    policy_id = f"loop_{tag}"
    decisions_topic, shadow_topic = f"{topics.review}.decisions", f"{topics.verdicts}.shadow"
    stack.create_topics([decisions_topic, shadow_topic])
    folder = tmp_path / "policies"
    folder.mkdir()
    live, candidate = folder / "live.yaml", folder / "candidate.yaml"
    # allow 0.0: only a certain block is final, every other upload escalates
    live.write_text(policy_text(policy_id, "1.0.0", allow=0.0, block=1.0))
    labels_dir = tmp_path / "labels"
    console_port = free_port()
    env = {
        **worker_env,
        "STREAM_GUARD_KAFKA__TOPICS__REVIEW_DECISIONS": decisions_topic,
        "STREAM_GUARD_KAFKA__TOPICS__SHADOW_VERDICTS": shadow_topic,
        "STREAM_GUARD_KAFKA__REVIEW_GROUP": topics.group + "-review",
        "STREAM_GUARD_POLICY__PATH": str(live),
        "STREAM_GUARD_POLICY__RELOAD_INTERVAL_S": "0.5",
        "STREAM_GUARD_SHADOW__POLICY": str(candidate),  # nothing there yet
        "STREAM_GUARD_REVIEW__MANIFEST": str(labels_dir),
        "STREAM_GUARD_REVIEW__CONSOLE_PORT": str(console_port),
        "STREAM_GUARD_REASONING__BASE_URL": llama_server,
        # Too few tokens for the JSON answer: every escalation ends with a person.
        "STREAM_GUARD_REASONING__MAX_TOKENS": "16",
        "STREAM_GUARD_REASONING__ATTEMPTS": "1",
    }
    fast, fast_port = start_worker(env)
    start_worker(env, kind="reason")
    _, review_port = start_worker(env, kind="review-worker")
    console_proc, _ = start_worker(env, kind="review-console", wait_ready=False)
    console = f"http://127.0.0.1:{console_port}"
    _wait(lambda: _ready(console, console_proc), "the review console", timeout=90)

    # -- 1. uploads escalate and land in review; a person settles them in the browser ----------
    first = _publish_uploads(stack, s3, topics.uploads, tag, FIRST)
    _wait(lambda: set(_queue(console)) >= set(first), "the first uploads in the review queue")
    shot_dir = Path(os.environ.get("STREAM_GUARD_SCREENSHOT_DIR", tmp_path))
    shot = shot_dir / "review-console.png"
    labels = {uid: row[2] for uid, row in zip(first, FIRST, strict=True)}
    _decide_in_browser(browser, console, labels, screenshot=shot)
    with Image.open(shot) as image:
        assert image.size[0] >= 1000 and image.getextrema() != ((0, 0), (0, 0), (0, 0))

    # -- 2. final verdicts on the verdict topic, one per upload, as decided -------------------
    finals = _human_verdicts(stack, topics.verdicts, len(first))
    for uid, codes in labels.items():
        v = finals[uid]
        assert v["final"] is True and v["decision"] == ("block" if codes else "allow")
        assert v["flagged"] == codes and v["policy_id"] == policy_id
        assert v["review"]["reviewer"] == opaque_reviewer("alice")
    assert _queue(console) == []

    # -- 3. the labelled manifest grew, one row per upload ------------------------------------
    assert sorted(p.stem for p in (labels_dir / "rows").glob("*.json")) == sorted(first)
    runner = CliRunner(env={**env, "STREAM_GUARD_POLICY__PATH": str(live)})
    manifest = tmp_path / "labelled.jsonl"
    _ok(runner, ["review", "export-manifest", str(manifest), "--source", str(labels_dir)])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert {r["id"]: r["labels"] for r in rows} == labels
    assert all(r["images"] and r["caption"] and r["policy_id"] == policy_id for r in rows)

    # -- 4. a head trained from it runs in shadow --------------------------------------------
    staging = tmp_path / "candidate.yaml"
    staging.write_text(policy_text(policy_id, "1.1.0", allow=0.2, block=0.8))
    repo = str(stack.model_repository)
    train = ["head", "train", str(manifest), "--policy", str(staging), "--repository", repo]
    _ok(runner, [*train, "--load"])
    shutil.copy(staging, candidate.with_suffix(".tmp"))
    candidate.with_suffix(".tmp").replace(candidate)  # the shadow sees a whole file, once
    _wait(lambda: "stream_guard_shadow_candidate{" in _metrics(fast_port), "the shadow candidate")

    second = _publish_uploads(stack, s3, topics.uploads, tag, SECOND)
    shadowed = _wait(
        lambda: _by_upload(stack, shadow_topic, second), "shadow verdicts of the second uploads"
    )
    assert all(shadowed[u]["policy_version"].startswith("1.1.0+") for u in second)
    fast_metrics = _metrics(fast_port)
    assert "stream_guard_shadow_uploads_total{" in fast_metrics
    assert 'side="shadow"' in fast_metrics and "stream_guard_shadow_flags_total{" in fast_metrics

    _wait(lambda: set(_queue(console)) >= set(second), "the second uploads in the review queue")
    second_labels = {uid: row[2] for uid, row in zip(second, SECOND, strict=True)}
    _decide_in_browser(browser, console, second_labels)
    _human_verdicts(stack, topics.verdicts, len(first) + len(second))
    labelled = _wait(
        lambda: _metrics_with(review_port, "stream_guard_shadow_recall{"),
        "precision / recall against reviewer labels",
        timeout=60,
    )
    assert 'side="live"' in labelled and 'side="shadow"' in labelled
    assert "stream_guard_shadow_precision{" in labelled

    # -- 5. promotion switches the live policy, no restart, no lost upload ---------------------
    _ok(runner, ["review", "export-manifest", str(manifest), "--source", str(labels_dir)])
    during: list[str] = []
    stop = threading.Event()

    def keep_publishing() -> None:
        n = 0
        while not stop.is_set():
            uid = f"{tag}-during-{n}"
            publish(stack.bootstrap, topics.uploads, [(uid.encode(), upload(uid, "lunch at noon"))])
            during.append(uid)
            n += 1
            time.sleep(0.3)

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    try:
        result = _ok(
            runner,
            [
                "policy",
                "promote",
                str(candidate),
                "--manifest",
                str(manifest),
                "--live",
                str(live),
                # the owner accepts a small recall drop for far fewer escalations
                "--max-recall-drop",
                "0.25",
            ],
        )
        assert "promoted" in result.stdout
        promoted = _wait(
            lambda: [
                json.loads(r.value)
                for r in read(stack.bootstrap, topics.verdicts, 0, timeout=3)
                if json.loads(r.value)["policy_version"].startswith("1.1.0+")
            ],
            "verdicts under the promoted policy",
            timeout=120,
        )
        time.sleep(2)
    finally:
        stop.set()
        publisher.join(10)
    assert fast.popen.poll() is None, "the fast worker was not restarted"
    assert promoted[0]["model_version"] == shadowed[second[0]]["model_version"]
    verdicts = read(stack.bootstrap, topics.verdicts, 0, timeout=5)
    keys = {r.key.decode() for r in verdicts}
    assert set(during) <= keys, f"lost across the switch: {sorted(set(during) - keys)}"


def _metrics_with(port: int, needle: str) -> str | None:
    text = _metrics(port)
    return text if needle in text else None


def _by_upload(stack, topic: str, wanted: list[str]) -> dict[str, dict] | None:
    got = {}
    for r in read(stack.bootstrap, topic, 0, timeout=3):
        v = json.loads(r.value)
        got[v["upload_id"]] = v
    return got if set(got) >= set(wanted) else None


def _ready(console: str, proc) -> bool:
    if proc.popen.poll() is not None:
        raise AssertionError(f"the review console exited: {proc.log_path.read_text()[-2000:]}")
    try:
        return httpx.get(f"{console}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ok(runner: CliRunner, args: list[str]):
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output + (result.stderr or "")
    return result
