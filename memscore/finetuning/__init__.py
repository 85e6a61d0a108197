"""The fine-tuning job (``memscore finetune``)."""
