"""Memorability maps: where in an image its score comes from (issue 29).

``methods``: the map methods (Grad-CAM over a model's declared layers, occlusion, RISE,
integrated gradients), each a function of a model and a batch; ``deletion``: the deletion test
that measures how faithful a map is (Petsiuk et al. 2018); ``runner``: a scoring model wrapped
so that its forward also returns each image's map, which the scoring stage writes as a column.
"""
