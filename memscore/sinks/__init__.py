"""Where the scored rows go: the output folder, its Parquet files and the run's bookkeeping."""
