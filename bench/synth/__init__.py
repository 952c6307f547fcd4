"""The synthetic layouts: the demo's tiny one and the real-shape one perf measures on."""
