"""The InternVL-family and Qwen-VL-family replicas against the public Sa2VA remote code
(tests/sa2va_replica/check_upstream.py, parts ``internvl`` and ``qwen``): same transformers-version failures, same
state dicts at tiny and real (meta-device) shapes, and the same outputs with the same weights. Runs when
SA2VA_UPSTREAM names a checkout of bytedance/Sa2VA (e.g. /tmp/sa2va); skipped otherwise (no network here)."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sa2va_replica.check_upstream import check_internvl, check_qwen  # noqa: E402

UPSTREAM = os.environ.get("SA2VA_UPSTREAM")


@pytest.mark.skipif(not UPSTREAM, reason="set SA2VA_UPSTREAM to a checkout of bytedance/Sa2VA")
def test_internvl_family_matches_upstream():
    report = check_internvl(UPSTREAM, quick=True)
    print(json.dumps(report.numbers, indent=1, default=str))
    assert not report.failures, report.failures
    # the comparisons actually ran: six numeric comparisons at each of three tiny shapes, and the failures
    assert sum(k.startswith("max_abs_diff/") for k in report.numbers) == 18
    assert any(k.startswith("failure/") for k in report.numbers)


@pytest.mark.skipif(not UPSTREAM, reason="set SA2VA_UPSTREAM to a checkout of bytedance/Sa2VA")
def test_qwen_family_matches_upstream():
    report = check_qwen(UPSTREAM, quick=True)
    print(json.dumps(report.numbers, indent=1, default=str))
    assert not report.failures, report.failures
    # for both families: identical [SEG] states and masks, the failures side by side; real shapes on meta
    for family in ("qwen2_5_vl", "qwen3_vl"):
        assert report.numbers[f"max_abs_diff/{family}/[SEG] hidden state"] == 0.0
        assert report.numbers[f"{family}/predict_forward mask"].startswith("0 of ")
        assert sum(k.startswith(f"failure/{family}/") for k in report.numbers) >= 6
    assert sum(k.endswith("/replica parameters") for k in report.numbers) >= 4
