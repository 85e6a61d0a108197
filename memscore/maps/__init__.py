"""``memscore maps``: a scored folder's memorability maps drawn over their photos (issue 29).

``config``: its options; ``overlay``: one photo with its map over the region the model saw;
``job``: the overlays and the contact sheet of the most and least memorable images.
"""
