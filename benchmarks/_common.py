"""Until benchmarks/api_throughput.py and benchmarks/crowd.py import benchmarks.harness themselves."""

from benchmarks.harness import REPO, SCRATCH, bundled_dir, markdown_table, percentiles, write_results  # noqa: F401
