"""Loading a checkpoint, in the order it happens.

checkpoint     read the file: formats, safe unpickling, training args, hashing
resolve        which architecture: what the file records, then what those records decide
match          what the tensors alone show: shape matching and the size they were trained at
build          a model at a size: strict load, position tables resampled as timm does
timm_internals every private timm/torch API the loader touches, so an upgrade touches one file

`vitdiag.model` is the facade (`load`, `at_size`, `describe`); import from there.
"""
