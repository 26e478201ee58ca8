"""Fault-injected ingest at a CI size: 60 valid images plus poison, deleted objects, test events and junk,
through the real ingest handler with a throttling endpoint and a fault proxy before the real OpenSearch node.

The full run (1,000 images, and the node stopped and started mid-run) is bench/fault_ingest.py; the restart
is left out here because other tests share the node.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from fault_ingest import Faults, run  # noqa: E402

pytestmark = pytest.mark.opensearch

VALID = 60


def test_given_faults_everywhere_when_60_images_are_ingested_then_each_is_indexed_once_and_only_junk_is_dead(
    opensearch_url: str,
) -> None:
    # A batch of 10 makes one endpoint request per 4 MB and one bulk call, where it made ten of each: the
    # rates per call are raised so that faults still happen at this size.
    faults = Faults(throttle=0.3, bulk_429=0.2, bulk_item_fail=0.1)

    report = run(VALID, opensearch_url, faults)

    assert report.endpoint_faults["throttle"] > 0 and sum(report.bulk_faults.values()) > 0  # faults did happen
    assert report.record_failures > 0  # and some records were redelivered because of them
    assert report.indexed == VALID and report.lost == [] and report.duplicated == 0
    assert report.unexpected == []  # no poison, no object deleted before its event
    assert report.poison_logged == faults.poison
    assert report.skipped_metric == faults.poison + faults.deleted
    assert sorted(report.dlq) == sorted(report.junk)
