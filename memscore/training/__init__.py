"""The Ray Train plumbing and the run folder that fine-tuning and train-sae share."""
