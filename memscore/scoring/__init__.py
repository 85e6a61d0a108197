"""The scoring job (``memscore score``, ``memscore verify``)."""
