"""The HTML reports in a real browser (issue #18): `report.html` and the main job's `index.html`
rendered by headless Chromium through Selenium and Debian's `chromedriver`. A page fails on a
console error or uncaught exception, an image that did not load, a relative link to a file that
does not exist, or a conclusion that is missing or not visible on the first screen.

Skips where no Chromium and chromedriver are installed (`apt-get install chromium
chromium-driver`; `.ci/run` does it where it can)."""

import base64
import importlib.util
import os
import shutil
import urllib.parse
import urllib.request

import numpy as np
import pytest

import jsubspace
from jsubspace import report
from jsubspace import testing

WIDTH, HEIGHT = 1280, 900

BROWSER = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
DRIVER = shutil.which("chromedriver")


def _skip_reason() -> str | None:
    if BROWSER is None:
        return "no Chromium on PATH (apt-get install chromium chromium-driver)"
    if DRIVER is None:
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox will not start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},{HEIGHT}",
    ):
        options.add_argument(arg)
    # Every console message, uncaught exception and failed load, read back with get_log.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A driver path given to Service: Selenium Manager (which downloads drivers) never runs.
    browser = webdriver.Chrome(options=options, service=Service(DRIVER))
    browser.set_page_load_timeout(60)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Two small planted populations analysed into a main-job directory (`zoo/<name>/report.html`)
    with its `index.html` written by the main job's own `index_html` and `plot_function`; the
    function numbers are made up (training the zoo would take minutes). Returns
    `{page, relative to the main job's directory: (its path, the conclusions it must show)}`."""
    root = tmp_path_factory.mktemp("browser")
    n, shape = 8, (24, 16)
    cases = ["shared_both", "noise"]
    dense = {c: testing.planted_case(c, j, n_models=n, shape=shape) for j, c in enumerate(cases)}
    for i in range(n):
        testing.write_safetensors(
            root / "pop" / "dense" / f"m{i:02d}.safetensors",
            {f"{c}.weight": x[i] for c, x in dense.items()},
        )
    a, b = testing.planted_lora_case("lora_half_shared_init", 7, n_models=n, shape=shape)
    for i in range(n):
        testing.write_peft_adapter(
            root / "pop" / "lora" / f"a{i:02d}", {"model.q_proj": (a[i], b[i])}, r=4, lora_alpha=8
        )
    zoo = root / "zoo"
    analyses = {
        name: jsubspace.analyze(
            [str(root / "pop" / src)],
            str(zoo / name),
            null_draws=2,
            holdout=4,
            num_devices=2,
            quiet=True,
        )
        for name, src in (("trained", "dense"), ("lora", "lora"))
    }
    function = {
        "ks": [1, 2, 4],
        "seen": [0.52, 0.71, 0.9],
        "held_out": [0.41, 0.63, 0.84],
        "original_seen": 0.95,
        "original_held_out": 0.93,
        "mean_only_seen": 0.3,
        "mean_only_held_out": 0.28,
        "chance": 0.2,
    }
    from jsubspace import zoo as zoo_lib

    zoo_lib.plot_function(function, str(zoo / "function.png"))
    tables = {name: report.verdict_rows(res) for name, res in analyses.items()}
    (zoo / "index.html").write_text(zoo_lib.index_html(analyses, tables, function))
    out = {"index.html": (str(zoo / "index.html"), [r["conclusion"] for r in analyses.values()])}
    for name, res in analyses.items():
        page = f"{name}/report.html"
        out[page] = (str(zoo / page), [f"Conclusion: {res['conclusion']}."])
    for _, conclusions in out.values():
        assert all(c.strip(" .") and not c.endswith(": .") for c in conclusions), conclusions
    return out


_IMAGES = """return Array.from(document.images, (im) => ({
    src: im.getAttribute('src').slice(0, 80), complete: im.complete, width: im.naturalWidth}));"""
_LINKS = """return Array.from(document.querySelectorAll('a[href]'), (a) => ({
    raw: a.getAttribute('href'), url: a.href}));"""


def problems(driver, path: str, conclusions: list[str], screenshot: str) -> list[str]:
    """What is wrong with the page at `path` rendered in `driver`: console errors and uncaught
    exceptions, images not loaded, relative links to missing files or anchors, and conclusions
    missing, hidden, or (the first) below the first screen. Writes a full-page PNG to
    `screenshot`."""
    driver.get_log("browser")  # drops what earlier pages left
    driver.set_window_size(WIDTH, HEIGHT)
    driver.get(urllib.parse.urljoin("file:", urllib.request.pathname2url(path)))
    found = []
    found += [
        f"console {e['source']}: {e['message']}"
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
    ]
    found += [
        f"image not loaded: {im['src']}"
        for im in driver.execute_script(_IMAGES)
        if not (im["complete"] and im["width"] > 0)
    ]
    for link in driver.execute_script(_LINKS):
        url = urllib.parse.urlsplit(link["url"])
        if url.scheme != "file":
            continue  # the web is not reachable from the tests
        if link["raw"].startswith("#"):
            anchor = urllib.parse.unquote(url.fragment)
            if anchor and not driver.execute_script(
                "return document.getElementById(arguments[0]) !== null", anchor
            ):
                found.append(f"link to a missing anchor: {link['raw']}")
        elif not os.path.exists(urllib.request.url2pathname(url.path)):
            found.append(f"link to a missing file: {link['raw']}")
    from selenium.webdriver.common.by import By

    for i, conclusion in enumerate(conclusions):
        shown = [
            el
            for el in driver.find_elements(By.TAG_NAME, "b")
            if el.is_displayed() and el.text.strip() == conclusion
        ]
        if not shown:
            found.append(f"conclusion not shown: {conclusion!r}")
        elif i == 0 and shown[0].rect["y"] + shown[0].rect["height"] > HEIGHT:
            found.append(f"conclusion below the first screen (y={shown[0].rect['y']:.0f})")
    # The whole page in one PNG (Chromium's own capture beyond the viewport).
    size = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
        },
    )
    with open(screenshot, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    return found


def _assert_rendered(screenshot: str) -> None:
    """The screenshot is a PNG of the page, not an empty canvas."""
    import matplotlib.image

    assert os.path.getsize(screenshot) > 0
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[0] >= HEIGHT // 2 and pixels.shape[1] >= WIDTH // 2, pixels.shape
    assert np.ptp(pixels[..., :3]) > 0.5, "a blank page"


@pytest.mark.parametrize("page", ["index.html", "trained/report.html", "lora/report.html"])
def test_page_renders_without_errors(driver, pages, tmp_path, page):
    path, conclusions = pages[page]
    screenshot = str(tmp_path / "page.png")
    found = problems(driver, path, conclusions, screenshot)
    assert not found, f"{path}:\n" + "\n".join(found)
    _assert_rendered(screenshot)


_BREAKAGES = {
    "console error": ("</body>", "<script>console.error('boom')</script></body>", "console"),
    "uncaught exception": ("</body>", "<script>notDefined()</script></body>", "console"),
    "broken image": ('<img src="data:', '<img src="missing.png" data-x="', "image not loaded"),
    "dead link": ("</h1>", "</h1><a href='nowhere/report.html'>x</a>", "missing file"),
    "dead anchor": ("</h1>", "</h1><a href='#nowhere'>x</a>", "missing anchor"),
    "missing conclusion": ("Conclusion: ", "Summary: ", "conclusion not shown"),
    "hidden conclusion": ("<p><b>Conclusion", "<p hidden><b>Conclusion", "conclusion not shown"),
    "conclusion below the fold": (
        "<p><b>Conclusion",
        "<div style='height:3000px'></div><p><b>Conclusion",
        "below the first screen",
    ),
}


@pytest.mark.parametrize("breakage", list(_BREAKAGES))
def test_each_breakage_is_caught(driver, pages, tmp_path, breakage):
    """The check itself: a copy of a report broken in one way fails it (and only that way)."""
    path, conclusions = pages["trained/report.html"]
    old, new, expected = _BREAKAGES[breakage]
    page = open(path, encoding="utf-8").read()
    assert old in page
    broken = os.path.join(os.path.dirname(path), f"broken_{breakage.replace(' ', '_')}.html")
    with open(broken, "w", encoding="utf-8") as f:
        f.write(page.replace(old, new, 1))
    try:
        found = problems(driver, broken, conclusions, str(tmp_path / "broken.png"))
    finally:
        os.remove(broken)
    assert any(expected in p for p in found), found
    # Nothing else (a missing image is also a failed load in the console).
    assert all(expected in p or p.startswith("console network") for p in found), found
