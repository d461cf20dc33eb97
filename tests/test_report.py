"""report.html of run and study folders: valid HTML, the numbers of study.json, embedded PNGs,
no JavaScript or external files, escaped text, and (with chromium) a page that renders."""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from adaptsim.cl.config import ConfigError, parse_overrides
from adaptsim.cl.report import write_report, write_run_report
from adaptsim.cl.rundir import RunDir, loads_json
from adaptsim.cl.study.aggregate import aggregate_study, is_current
from PIL import Image
from test_aggregate import continual_metrics, federated_metrics, make_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Collects tables (rows of cell texts), img srcs, <details>/<pre> texts; checks nesting."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.imgs: list[str] = []
        self.tags: set[str] = set()
        self.pres: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        for k, v in attrs:
            if k.startswith("on") or (k in ("href", "src") and v and not v.startswith(("data:", "#"))):
                self.errors.append(f"external reference or handler: {tag} {k}={v[:40]}")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._pre = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre":
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors, page.errors[:5]
    assert page.stack == [], page.stack
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    return page


def check_images(page: Page, at_least: int) -> None:
    assert len(page.imgs) >= at_least
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
            assert min(im.size) >= 100


def table_by_header(page: Page, first: str, second: str) -> dict[str, dict[str, str]]:
    """The table whose header starts with (first, second), as {row label: {header: cell}}."""
    for t in page.tables:
        if t and t[0][:2] == [first, second]:
            return {r[0]: dict(zip(t[0], r, strict=True)) for r in t[1:]}
    raise AssertionError(f"no table with header {first}, {second}")


def _study(tmp_path) -> Path:
    return make_study(tmp_path, {
        "finetune": {s: continual_metrics(a) for s, a in enumerate([0.5, 0.55, 0.6])},
        "ewc": {0: continual_metrics(0.62), 1: continual_metrics(0.66),
                2: "RuntimeError: boom <script>x</script> & co"},
        "lwf": {0: continual_metrics(0.4), 1: None}}, baseline="finetune")


def test_study_report_holds_study_json(tmp_path):
    d = _study(tmp_path)
    out = write_report(d)
    assert out == d / "report.html"
    res = loads_json((d / "study.json").read_text())  # aggregated on the way (there was none)
    page = parse(out)
    means = table_by_header(page, "group", "n")
    diffs = table_by_header(page, "group", "n pairs")
    for g in res["groups"]:
        row = means[g["group"] + (" (baseline)" if g["group"] == "finetune" else "")]
        assert row["n"] == str(g["n"])
        assert len(row) == 2 + len(res["metric_keys"])
        for key in res["metric_keys"]:
            assert row[res["metrics"][key]["header"]] == g["metrics"][key]["display"]
        if g["vs_baseline"]:
            for key in res["metric_keys"]:
                m = g["vs_baseline"]["metrics"][key]
                assert diffs[g["group"]][res["metrics"][key]["diff_header"]] == m["display"]
    assert means["finetune (baseline)"]["A_last (%)"] == "65.00 ± 5.00"  # A_last = a + 0.1 over a = .5, .55, .6
    failed = table_by_header(page, "cell", "group")
    assert failed["ewc-s2"]["error"] == "RuntimeError: boom <script>x</script> & co"  # escaped: text, not a tag
    # per group: heat-map + A_t curve (lwf has one seed, the pending cell nothing); plus the overlay
    check_images(page, at_least=2 * 3 + 1)
    # every cell's resolved config, collapsible (+ study.yaml)
    assert page.tags >= {"details", "summary", "pre", "h1", "h2"}
    assert sum("strategy:" in p for p in page.pres) == 7  # 8 cells; the pending one has no folder yet
    assert any("name: demo" in p for p in page.pres)
    assert "lwf-s1 (pending)" in "".join(page.text)


def test_federated_study_and_run_reports(tmp_path):
    d = make_study(tmp_path, {"eps8": {0: federated_metrics(0.8, 8.0), 1: federated_metrics(0.7, 8.0)},
                              "no_dp": {0: federated_metrics(0.9, math.inf), 1: federated_metrics(0.8, math.inf)}},
                   kind="federated", baseline="no_dp")
    page = parse(write_report(d))
    captions = " ".join(page.text)
    for what in ("accuracy vs round", "accuracy vs ε", "bytes up/down per round", "all groups"):
        assert what in captions, what
    check_images(page, at_least=3 * 2 + 2)
    means = table_by_header(page, "group", "n")
    assert means["no_dp (baseline)"]["ε"] == "∞" and means["eps8"]["ε"] == "8.000 ± 0.000"
    # a single federated run folder
    cell = d / "cells" / "eps8-s0"
    page = parse(write_run_report(cell))
    rows = {t[0]: t[1] for t in table_by_header(page, "metric", "value").items()}
    assert rows["final acc (%)"]["value"] == "80.00" and rows["bytes up (MB)"]["value"] == "0.096"
    check_images(page, at_least=3)


