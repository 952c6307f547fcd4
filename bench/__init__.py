"""The benchmark: recipe rendering, metrics parsing, criteria, verdict, synthetic layout."""
