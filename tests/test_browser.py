"""The report opened in a real browser: hostile text stays text and nothing phones home.

The page is rendered by toxtests.report, opened by headless Chromium from a file:// URL
(as a reviewer opens an attached report), and Chromium's own DOM after the scripts had
time to run is compared with the page a harmless run gives. A tiny HTTP server on
localhost stands in for an attacker's beacon: it must see no request at all.

Each defence is checked on its own: the real page (escaping and CSP), the page with its
CSP removed (escaping alone), and the raw payloads under the report's CSP (CSP alone). A
control page with the payloads unescaped and no CSP proves the harness notices when they
do run.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from toxtests.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)
TITLE = "toxtests report: FAIL"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
# Every payload that runs creates an element whose id starts with "pwn", or renames the page.
MARK = "document.body.appendChild(Object.assign(document.createElement('div'),{id:'pwn-%s'}))"


def script_payloads(port: int) -> list[str]:
    beacon = f"http://127.0.0.1:{port}"
    return [
        f"<script>document.title='pwned';{MARK % 'script'}</script>",
        f'<img src=x onerror="{MARK % "img"}">',
        f'<svg onload="{MARK % "svg"}"><circle r=1 /></svg>',
        "<a id=pwn-link href=\"javascript:document.title='pwned'\">click me</a>",
        f'<iframe id=pwn-frame src="javascript:parent.{MARK % "iframe"}"></iframe>',
        f"</script><script>{MARK % 'breakout'}</script>",
        f"</textarea></pre></title></style><script>{MARK % 'close'}</script>",
        f'"\'><div id=pwn-attr onmouseover="{MARK % "hover"}">',
        f'<img src="{beacon}/beacon">',
        f'<div style="background:url({beacon}/css-url)">x</div>',
        f"<style>@import url({beacon}/import);</style>",
        f'<link rel=stylesheet href="{beacon}/link">',
        "\u2028]]>--><!--",
    ]


def navigation_payloads(port: int) -> list[str]:
    # A refresh would replace the page (and the CSP does not cover it): escaping must.
    return [f'<meta http-equiv="refresh" content="0;url=http://127.0.0.1:{port}/refresh">']


def make_result(text: str) -> dict[str, Any]:
    """A gate result (the schema GateSession.result writes) with `text` in every string a
    prompt file, a model, a command line or a thresholds file can set."""

    from test_report import _metric as metric

    return {
        "toxtests_version": "0.1.0",
        "created": "2026-11-23T15:00:00Z",
        "verdict": "fail",
        "exit_code": 1,
        "config": {
            "generation": {"max_new_tokens": 20, "samples": 1, "seed": 0},
            "scoring": {
                "scorer": text,
                "attribute": text,
                "threshold": 0.5,
                "huggingface_config": text,
            },
            "statistics": {"confidence": 0.95, "method": text},
            "shards": {"by": "category", "size": 20},
            "gate": {
                "toxicity_rate": {"max_increase": 0.05},
                "shard": {text: {"toxicity_rate": {"max_increase": 0.1}}},
            },
            "source": text,
        },
        "model": {
            "spec": text,
            "fingerprint": text,
            "kind": text,
            "dtype": "float32",
            "device": "cpu",
        },
        "scorer": {
            "spec": text,
            "fingerprint": text,
            "attributes": [text, "profanity"],
            "primary": text,
            "threshold": 0.5,
        },
        "prompts": {
            "source": text,
            "lines_read": 3,
            "prompts": 2,
            "used": 2,
            "skipped": [{"line": 2, "reason": text}],
            "fingerprint": text,
        },
        "versions": {"python": "3.11.7", text: text},
        "shards": [{"name": text, "category": text, "prompts": 2}],
        "early_stopping": {
            "enabled": False,
            "stopped": False,
            "prompts_generated": 2,
            "prompts_total": 2,
            "reason": text,
        },
        "adapters": [
            {
                "adapter": text,
                "name": text,
                "fingerprint": text,
                "verdict": "fail",
                "summary": text,
                "metrics": {
                    "toxicity_rate": metric(0.0, 0.5, "fail"),
                    "expected_max_toxicity": metric(0.1, 0.6, "fail"),
                    "rate:" + text: metric(0.0, 0.5, None),
                },
                "checks": [
                    {
                        "scope": "all",
                        "metric": "toxicity_rate",
                        "rule": "max_increase",
                        "limit": 0.05,
                        "statistic": 0.5,
                        "interval": [0.4, 0.6],
                        "p_fail": 0.0,
                        "p_fail_adjusted": 0.0,
                        "verdict": "fail",
                        "prompts_needed": None,
                    },
                    {
                        "scope": text,
                        "metric": text,
                        "rule": text,
                        "limit": 0.1,
                        "statistic": 0.5,
                        "interval": [0.0, 1.0],
                        "p_fail": 0.2,
                        "p_fail_adjusted": 0.4,
                        "verdict": "inconclusive",
                        "prompts_needed": 9,
                    },
                ],
                "shards": [
                    {
                        "shard": text,
                        "category": text,
                        "prompts": 2,
                        "verdict": "fail",
                        "metrics": {"toxicity_rate": metric(0.0, 0.5, "fail")},
                    },
                ],
                "distributions": {"parent": [0.01, 0.2], "adapter": [0.9, 0.3]},
                "turned_toxic": [
                    {
                        "prompt_id": text,
                        "prompt": text,
                        "sample": 0,
                        "parent_text": text,
                        "parent_score": 0.01,
                        "adapter_text": text,
                        "adapter_score": 0.9,
                    },
                ],
                "generation": {"empty_parent": 0, "empty_adapter": 0},
            }
        ],
    }


# ------------------------------------------------------------------ the harness


@dataclass
class Beacon:
    """An HTTP server on localhost that records every request it gets."""

    port: int
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def beacon() -> Iterator[Beacon]:
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Beacon(port=server.server_address[1], requests=seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def browse(page: Path, profile: Path) -> str:
    """Chromium's DOM of `page` after scripts, timers and loads had 5 s of virtual time."""
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "</html>" in done.stdout, done.stderr[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """A dumped DOM as elements (tag, attributes), visible text and the title."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.title = ""
        self.scripts: list[str] = []
        self._open: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))
        if tag in ("title", "script", "style"):
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        where = self._open[-1] if self._open else None
        if where == "title" and len(self._open) == 1 and not self.title:
            self.title = data
        elif where == "script":
            self.scripts.append(data)
        elif where is None:
            self.text.append(data)

    def shape(self) -> list[tuple[str, tuple[str, ...]]]:
        """Which elements there are, in order, with which attributes (not their values);
        the CSP's <meta> aside, which one variant removes on purpose."""
        return [
            (tag, tuple(sorted(attrs)))
            for tag, attrs in self.elements
            if not (tag == "meta" and "http-equiv" in attrs)
        ]

    def injected(self) -> list[str]:
        """Evidence of a payload that ran or became markup."""
        found = []
        for tag, attrs in self.elements:
            if attrs.get("id", "").lower().startswith("pwn"):
                found.append(f"<{tag} id={attrs['id']}>")
            found += [f"<{tag} {name}>" for name in attrs if name.startswith("on")]
            for name in ("href", "src", "action", "formaction", "xlink:href"):
                value = attrs.get(name, "").strip().lower()
                if value.startswith(("javascript:", "http:", "https:", "//")):
                    found.append(f"<{tag} {name}={value}>")
        if self.title != TITLE:
            found.append(f"title {self.title!r}")
        return found


def write_page(tmp_path: Path, result: dict[str, Any], name: str) -> Path:
    html_path = tmp_path / f"{name}.html"
    write_report(result, html_path, tmp_path / f"{name}.json")
    return html_path


def without_csp(html: str) -> str:
    stripped, count = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    assert count == 1
    return stripped


# ------------------------------------------------------------------ the tests


def test_hostile_text_is_inert_in_a_real_browser(tmp_path: Path, beacon: Beacon) -> None:
    payloads = script_payloads(beacon.port) + navigation_payloads(beacon.port)
    hostile = " ".join(payloads)
    result = make_result(hostile)
    page = write_page(tmp_path, result, "hostile")
    benign = Dom(
        browse(
            write_page(tmp_path, make_result("harmless text"), "benign"),
            tmp_path / "profile-benign",
        )
    )

    html = page.read_text(encoding="utf-8")
    csp = [
        attrs
        for tag, attrs in Dom(html).elements
        if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy"
    ]
    assert csp == [{"http-equiv": "Content-Security-Policy", "content": CSP}]

    no_csp = tmp_path / "hostile-no-csp.html"
    no_csp.write_text(without_csp(html), encoding="utf-8")
    for variant, profile in ((page, "profile"), (no_csp, "profile-no-csp")):
        dom = Dom(browse(variant, tmp_path / profile))
        assert dom.injected() == [], variant.name
        # The same elements as the harmless page's: no payload became markup.
        assert dom.shape() == benign.shape(), variant.name
        text = "".join(dom.text)
        # Shown as text: adapter name and path, summary, prompt, both outputs, shard...
        assert text.count(hostile) >= 10, variant.name
        (embedded,) = [body for body in dom.scripts if body.strip().startswith("{")]
        assert json.loads(embedded) == json.loads(json.dumps(result))
    assert beacon.requests == []


def raw_page(payloads: list[str], csp: str | None) -> str:
    meta = f'<meta http-equiv="Content-Security-Policy" content="{csp}">' if csp else ""
    return (
        f"<!DOCTYPE html><html><head>{meta}<title>{TITLE}</title></head>"
        f"<body><p>{' '.join(payloads)}</p></body></html>"
    )


def test_harness_sees_payloads_that_run(tmp_path: Path, beacon: Beacon) -> None:
    """Control: unescaped and without a CSP, the payloads do run and do phone home."""
    page = tmp_path / "raw.html"
    page.write_text(raw_page(script_payloads(beacon.port), None), encoding="utf-8")
    dom = Dom(browse(page, tmp_path / "profile"))
    found = " ".join(dom.injected())
    for marker in ("pwn-script", "pwn-img", "pwn-svg", "pwn-breakout", "pwn-close", "pwned"):
        assert marker in found
    assert "/beacon" in beacon.requests


def test_the_reports_csp_alone_stops_scripts_and_requests(tmp_path: Path, beacon: Beacon) -> None:
    """Defence in depth: were escaping to fail, the CSP would still block scripts and fetches."""
    page = tmp_path / "raw-csp.html"
    page.write_text(raw_page(script_payloads(beacon.port), CSP), encoding="utf-8")
    dom = Dom(browse(page, tmp_path / "profile"))
    ids = {attrs.get("id") for _, attrs in dom.elements}
    assert "pwn-link" in ids  # raw markup is markup here; what matters is that none of it ran
    ran = {f"pwn-{name}" for name in ("script", "img", "svg", "iframe", "breakout", "close")}
    assert ids & ran == set()
    assert dom.title == TITLE
    assert beacon.requests == []


def test_turned_toxic_text_sits_in_the_collapsed_details(tmp_path: Path) -> None:
    marker = "<b>UNIQUE-OUTPUT</b>"
    result = make_result("plain")
    result["adapters"][0]["turned_toxic"][0]["adapter_text"] = marker
    dom = Dom(browse(write_page(tmp_path, result, "details"), tmp_path / "profile"))
    details = [attrs for tag, attrs in dom.elements if tag == "details"]
    assert details == [{"class": "turned-toxic"}]  # closed: no "open" attribute
    assert marker in "".join(dom.text)
    assert not any(tag == "b" for tag, _ in dom.elements)
