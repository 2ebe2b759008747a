"""Fast paths for the hot cases; everything else runs through the xp-generic loss code.

``cpu``: chunked, in-place, multi-threaded NumPy (float32). ``cuda``: fused CuPy RawKernels
(imports without CuPy; compiled on first use and cached). ``dispatch``: the hooks the losses
call. Each gives the reference implementation's results.
"""
