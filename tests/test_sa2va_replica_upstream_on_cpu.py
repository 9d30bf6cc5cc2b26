"""The InternVL-family replica against the public Sa2VA remote code (tests/sa2va_replica/check_upstream.py, part
``internvl``): same transformers-version failures, same state dicts at tiny and real (meta-device) shapes, and the
same outputs with the same weights. Runs when SA2VA_UPSTREAM names a checkout of bytedance/Sa2VA (e.g. /tmp/sa2va);
skipped otherwise (no network here)."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sa2va_replica.check_upstream import check_internvl  # noqa: E402

UPSTREAM = os.environ.get("SA2VA_UPSTREAM")


@pytest.mark.skipif(not UPSTREAM, reason="set SA2VA_UPSTREAM to a checkout of bytedance/Sa2VA")
def test_internvl_family_matches_upstream():
    report = check_internvl(UPSTREAM, quick=True)
    print(json.dumps(report.numbers, indent=1, default=str))
    assert not report.failures, report.failures
    # the comparisons actually ran: six numeric comparisons at each of three tiny shapes, and the failures
    assert sum(k.startswith("max_abs_diff/") for k in report.numbers) == 18
    assert any(k.startswith("failure/") for k in report.numbers)
