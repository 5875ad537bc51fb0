"""The tables, figures and pages the stages write: drawing and rendering, apart from the
computations (:mod:`pipeline.matrix`, :mod:`pipeline.attacks`, :mod:`pipeline.analysis`)."""
