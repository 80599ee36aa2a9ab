"""The report: evaluations aggregated into tables, statistics, figures, the summary and comparisons.

Nothing in this package imports torch (a test holds it), so a report can be made and checked on a
machine without the training stack.
"""
