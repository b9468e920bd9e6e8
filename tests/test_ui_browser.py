"""The web UI in a real browser (issue 22's checks): headless Chromium (Debian's chromium and
chromium-driver) through Selenium, against a real ``pxsgate serve`` fed with the demo's
hospital feed over C-STORE. An http exporter to a closed port with max-attempts 1 makes
every delivery dead, for the operator's Retry. Screenshots of each page are saved under the
test's tmp_path (``screenshots/``).

Skipped where /usr/bin/chromium is missing, unless under CI (env CI), where it fails."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pxsgate.tools import synth
from pxsgate.tools.scu import send_datasets

from .conftest import Service, free_port, pxsgate, start_service, stop_service
from .test_ui_auth import add_user

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
USERS = {"vera": ("viewer", "viewer-password-1"), "rita": ("reviewer", "reviewer-password-2"),
         "otto": ("operator", "operator-password-3")}
REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60.0

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("CI"):
        pytest.fail("chromium and chromium-driver are missing: .ci/run must install them",
                    pytrace=False)
    pytest.skip("Debian's chromium and chromium-driver are not installed",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@dataclass
class Site:
    service: Service
    base: str
    feed: list[synth.FeedStudy]
    shots: Path

    def by_key(self, key: str) -> synth.FeedStudy:
        return next(s for s in self.feed if s.key == key)

    def identifiers(self) -> set[str]:
        """Every PatientID, accession number and UID of the studies sent."""
        found: set[str] = set()
        for study in self.feed:
            for ds in study.datasets:
                found |= {str(ds.PatientID), str(ds.StudyInstanceUID),
                          str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
                if str(ds.get("AccessionNumber", "")):
                    found.add(str(ds.AccessionNumber))
        return {f for f in found if f}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("browser")
    http_port, closed = free_port(), free_port()  # nothing listens on ``closed``
    exporter = ("exporters:\n  - name: results-db\n    type: http\n"
                f"    url: http://127.0.0.1:{closed}/results\n    max-attempts: 1\n"
                "    backoff-initial-seconds: 0.05\n    backoff-max-seconds: 0.1\n")
    svc = start_service(tmp, http_port=http_port, extra=exporter)
    try:
        for name, (role, password) in USERS.items():
            done = add_user(svc.config, name, role, password)
            assert done.returncode == 0, done.stderr
        feed = synth.hospital_feed(seed=22, rows=256, cols=256, prefix="UIB")
        for study in feed:
            assert send_datasets("127.0.0.1", svc.port, list(study.datasets)).ok
        svc.wait_for([str(s.datasets[0].StudyInstanceUID) for s in feed])
        shots = tmp / "screenshots"
        shots.mkdir()
        yield Site(svc, f"http://127.0.0.1:{http_port}", feed, shots)
    finally:
        assert stop_service(svc) == 0


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def login(driver: Any, site: Site, name: str) -> None:
    driver.get(site.base + "/ui/login")
    driver.find_element(By.NAME, "username").send_keys(name)
    driver.find_element(By.NAME, "password").send_keys(USERS[name][1])
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/ui/")
                                    or "/ui/?" in d.current_url)


def shoot(driver: Any, site: Site, name: str) -> Path:
    path = site.shots / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(1400, min(max(int(height), 1000), 4000))  # the whole page
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def until(check: Callable[[], Any], what: str, wait: float = WAIT_S) -> Any:
    deadline = time.monotonic() + wait
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {wait} s: {what}")
        time.sleep(0.3)


def audit(site: Site, *args: str) -> list[dict[str, Any]]:
    out = pxsgate("audit", "--json", "--config", site.service.config, *args)
    entries: list[dict[str, Any]] = json.loads(out.stdout)
    return entries


def thumbnails_loaded(driver: Any) -> list[int]:
    """naturalWidth of every thumbnail on the page, once each has finished loading."""
    widths: list[int] = driver.execute_script(
        "return Array.from(document.querySelectorAll('img.thumb'))"
        ".map(i => i.complete ? i.naturalWidth : -1);")
    return widths


def test_reviewer_sees_the_flagged_study_first_its_pictures_and_saves_a_review(
        site: Site, browser: Any) -> None:
    flagged = site.by_key("repeat-ap-wrong-patient")
    cath = site.by_key("portable-ap-cath")
    login(browser, site, "rita")
    shoot(browser, site, "worklist-reviewer")
    rows = browser.find_elements(By.CSS_SELECTOR, "main table tr")
    first = rows[1]
    assert str(flagged.datasets[0].AccessionNumber) in first.text
    assert "wrong-patient" in first.text
    assert "flagged" in (first.get_attribute("class") or "")

    # The CATH copy and the screenshot: not used, each with its reason; thumbnails loaded.
    uid = str(cath.datasets[0].StudyInstanceUID)
    browser.get(f"{site.base}/ui/studies/{uid}")

    def all_thumbnails() -> bool:
        browser.refresh()  # thumbnails are made at idle priority after the result
        widths = thumbnails_loaded(browser)
        return len(widths) == len(cath.datasets) and all(w > 0 for w in widths)
    until(all_thumbnails, "every instance's thumbnail of the CATH study")
    used = browser.find_elements(By.CSS_SELECTOR, ".instances.used figure")
    unused = browser.find_elements(By.CSS_SELECTOR, ".instances.unused figure")
    assert len(used) == 1
    assert len(unused) == len(cath.datasets) - 1 == 2
    for fig in unused:
        assert "not used" in fig.text
        reason = fig.find_element(By.CSS_SELECTOR, ".reason").text
        assert reason.strip(), fig.text
    assert any("screenshot" in f.text.lower() or "secondary" in f.text.lower()
               for f in unused), [f.text for f in unused]
    inputs = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.input'))"
        ".map(i => i.complete ? i.naturalWidth : -1);")
    assert inputs, "no model input shown"
    assert all(w == 320 for w in inputs), inputs
    for stage in ("received", "ready", "inferred", "stored"):
        assert stage in browser.find_element(By.CSS_SELECTOR, "ol.timeline").text
    shoot(browser, site, "study-reviewer")

    # A review of the flagged study, from its page; it shows there and in the audit trail.
    flagged_uid = str(flagged.datasets[0].StudyInstanceUID)
    browser.get(f"{site.base}/ui/studies/{flagged_uid}")
    until(lambda: (browser.refresh(), all(w > 0 for w in thumbnails_loaded(browser)))[1],
          "the flagged study's thumbnails")
    from selenium.webdriver.support.select import Select
    Select(browser.find_element(By.NAME, "verdict")).select_by_value("wrong-patient")
    browser.find_element(By.NAME, "comment").send_keys("third film is another patient")
    browser.find_element(By.CSS_SELECTOR, "form.review button").click()
    until(lambda: "Review saved" in browser.page_source, "the review saved")
    shoot(browser, site, "worklist-after-review")
    rows = browser.find_elements(By.CSS_SELECTOR, "main table tr")
    assert "wrong-patient" in rows[1].text
    reviews = audit(site, "--user", "rita")
    assert any(e["action"] == "review" and e["outcome"] == 0 and e["detail"] == "wrong-patient"
               for e in reviews)
    assert any(e["action"] == "view-study" for e in reviews)
    browser.get(f"{site.base}/ui/studies/{flagged_uid}")
    assert "third film is another patient" in browser.page_source

    # A reviewer may not open Operations: 403, audited.
    browser.get(site.base + "/ui/operations")
    assert "needs the role operator" in browser.page_source
    assert any(e["action"] == "denied" and "view-operations" in e["detail"]
               for e in audit(site, "--user", "rita"))


def test_a_viewer_sees_no_identifier_anywhere(site: Site, browser: Any) -> None:
    login(browser, site, "vera")
    secrets = site.identifiers()
    pages = {"worklist": browser.page_source}
    shoot(browser, site, "worklist-viewer")
    links = [a.get_attribute("href") for a in
             browser.find_elements(By.CSS_SELECTOR, "main table a")]
    assert len(links) == len(site.feed)
    for n, href in enumerate(links):
        assert "/ui/k/" in href
        browser.get(href)
        pages[href] = browser.page_source
        if n == 0:
            shoot(browser, site, "study-viewer")
    for name, source in pages.items():
        for secret in secrets:
            assert secret not in source, (name, secret)
    # Viewers may not use accession filters nor open identified pages.
    browser.get(site.base + "/ui/?accession=x")
    assert "reviewers and operators only" in browser.page_source
    uid = str(site.feed[0].datasets[0].StudyInstanceUID)
    browser.get(f"{site.base}/ui/studies/{uid}")
    assert "needs the role reviewer" in browser.page_source


def test_an_operators_retry_revives_a_dead_delivery(site: Site, browser: Any) -> None:
    def dead() -> list[dict[str, Any]]:
        out = pxsgate("outbox", "list", "--json", "--config", site.service.config)
        return [d for d in json.loads(out.stdout) if d["state"] == "dead"]
    before = until(dead, "a dead delivery")[0]
    login(browser, site, "otto")
    browser.get(site.base + "/ui/operations")
    page = browser.page_source
    for heading in ("Queues", "Dead deliveries", "Model and device", "Disk"):
        assert heading in page
    shoot(browser, site, "operations")
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "main table tr")
               if before["id"] in r.text)
    row.find_element(By.CSS_SELECTOR, "button.retry").click()
    until(lambda: "is due again" in browser.page_source, "the retry's message")

    def attempted_again() -> bool:
        out = pxsgate("outbox", "list", "--json", "--config", site.service.config)
        now = next(d for d in json.loads(out.stdout) if d["id"] == before["id"])
        return bool(now["updated_at"] > before["updated_at"]
                    and now["state"] in ("pending", "dead"))
    until(attempted_again, "the delivery attempted again")
    retried = [e for e in audit(site, "--user", "otto") if e["action"] == "retry-delivery"]
    assert retried
    assert retried[-1]["outcome"] == 0
    shoot(browser, site, "operations-after-retry")


def test_screenshots_for_the_readme(site: Site) -> None:
    """Two of the screenshots go into docs/screenshots (README's Web UI section); the rest
    stay with the test's tmp_path. Copied only when PXSGATE_SCREENSHOTS is set."""
    if not os.environ.get("PXSGATE_SCREENSHOTS"):
        pytest.skip("PXSGATE_SCREENSHOTS not set")
    out = REPO / "docs" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("worklist-reviewer", "study-reviewer"):
        shutil.copy(site.shots / f"{name}.png", out / f"{name}.png")
