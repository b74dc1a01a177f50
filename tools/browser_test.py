"""The course in a real browser: JupyterLab driven by Chromium through Playwright.

    python tools/browser_test.py                   # every notebook in notebooks/ and one exercise
    python tools/browser_test.py notebooks/03_attention.ipynb   # only these (paths under --source)
    python tools/browser_test.py --source /tmp/scratch           # a copy of the course elsewhere

`make browser-test` runs it (and `.ci/run` after `make test`). For each notebook it
opens the notebook in JupyterLab, runs all cells, waits for the kernel to go idle and
fails on any error or stderr output. Then, for every widget control (slider,
dropdown, text box, ...), it changes the control's value and fails unless the widget's
output changed and shows no traceback. Each widget's output is saved before and after
as .cache/browser-test/notebooks/<notebook>/widget-<n>-before.png and ...-after.png.

The committed notebooks are never touched: they are copied into a temporary folder
that JupyterLab serves. Kernels get the tests' environment (one CPU thread,
MINIGPT_DATA_DIR inherited). Needs the `browser` extra (Playwright for Python) and
Debian's Chromium (`apt-get install chromium`); Playwright's own browser download is
not used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXERCISE = "exercises/00_what_is_a_language_model.ipynb"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
RUN_TIMEOUT_S = 900  # one notebook's Run All
WIDGET_TIMEOUT_S = 120  # one widget's output after a change

# JupyterLab settings for the test only: every cell stays in the page (no windowing),
# no news or update pop-ups over the notebook.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "checkForUpdates": False,
        "fetchNews": "false",
    },
}

# Runs in the page: the open notebook, its kernel, and what the kernel sent that is
# an error or goes to stderr (whichever cell or widget callback it came from).
JS_SETUP = r"""async () => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  await panel.context.ready;
  await panel.sessionContext.ready;
  const kernel = panel.sessionContext.session.kernel;
  await kernel.info;
  // The widget manager opens its control channel as soon as the kernel starts, before
  // ipywidgets is imported there: the kernel logs that, and it is no cell's output.
  const NOISE = /^(No such comm target registered: jupyter\.widget\.control|No such comm: [0-9a-f-]+)$/;
  window.__bt = {panel, kernel, problems: [], runDone: false};
  kernel.iopubMessage.connect((_, msg) => {
    const t = msg.header.msg_type, c = msg.content;
    if (t === 'error') {
      window.__bt.problems.push(`error ${c.ename}: ${c.evalue}\n` + c.traceback.join('\n'));
    } else if (t === 'stream' && c.name === 'stderr') {
      const text = c.text.split('\n').filter(l => l.trim() && !NOISE.test(l)).join('\n');
      if (text) window.__bt.problems.push('stderr: ' + text);
    }
  });
  panel.content.widgets.forEach((cell, i) => cell.node.setAttribute('data-bt-cell', i));
  return panel.content.widgets.length;
}"""

JS_STATE = """() => {
  const {panel, kernel, problems} = window.__bt;
  const code = panel.content.widgets.filter(c => c.model.type === 'code');
  return {
    kernel: kernel.status,
    running: code.filter(c => c.model.executionState === 'running').length,
    unexecuted: code.filter(c => c.model.executionCount === null).length,
    cells: code.length,
    problems: problems.length,
    runDone: window.__bt.runDone,
  };
}"""

# The cells whose outputs hold a widget, and error or stderr outputs in any cell.
JS_OUTPUTS = """() => {
  const {panel} = window.__bt;
  const widgetCells = [], bad = [];
  panel.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    for (const out of cell.model.outputs.toJSON()) {
      if (out.output_type === 'error') bad.push(`cell ${i}: ${out.ename}: ${out.evalue}`);
      if (out.output_type === 'stream' && out.name === 'stderr') bad.push(`cell ${i} stderr: ${out.text}`);
      const data = out.data || {};
      if ('application/vnd.jupyter.widget-view+json' in data && !widgetCells.includes(i)) widgetCells.push(i);
    }
  });
  return {widgetCells, bad};
}"""

JS_RUN_ALL = """async () => {
  const app = window.jupyterapp;
  await app.commands.execute('notebook:clear-all-cell-outputs');
  app.commands.execute('notebook:run-all-cells').then(() => { window.__bt.runDone = true; });
}"""

CONTROLS = ", ".join(
    [
        ".widget-dropdown select",
        ".widget-slider",
        ".widget-text input",
        ".widget-textarea textarea",
        ".widget-checkbox input",
        ".widget-toggle-buttons",
        ".widget-radio-box",
    ]
)
TRACEBACK = (
    '[data-mime-type="application/vnd.jupyter.error"], '
    '[data-mime-type="application/vnd.jupyter.stderr"]'
)


class Failure(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernel_env(settings_dir: Path) -> dict[str, str]:
    """The server's environment, which its kernels inherit: the tests' settings."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    shared = REPO.parent / "shared" / "data"  # as conftest.py does
    if "MINIGPT_DATA_DIR" not in env and shared.is_dir():
        env["MINIGPT_DATA_DIR"] = str(shared)
    # the package of this checkout, whatever folder the kernel starts in
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JUPYTERLAB_SETTINGS_DIR"] = str(settings_dir)
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(settings_dir / "workspaces")
    return env


