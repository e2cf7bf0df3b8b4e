"""The machinery every step shares, kept apart from the pipeline's steps: atomic writes and output
locks (:mod:`.io`), each command's declared reads and writes (:mod:`.files`), the progress protocol
(:mod:`.progress`), stopping on a signal (:mod:`.interrupt`), the device (:mod:`.device`), ridge
least squares (:mod:`.linear`) and every figure (:mod:`.plotting`)."""
