"""The book machinery: where results live (:mod:`~prefdyn.book.runs`), the verification tables
(:mod:`~prefdyn.book.verify`), glue (:mod:`~prefdyn.book.glue`), executing chapters with papermill
(:mod:`~prefdyn.book.execute`), the reproducibility report (:mod:`~prefdyn.book.report`) and the
HTML build (:mod:`~prefdyn.book.build`). Dependencies run one way: everything reads
:mod:`~prefdyn.book.runs`, which imports nothing of the book."""
