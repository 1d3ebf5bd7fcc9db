"""The one exception type for errors a user can cause."""


class OrderlabError(Exception):
    """A user-caused error: bad config, missing data, unknown name, impossible resources.

    The message names the offending field or file and says how to fix it. The CLI prints it
    without a traceback and exits with status 2.
    """


class DamagedResultsWarning(UserWarning):
    """A results file that cannot be read (not Parquet, truncated, a partial copy), named with what to do.

    Readers leave the file out and read the rest, so what they return is partial; compaction leaves
    it in place. ``orderlab results`` prints it without a traceback and exits with status 2.
    """
