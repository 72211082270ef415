"""Errors that the command line reports as one line, exit code 2, and that line for any exception."""

import errno

import click


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or pass another --out",
    errno.EDQUOT: "the disk quota is exhausted: free space or pass another --out",
    errno.EROFS: "the file system is read-only: pass a writable --out",
    errno.EACCES: "permission denied: pass a location you can read or write",
    errno.EPERM: "permission denied: pass a location you can read or write",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "it is a directory where a file was expected: check the path",
    errno.ELOOP: "a symbolic link loop: remove or fix the link",
    errno.EEXIST: "it exists already: pass another path",
    errno.ENAMETOOLONG: "the path is too long: pass a shorter one",
}


def failure_line(e: BaseException) -> tuple[str, int]:
    """Returns (one line for stderr, exit code) for an exception that reached the command line:
    expected failures (bad input, file-system errors, memory) exit 2, anything else 1."""
    if isinstance(e, click.ClickException):  # bad option or usage: click's message names the option
        return "error: " + " ".join(e.format_message().split()), 2
    if isinstance(e, OSError):
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        fix = _OS_FIXES.get(e.errno, e.strerror or type(e).__name__)
        return f"error: {where + ': ' if where else ''}{fix}" + (
            "" if e.errno in _OS_FIXES or not where else " (check the path)"), 2
    if isinstance(e, MemoryError):
        return "error: out of memory: lower --batch-size, --image-size or --limit", 2
    if isinstance(e, (UserError, ValueError)):
        text = " ".join(str(e).split())
        return f"error: {text or type(e).__name__}", 2
    text = " ".join(str(e).split())
    return (f"internal error: {type(e).__name__}{': ' + text[:300] if text else ''} "
            f"(rerun with RESNET_JAX_DEBUG=1 for the traceback and report it)"), 1
