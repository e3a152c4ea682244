"""Page task runs as pagesync sends them to Prefect, checked without a server (the
end-to-end states, retries and logs are in test_faults and test_ui)."""

from __future__ import annotations

from pagesync.tasks import PageTaskRuns


def test_a_page_task_run_is_named_after_stream_partition_and_page() -> None:
    """Names are built by plain concatenation: a partition key holding braces (a list
    value, a parent key) is kept as it is."""
    runs = PageTaskRuns("items", "{region} 2024-01-03", retries=2)
    run = runs._task_run(17)
    assert run.name == "items · {region} 2024-01-03 · page 17"
    assert run.empirical_policy.retries == 2
    assert run.dynamic_key == str(run.id)  # unique per page run, never shared
