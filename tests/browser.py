"""Headless Chromium for the UI test: Debian's `chromium` and `chromium-driver`, installed here with apt-get when
missing (CI runs `make test` as root on a fresh machine), driven by selenium through the system chromedriver, so
selenium-manager never downloads anything. The browser's profile, cache and crash dumps stay under a temp dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGES = ["chromium", "chromium-driver"]


def _found() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def ensure_chromium() -> tuple[str, str]:
    """Paths of `chromium` and `chromedriver`; installs the Debian packages first when either is missing. Raises
    RuntimeError naming what failed and how to install them by hand (a failure, not a skip)."""
    browser, driver = _found()
    if browser and driver:
        return browser, driver
    manual = f"apt-get update && apt-get install -y --no-install-recommends {' '.join(PACKAGES)}"
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"the UI test needs {' and '.join(PACKAGES)} (chromium, chromedriver on PATH); "
                           f"apt-get is not available here to install them: install them by hand")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RuntimeError(f"the UI test needs {' and '.join(PACKAGES)}; not root and no sudo to install them: "
                               f"run `{manual}` as root")
        prefix = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]  # sudo resets the environment
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    outputs = []
    # the package lists first; a failed update is reported only if the install then fails too
    # at most 9 minutes in all: the test's own limit is 10 (pytest-timeout)
    for command, timeout in ((["apt-get", "update"], 180),
                             (["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=60",
                               *PACKAGES], 360)):
        try:
            proc = subprocess.run([*prefix, *command], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"`{' '.join(command)}` took over {e.timeout:.0f}s; run `{manual}` as root") from e
        outputs.append(f"$ {' '.join([*prefix, *command])} -> {proc.returncode}\n{proc.stdout[-1500:]}\n"
                       f"{proc.stderr[-1500:]}")
        if proc.returncode != 0 and command[1] == "install":
            raise RuntimeError(f"could not install the UI test's browser ({' and '.join(PACKAGES)}); run "
                               f"`{manual}` as root:\n" + "\n".join(outputs))
    browser, driver = _found()
    if not (browser and driver):
        raise RuntimeError(f"installed {' and '.join(PACKAGES)} but found chromium={browser}, "
                           f"chromedriver={driver} on PATH")
    return browser, driver


@contextmanager
def headless_chromium(workdir: Path, width: int = 1600, height: int = 1200) -> Iterator:
    """A selenium WebDriver for headless Chromium whose profile, cache and logs live in `workdir`; quit after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = ensure_chromium()
    workdir.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --disable-3d-apis: no WebGL. The UI draws a run's graph with WebGL, which Chromium then renders in software on
    # the CPU without end: every WebDriver command took 1-8 s on 2 cores. The test reads the tabs, not that canvas.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-3d-apis",
                 f"--window-size={width},{height}", f"--user-data-dir={workdir / 'profile'}",
                 f"--disk-cache-dir={workdir / 'cache'}", f"--crash-dumps-dir={workdir / 'crashes'}",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 "--disable-background-networking", "--disable-sync", "--disable-component-update",
                 "--metrics-recording-only", "--lang=en-US"):
        options.add_argument(flag)
    # Chromium writes crash-report settings and dconf state under $HOME and the XDG dirs even with a profile dir
    home = workdir / "home"
    for sub in ("config", "cache"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    # TMPDIR holds Chromium's singleton socket, whose path must fit a unix socket's 107 bytes: a short temp dir,
    # not one under pytest's tmp_path (whose length grows with the test's name and the run's number)
    tmp = tempfile.mkdtemp(prefix="chr-")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "TMPDIR": tmp}
    try:
        service = Service(executable_path=driver_path, log_output=str(workdir / "chromedriver.log"), env=env)
        driver = webdriver.Chrome(service=service, options=options)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
