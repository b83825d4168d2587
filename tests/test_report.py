import json

import pytest

from matryoshka.report import load_results, validate_results, write_report

RESULTS = {
    "task": "toy",
    "sizes": [2, 4, 8],
    "metrics": {
        "top1": {"MRL": [0.5, 0.75, 0.9], "FF": [0.55, 0.7, None]},
        "map@10": {"MRL": [0.4, 0.6, 0.8], "FF": [0.3, 0.5, 0.85]},
    },
    "notes": ["a finding"],
    "curves": {"casc": {"title": "cascade", "series": {"A": {"x": [2.5, 6.0], "y": [0.5, 0.8]}}}},
    "meta": {"wall_seconds": 1.5},
}


def test_write_report_tables_plots_and_json(tmp_path):
    md = write_report(RESULTS, tmp_path)
    text = md.read_text()
    assert "# toy" in text
    assert "- a finding" in text
    assert "| m | MRL | FF |" in text
    assert "| 8 | 90.0 | – |" in text
    assert "![map@10](map_at_10.png)" in text
    assert "- A: (2.5, 50.0), (6, 80.0)" in text
    assert (tmp_path / "curve_casc.png").is_file()
    for png in ("top1.png", "map_at_10.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_results(tmp_path) == json.loads(json.dumps(RESULTS))


def test_schema_errors(tmp_path):
    with pytest.raises(ValueError, match=r"results has no 'sizes' field"):
        validate_results({"task": "t", "metrics": {}})
    bad = {**RESULTS, "metrics": {"top1": {"MRL": [0.1]}}}
    with pytest.raises(ValueError, match=r"\['top1'\]\['MRL'\] has 1 values but there are 3 sizes"):
        write_report(bad, tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"does not exist: pass a metrics.json or its folder"
    ):
        load_results(tmp_path / "nothing")