def start_lab(root: Path, settings_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    for name, value in LAB_SETTINGS.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        cmd, env=kernel_env(settings_dir), stdout=log, stderr=subprocess.STDOUT, cwd=root
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failure(f"JupyterLab exited ({proc.returncode}); see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                return proc, f"{url}|{token}"
        except OSError:
            time.sleep(0.5)
    raise Failure(f"JupyterLab did not answer within 120 s; see {log_path}")


def wait_idle(page, timeout_s: float, what: str) -> dict:
    """Until the kernel is idle and no cell runs (or something went wrong)."""
    deadline = time.monotonic() + timeout_s
    idle_since = None
    while time.monotonic() < deadline:
        s = page.evaluate(JS_STATE)
        if s["problems"]:
            return s
        if s["kernel"] in ("dead", "autorestarting", "restarting"):
            raise Failure(f"{what}: the kernel died (out of memory?); see jupyterlab.log")
        quiet = s["kernel"] == "idle" and s["running"] == 0
        if quiet and s["runDone"] and s["unexecuted"] == 0:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 0.5:
                return s
        else:
            idle_since = None
        page.wait_for_timeout(250)
    raise Failure(f"{what}: not done within {timeout_s:.0f} s ({s})")


def problems(page, since: int = 0) -> list[str]:
    return page.evaluate("() => window.__bt.problems")[since:]


def output_html(cell) -> str:
    outs = cell.locator(".widget-output")
    if outs.count() == 0:
        outs = cell.locator(".jp-OutputArea-output")
    return "\n".join(outs.evaluate_all("els => els.map(e => e.innerHTML)"))


def change(control, page) -> str:
    """Give the control another value (as a user would); say what was done."""
    classes = control.get_attribute("class") or ""
    tag = control.evaluate("e => e.tagName.toLowerCase()")
    if tag == "select":
        options = [o.replace("\xa0", " ") for o in control.locator("option").all_inner_texts()]
        current = control.evaluate("e => e.selectedIndex")
        new = (current + 1) % len(options)
        control.select_option(index=new)
        return f"dropdown {options[current]!r} -> {options[new]!r}"
    if "widget-slider" in classes:
        handle = control.locator(".noUi-handle").first
        readout = control.locator(".widget-readout").first
        before = readout.inner_text()
        handle.focus()
        page.keyboard.press("ArrowRight")
        if readout.inner_text() == before:  # at its maximum
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("ArrowLeft")
        return f"slider {before} -> {readout.inner_text()}"
    if tag in ("input", "textarea") and control.get_attribute("type") == "checkbox":
        control.click()
        return "checkbox toggled"
    if tag in ("input", "textarea"):
        old = control.input_value()
        new = "Hello, world! 42 tokens" if old != "Hello, world! 42 tokens" else "Goodbye."
        control.fill(new)
        control.press("Enter")
        return f"text {old!r} -> {new!r}"
    if "widget-toggle-buttons" in classes or "widget-radio-box" in classes:
        sel = "button:not(.mod-active)" if "toggle" in classes else "input:not(:checked)"
        control.locator(sel).first.click()
        return "choice changed"
    raise Failure(f"no way to change a control with class {classes!r}")


def check_widgets(page, cells: list[int], shots: Path) -> list[str]:
    """Change every control of every widget cell; return what was done."""
    done = []
    n = 0
    for i in cells:
        cell = page.locator(f'[data-bt-cell="{i}"]')
        area = cell.locator(".jp-Cell-outputArea")
        try:
            cell.locator(".jupyter-widgets").first.wait_for(timeout=30_000)
        except Exception as e:
            raise Failure(f"cell {i}: its widget did not render") from e
        controls = cell.locator(CONTROLS)
        if controls.count() == 0:
            raise Failure(f"cell {i}: a widget output without any control the test knows")
        for k in range(controls.count()):
            n += 1
            control = controls.nth(k)
            control.scroll_into_view_if_needed()
            page.wait_for_timeout(300)  # a chart drawn at display time settles
            before = output_html(cell)
            area.screenshot(path=shots / f"widget-{n}-before.png")
            seen = len(problems(page))
            what = change(control, page)
            deadline = time.monotonic() + WIDGET_TIMEOUT_S
            while output_html(cell) == before:
                if time.monotonic() > deadline:
                    raise Failure(f"cell {i}, widget {n} ({what}): its output did not change")
                page.wait_for_timeout(200)
            wait_idle(page, WIDGET_TIMEOUT_S, f"cell {i}, widget {n}")
            page.wait_for_timeout(500)  # the last output message is drawn
            area.screenshot(path=shots / f"widget-{n}-after.png")
            bad = problems(page, seen)
            shown = area.inner_text()
            if bad or area.locator(TRACEBACK).count() or "Traceback" in shown:
                text = "\n".join(bad) or shown
                raise Failure(f"cell {i}, widget {n} ({what}) raised:\n{text[-3000:]}")
            done.append(f"cell {i}, widget {n}: {what}")
    return done


def check_notebook(context, base: str, token: str, rel: str, shots: Path) -> dict:
    shots.mkdir(parents=True, exist_ok=True)
    page = context.new_page()
    start = time.monotonic()
    try:
        page.goto(f"{base}/lab/tree/{rel}?reset&token={token}")
        page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
            " && window.jupyterapp.shell.currentWidget.sessionContext",
            timeout=120_000,
        )
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.evaluate(JS_SETUP)
        page.wait_for_function("() => window.__bt.kernel.status === 'idle'", timeout=120_000)
        # fresh outputs only (a cell that did not run has none), then Run All
        page.evaluate(JS_RUN_ALL)
        state = wait_idle(page, RUN_TIMEOUT_S, "Run All")
        run_s = time.monotonic() - start
        outs = page.evaluate(JS_OUTPUTS)
        bad = problems(page) + outs["bad"]
        if bad:
            raise Failure("Run All: error or stderr output:\n" + "\n".join(bad)[-3000:])
        if state["unexecuted"]:
            raise Failure(f"Run All: {state['unexecuted']} cells did not run")
        widgets = check_widgets(page, outs["widgetCells"], shots)
        return {
            "run_s": round(run_s, 1),
            "total_s": round(time.monotonic() - start, 1),
            "widgets": widgets,
        }
    except Failure:
        page.screenshot(path=shots / "failure.png", full_page=False)
        raise
    finally:
        with contextlib.suppress(Exception):  # the kernel goes when the page goes, anyway
            page.evaluate("() => window.__bt && window.__bt.panel.sessionContext.shutdown()")
        page.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", help="paths relative to --source")
    ap.add_argument("--source", type=Path, default=REPO, help="the course checkout to copy")
    ap.add_argument("--exercise", default=DEFAULT_EXERCISE)
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "browser-test")
    ap.add_argument("--headed", action="store_true", help="show the browser window")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    source = args.source.resolve()
    rels = args.notebooks or [
        *(f"notebooks/{p.name}" for p in sorted((source / "notebooks").glob("*.ipynb"))),
        args.exercise,
    ]
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    results, failures = {}, {}
    total = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="minigpt-browser-") as tmp:
        root, settings = Path(tmp) / "course", Path(tmp) / "settings"
        for rel in rels:  # a copy: the committed notebooks keep their outputs
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, root / rel)
        proc, where = start_lab(root, settings, args.out / "jupyterlab.log")
        base, token = where.split("|")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM,
                    headless=not args.headed,
                    args=["--no-sandbox"] if os.geteuid() == 0 else [],
                )
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                for rel in rels:
                    print(f"{rel} ...", flush=True)
                    shots = args.out / Path(rel).with_suffix("")  # e.g. notebooks/03_attention
                    try:
                        r = check_notebook(context, base, token, rel, shots)
                    except Failure as e:
                        failures[rel] = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # no colours
                        print(
                            f"  FAILED: {failures[rel]}\n  screenshot: {shots / 'failure.png'}",
                            flush=True,
                        )
                        continue
                    results[rel] = r
                    print(
                        f"  ok: Run All {r['run_s']} s, {len(r['widgets'])} widgets, "
                        f"{r['total_s']} s in all",
                        flush=True,
                    )
                    for w in r["widgets"]:
                        print(f"    {w}", flush=True)
                browser.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    seconds = round(time.monotonic() - total, 1)
    report = {"seconds": seconds, "ok": results, "failed": failures}
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{len(results)} passed, {len(failures)} failed in {seconds} s; "
        f"screenshots and report in {args.out}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
