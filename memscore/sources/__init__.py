"""Where the rows come from: a manifest as the user stores it, read as tables and frozen into the run's snapshot."""
