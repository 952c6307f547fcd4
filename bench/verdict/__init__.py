"""The verdict: the judgement, metrics, throughput, FLOPs, ranks, start-up, the document and its report."""
