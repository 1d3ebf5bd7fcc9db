"""The one exception type for errors a user can cause."""


class OrderlabError(Exception):
    """A user-caused error: bad config, missing data, unknown name, impossible resources.

    The message names the offending field or file and says how to fix it. The CLI prints it
    without a traceback and exits with status 2.
    """
