# The benchmarks are run by `python -m tests.bench`, never by pytest: they take minutes and
# report ratios instead of asserting.
collect_ignore_glob = ["*"]
