"""Reporting: what the notebooks show (headers, tables, figures, the dataset card), their
parameters cells, and the papermill pipeline that renders dated reports.

May import: everything below it; never ``experiments`` or ``cli``.
"""
