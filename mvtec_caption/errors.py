"""The one error type of the package, so callers can catch every data problem at once."""


class MVTecCaptionError(ValueError):
    """Bad MVTec tree, captions file or export folder. The message names the culprit."""
