"""Process-level plumbing every room may use: rank/worker detection, atomic writes and temp names, crash points."""
