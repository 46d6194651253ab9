"""The ShapesVQA reference model: the dataset (``shapes_vqa``), its training (``train``), the
committed checkpoint (``checkpoint/``) and the fast offline evaluation and sweep (``evaluate``)."""
