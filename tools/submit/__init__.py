"""The parts of tools/submission.py, one idea a module.

    logfile        a train_gpt.py log -> Run (every line the tool reads)
    checks         the challenge's rules applied to runs; dataset and hardware labels
    stats          mean and std over seeds, the one-sided t-test against a reference (scipy.stats)
    report         the tables the tool prints and the submission.json it writes
    record_folder  the records/<track>/<date>_<name>/ folder of a record pull request, and its README
    plots          the training curves (matplotlib)
"""


class UsageError(Exception):
    """Bad command line or unreadable input: exit 2 with one line."""
