"""Headless Chromium for the explorer's browser tests and for the README screenshot
(scripts/explorer_screenshot.py): Debian's chromium and chromedriver, driven by Selenium."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = (
    None if CHROMIUM and CHROMEDRIVER else
    "Chromium or ChromeDriver is not installed (apt-get install chromium chromium-driver; .ci/run does this)"
)
# Flags that work on these machines: no sandbox as root, and none of Chromium's own background
# traffic (the network is closed; without them it retries lookups at every start).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


@contextmanager
def chromium(*, width: int = 1200, height: int = 1000, scale: float = 1.0) -> Iterator[Any]:
    """A Selenium driver for headless Chromium with a fresh profile, logging the console and the
    DevTools network events (``driver.get_log("browser" | "performance")``)."""
    from selenium import webdriver

    profile = tempfile.mkdtemp(prefix="explorer-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                  f"--force-device-scale-factor={scale}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path: Selenium Manager (which would go online) is never started.
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
