"""`plan --report plan.html`: self-contained page with the charts; renders in headless Chromium."""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _plan_report(run_cli, path: Path, cluster: str, *extra: str):
    args = ["plan", "--model", "llama3.1-8b", "--cluster", cluster, "--seq-len", "4096",
            "--gbs", "64", "--report", str(path), *extra]
    return run_cli(args)


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


@pytest.fixture(scope="module")
def hetero_report(tmp_path_factory):
    """One report for a heterogeneous (mixed NIC) cluster, written through the CLI."""
    from planner.cli import main

    path = tmp_path_factory.mktemp("report") / "plan.html"
    cluster = str(ROOT / "examples" / "clusters" / "holmes-ib-roce.yaml")
    argv = ["meshplan", "plan", "--model", "llama3.1-8b", "--cluster", cluster, "--seq-len",
            "4096", "--gbs", "64", "--report", str(path)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", argv)
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None)
    return path


def test_report_is_self_contained_with_all_charts(hetero_report):
    page = hetero_report.read_text()
    images = _images(page)
    assert len(images) == 4  # time breakdown, memory breakdown, Gantt, placement
    assert all(img.startswith(b"\x89PNG") and len(img) > 5000 for img in images)
    assert not re.search(r"(src|href)=['\"]https?:", page)  # nothing fetched from elsewhere
    assert "Ranked layouts" in page and "<table>" in page
    for node in ("gpu01", "gpu08"):  # every node appears in the placement table
        assert node in page
    assert "simulated vs" in page


def test_homogeneous_report(tmp_path, run_cli):
    path = tmp_path / "r.html"
    code, out, err = _plan_report(run_cli, path, "dgx-h100", "--nodes", "2")
    assert code == 0, err
    page = path.read_text()
    assert len(_images(page)) == 4 and "cost model megatron" in page


def test_unwritable_report_path_is_one_line(tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _plan_report(run_cli, blocker / "r.html", "dgx-h100", "--nodes", "2")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "report" in err


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                    "(apt-get install -y chromium) — the page itself is checked above")
def test_report_renders_in_headless_chromium(hetero_report, tmp_path):
    from matplotlib import image

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,2000", hetero_report.resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    pixels = image.imread(shot)
    assert pixels.shape[0] == 2000 and pixels.shape[1] == 1200
    # The charts render: many coloured (not grey/white) pixels — bar colours, Gantt, links.
    rgb = pixels[..., :3]
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.25
    assert coloured.mean() > 0.01


def test_link_colour_scale_uniform_links_are_not_slow():
    from planner.html_report import _link_colour_limits

    assert _link_colour_limits(45.0, 45.0) == (0.0, 45.0)  # all the same: green, not red
    assert _link_colour_limits(45.0, 45.2) == (0.0, 45.2)  # within 1%: measurement noise
    assert _link_colour_limits(1.1, 45.0) == (1.1, 45.0)   # a real spread: slowest is red
