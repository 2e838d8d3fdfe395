"""Exceptions a user can act on.

Each carries a message that says what went wrong and what to do. The command line maps
them to exit codes (``cloak_core.cli``) and the daemon to HTTP statuses
(``backend.errors``), each in one place.
"""


class FaceCloakError(Exception):
    """Base class of every error FaceCloak reports to a user."""


class UsageError(FaceCloakError):
    """Bad flags or arguments (exit status 2)."""


class ImageError(FaceCloakError):
    """The bytes could not be decoded as an image (truncated, corrupt, empty)."""


class UnsupportedImageError(ImageError):
    """The bytes are not an image type FaceCloak reads (text, PDF, unknown format)."""


class ImageTooLargeError(ImageError):
    """The image is over the byte or pixel limit (decompression bombs included)."""


class ModelStoreError(FaceCloakError):
    """A weight file could not be found, fetched or verified."""


class DigestMismatchError(ModelStoreError):
    """A weight file's sha256 differs from the one the store expects."""


class SystemLibraryError(FaceCloakError):
    """A system library a dependency loads at run time is missing (install it with the
    system's package manager; the message names the package)."""


class CancelledError(FaceCloakError):
    """The caller cancelled the work (a client disconnected, a deadline passed)."""
