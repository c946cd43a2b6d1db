"""The model card written in place: toxtests' section and model-index results, nothing
else of the card changed, and the same result written twice changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_report import make_result

from toxtests.errors import ConfigError
from toxtests.merge import BEGIN, END, merge_results, update_model_card
from toxtests.report import render_markdown

CARD = """---
license: apache-2.0
tags: [lora]
model-index:
- name: my-adapter
  results:
  - task: {type: text-generation}
    dataset: {name: other-benchmark, type: other}
    metrics: [{type: accuracy, value: 0.5}]
---
# My adapter

Trained on kind words.
"""


def _header(text: str) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_gets_its_section_and_results_and_keeps_everything_else(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text(CARD)
    result = make_result()
    assert update_model_card(card, render_markdown(result), result)
    text = card.read_text()
    header = _header(text)
    assert header["license"] == "apache-2.0" and header["tags"] == ["lora"]
    results = header["model-index"][0]["results"]
    assert results[0]["dataset"]["name"] == "other-benchmark"  # another tool's, kept
    ours = [r for r in results if r.get("source", {}).get("name") == "toxtests"]
    assert len(ours) == len(result["adapters"])
    delta = result["adapters"][0]["metrics"]["toxicity_rate"]["delta"]
    assert {"toxicity_rate_delta": round(delta, 6)}.items() <= {
        m["type"]: m["value"] for m in ours[0]["metrics"]
    }.items()
    body = text.split("---\n", 2)[2]
    assert body.startswith("# My adapter\n\nTrained on kind words.\n")
    assert body.count(BEGIN) == body.count(END) == 1
    # Again: nothing changes; another result replaces toxtests' entries, not adds to them.
    assert not update_model_card(card, render_markdown(result), result)
    assert card.read_text() == text
    other = make_result()
    other["adapters"][0]["metrics"]["toxicity_rate"]["delta"] = 0.25
    assert update_model_card(card, render_markdown(other), other)
    results = _header(card.read_text())["model-index"][0]["results"]
    assert len(results) == 1 + len(other["adapters"])


def test_a_card_without_a_header_gets_one_and_a_missing_card_is_created(tmp_path: Path) -> None:
    result = make_result()
    card = tmp_path / "new" / "README.md"
    card.parent.mkdir()
    update_model_card(card, render_markdown(result), result)
    assert _header(card.read_text())["model-index"][0]["results"]
    plain = tmp_path / "plain.md"
    plain.write_text("# Title\n")
    update_model_card(plain, "section")
    assert plain.read_text() == f"# Title\n\n{BEGIN}\nsection\n{END}\n"


def test_a_lone_marker_is_refused_naming_it(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text(f"# Title\n{BEGIN}\nhalf a section\n")
    with pytest.raises(ConfigError, match="without the other"):
        update_model_card(card, "section")


def test_results_of_another_parent_do_not_merge() -> None:
    one, two = make_result(), make_result()
    two["model"] = {**two["model"], "fingerprint": "someone-else"}
    with pytest.raises(ConfigError, match="b.json: model.fingerprint differs from a.json"):
        merge_results([one, two], ["a.json", "b.json"])
