"""The one exception type for mistakes a user can make (bad config, missing data, wrong checkpoint).

The command line turns it into one sentence on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input, described in one sentence that names the file or key."""
