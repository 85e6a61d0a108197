"""Running on Ray: a run's failures in one line, and the pre-flight check of a cluster's nodes."""