def test_unlearning_run_report(tmp_path):
    rows = [{"requests_done": j, "forget_train_acc": 0.9 - 0.4 * j, "forget_test_acc": 0.8 - 0.3 * j,
             "retained_test_acc": 0.85} for j in range(3)]
    rd = RunDir.create(tmp_path, "u", {"unlearning": {"requests": [[0], [1]]}}, "unlearning")
    rd.write_metrics({"rows": rows, "final": rows[-1], "train_seconds": [1.0, 0.5, 0.5], "eval_seconds": [0.1] * 3})
    rd.mark_finished({})
    page = parse(write_report(rd.path))
    vals = {k: v["value"] for k, v in table_by_header(page, "metric", "value").items()}
    assert vals["retained test acc (%)"] == "85.00" and vals["train (s)"] == "2.00"
    check_images(page, at_least=1)


def test_report_reaggregates_when_stale_and_rejects_other_folders(tmp_path, capsys):
    d = _study(tmp_path)
    aggregate_study(d)
    assert is_current(d)
    earlier = time.time() - 60  # a study.json older than a cell's status: stale
    os.utime(d / "study.json", (earlier, earlier))
    assert not is_current(d)
    write_report(d)
    assert is_current(d)
    with pytest.raises(ConfigError, match="neither a study folder"):
        write_report(tmp_path)
    from adaptsim.cl.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a study folder" in err and len(err.splitlines()) == 1


def test_real_runs_end_to_end(tmp_path):
    """A real tiny run as a study cell: the run engine's own single-run report, then the study's."""
    from adaptsim.cl import engine

    d = make_study(tmp_path, {"finetune": {s: continual_metrics(a) for s, a in enumerate([0.3, 0.35])},
                              "simplecil": {}}, baseline="finetune")
    doc = loads_json((d / "cells.json").read_text())
    for seed in (0,):
        kind, cfg = engine.load(ROOT / "scenarios" / "tiny_digits.yaml", parse_overrides(
            [f"--run.out_dir={d / 'cells'}", f"--run.name=simplecil-s{seed}", f"--run.seed={seed}",
             "--run.checkpoint=false"]))
        res = engine.run_config(cfg, kind)
        assert (res.run_dir / "report.html").is_file()  # written by the engine after the run
        doc["cells"].append({"name": f"simplecil-s{seed}", "group": "simplecil", "seed": seed, "status": "finished",
                             "overrides": {"run.seed": seed}, "run_dir": f"cells/simplecil-s{seed}", "attempts": 1})
    single = parse(d / "cells" / "simplecil-s0" / "report.html")
    check_images(single, at_least=2)
    a_last = loads_json((d / "cells" / "simplecil-s0" / "metrics.json").read_text())["A_last"]
    assert table_by_header(single, "metric", "value")["A_last (%)"]["value"] == f"{100 * a_last:.2f}"
    from adaptsim.cl.rundir import dumps_json

    (d / "cells.json").write_text(dumps_json(doc))
    page = parse(write_report(d))
    res = loads_json((d / "study.json").read_text())
    g = {x["group"]: x for x in res["groups"]}
    assert g["simplecil"]["n"] == 1 and g["simplecil"]["vs_baseline"]["n_pairs"] == 1
    assert g["simplecil"]["vs_baseline"]["metrics"]["A_last"]["display"].endswith(" [—]")  # one pair: no CI
    shown = table_by_header(page, "group", "n")["simplecil"]["A_last (%)"]
    assert shown == g["simplecil"]["metrics"]["A_last"]["display"]
    check_images(page, at_least=5)  # 2 groups x (heat-map, A_t) + the overlay


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    out = write_report(_study(tmp_path))
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           out.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), proc.stderr[-2000:]
    if os.environ.get("ADAPTSIM_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ADAPTSIM_KEEP_SCREENSHOT"])
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 1600)
        small = rgb.resize((300, 400))
        pixels = list(small.getdata())
        non_white = sum(1 for p in pixels if min(p) < 235) / len(pixels)
        colours = len(set(rgb.getdata()))
    assert non_white > 0.05, f"page looks blank: {non_white:.1%} non-white pixels"
    assert colours > 200, f"page looks blank: {colours} distinct colours"  # text + figures, not a flat page
