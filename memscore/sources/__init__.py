"""Where the rows come from: one ``Source`` per kind of manifest (``tables``, ``images``,
``webdataset``) behind the interface of ``base``; ``manifest.open_manifest`` picks the kind."""
