"""The job: the scheduler's environment read, the nodes' agreement and the collective check."""
