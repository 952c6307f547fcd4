"""The commands beside a run: perf (stock against the levers) and prepare (the layout from the Hub)."""
