"""Issue 5's benchmark suite: `python -m tests.bench --help`. Not collected by pytest."""
