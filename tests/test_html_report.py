"""index.html in a real browser: Debian's chromium and chromedriver, driven
by Selenium, headless.  Nothing is downloaded: the driver and the browser
are given by path, and Selenium Manager (which would fetch them) is made
to fail the test if anything calls it.

The report is written by write_reports from a run with a green, a red (a
compile error) and an infra cell, against a previous run in which the red
one was green; the browser must show the matrix, a red cell's reason, the
trend, and every link must open a file of the run folder.  The merged
report of two real nightly cells is opened the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from qemupatch import matrixreport as mr
from qemupatch.matrix import FAIL, INFRA, STAGES
from tests.test_matrixreport import (
    COMPILE_ERROR,
    MATRIX_TOML,
    run_of,
    target_result,
    write_target_folders,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# ci/setup-debian.sh installs both: their absence is a broken setup, not a skip.
assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
    "needs Debian's chromium and chromium-driver: run ci/setup-debian.sh")


@pytest.fixture(scope="module")
def browser():
    mp = pytest.MonkeyPatch()
    from selenium.webdriver.common import selenium_manager

    def no_download(*args, **kwargs):
        raise AssertionError("Selenium Manager was called: it would download a browser")

    mp.setattr(selenium_manager.SeleniumManager, "binary_paths", no_download)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--allow-file-access-from-files", "--window-size=1600,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        mp.undo()


RED_REASON = "QEMU did not compile: hw/misc/vmsocket.c:212: implicit declaration"


def runs():
    tonight = run_of(
        "20261127T071500Z",
        target_result("v10.2.2", "6.1"),
        target_result("v7.2.0", "6.1", {"build": FAIL}, reasons={"build": RED_REASON}),
        target_result("v10.0.2", "6.12", {"fetch": INFRA},
                      reasons={"fetch": "download of qemu-10.0.2.tar.xz failed: timeout"}))
    last = run_of("20261126T071500Z", target_result("v10.2.2", "6.1"),
                  target_result("v7.2.0", "6.1"), target_result("v10.0.2", "6.12"))
    return tonight, last


def file_of(url: str) -> Path:
    parsed = urlparse(url)
    assert parsed.scheme == "file", url
    return Path(unquote(parsed.path))


def check_links(browser, run_dir: Path) -> int:
    """Every link on the page points into the run folder at a file that
    exists; each one is opened in the browser too."""
    page = browser.current_url
    hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a[href]")]
    files = sorted({h.split("#")[0] for h in hrefs if h.split("#")[0] != page.split("#")[0]})
    anchors = [h.split("#", 1)[1] for h in hrefs if h.split("#")[0] == page.split("#")[0]]
    for anchor in anchors:
        assert browser.find_elements(By.ID, anchor), f"#{anchor} has no target"
    for url in files:
        path = file_of(url)
        assert path.is_file(), f"{url} does not resolve"
        assert path.resolve().is_relative_to(run_dir.resolve()), f"{url} leaves the run folder"
    for url in files:
        browser.get(url)
        assert "ERR_FILE_NOT_FOUND" not in browser.page_source, url
        if url.endswith(".json"):
            json.loads(browser.find_element(By.TAG_NAME, "body").text)
    browser.get(page)
    return len(files)


def test_report_renders_in_chromium(browser, tmp_path):
    tonight, last = runs()
    run_dir = tmp_path / "20261127T071500Z"
    write_target_folders(tonight, run_dir)
    html = mr.write_reports(tonight, run_dir, last)["html"]
    browser.get(html.as_uri())
    assert "qemupatch nightly" in browser.title and "fail" in browser.title

    # the matrix: a row per target, a column per stage (+ target, outcome)
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#matrix thead th")]
    assert heads == ["target", *STAGES, "outcome"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#matrix tbody tr")
    assert len(rows) == 3
    for row, t in zip(rows, tonight.targets):
        cells = row.find_elements(By.CSS_SELECTOR, "td.cell")
        assert len(cells) == len(STAGES)
        assert [c.get_attribute("data-outcome") for c in cells] == [s.outcome for s in t.stages]
        assert row.find_element(By.CSS_SELECTOR, "th").text.startswith(t.target.name)
        assert row.find_element(By.CSS_SELECTOR, "td.outcome").text == t.outcome

    # a red cell shows its reason, painted red; infra yellow; pass green
    red = rows[1].find_elements(By.CSS_SELECTOR, "td.cell")[STAGES.index("build")]
    assert red.is_displayed() and RED_REASON in red.text
    assert red.get_attribute("title") == RED_REASON
    colour = lambda el: el.value_of_css_property("background-color")
    assert colour(red) == "rgba(245, 181, 181, 1)"
    green = rows[0].find_elements(By.CSS_SELECTOR, "td.cell")[0]
    assert colour(green) == "rgba(200, 236, 200, 1)"
    infra = rows[2].find_elements(By.CSS_SELECTOR, "td.cell")[0]
    assert "download of qemu-10.0.2.tar.xz failed" in infra.text
    assert colour(infra) == "rgba(247, 229, 154, 1)"

    # the red cell's details: reason and the compiler's excerpt, as text
    red.find_element(By.LINK_TEXT, "details").click()
    detail = browser.find_element(By.CSS_SELECTOR, "section.detail.fail")
    assert detail.is_displayed()
    assert RED_REASON in detail.text
    assert detail.find_element(By.CSS_SELECTOR, "pre.excerpt").text == COMPILE_ERROR

    # the trend names the target that turned red
    trend = browser.find_element(By.ID, "trend")
    turned = trend.find_element(By.CSS_SELECTOR, 'li[data-kind="turned red"]')
    assert "v7.2.0-linux-6.1" in turned.text and "turned red" in turned.text
    assert "20261126T071500Z" in trend.text

    # every link resolves: target.json per row, a log per run stage
    browser.get(html.as_uri())
    assert check_links(browser, run_dir) == 3 + sum(
        1 for t in tonight.targets for s in t.stages if s.links)

    # a link that does not resolve is caught (the check can fail)
    shutil.rmtree(run_dir / "v7.2.0-linux-6.1" / "build")
    browser.get(html.as_uri())
    with pytest.raises(AssertionError, match="does not resolve"):
        check_links(browser, run_dir)


def test_merged_report_of_real_nightly_cells_renders(browser, lists_project, tmp_path):
    """Two cells run apart by the real nightly (fetch and rebase of a
    synthetic project: v2.0.0 green, v2.1.0 a real conflict), merged with
    the real CLI: the page shows both rows, the conflict's reason in the red
    cell, and every link (target.json, the rebase reports) opens."""
    proj = lists_project
    with open(proj.root / "qemupatch.toml", "a") as f:
        f.write(MATRIX_TOML)
    cells = []
    for name, code in (("v2.0.0-linux-6.1", 0), ("v2.1.0-linux-6.1", 1)):
        cells.append(tmp_path / "cells" / name)
        proj.cli("nightly", "--target", name, "--stages", "fetch,rebase", "--out",
                 str(cells[-1]), check_code=code)
    out = tmp_path / "merged"
    proj.cli("report", "merge", *map(str, cells), "--out", str(out), check_code=1)
    browser.get((out / mr.HTML_NAME).as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#matrix tbody tr")
    assert [r.get_attribute("data-target") for r in rows] == [c.name for c in cells]
    assert [r.find_element(By.CSS_SELECTOR, "td.outcome").text for r in rows] == ["pass", "fail"]
    red = rows[1].find_element(By.CSS_SELECTOR, 'td.cell[data-stage="rebase"]')
    assert red.get_attribute("data-outcome") == "fail"
    assert "does not carry onto v2.1.0: conflict in real.c" in red.text
    assert "v2.0.0-linux-6.1, v2.1.0-linux-6.1" in browser.find_element(
        By.CSS_SELECTOR, "dl.meta").text
    assert check_links(browser, out) >= 3


