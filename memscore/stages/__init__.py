"""What happens to each row: its bytes fetched, its image decoded, the model's scores."""
