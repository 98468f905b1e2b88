"""Job graphs: each module builds one Ray Data job from a `JobConfig`."""
