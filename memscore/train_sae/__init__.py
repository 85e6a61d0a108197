"""The sparse-autoencoder job of the memorability traces (``memscore train-sae``)."""
