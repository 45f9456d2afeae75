"""Task kinds used by the tests only (imported by `worker --handlers`)."""

import os
import time

import tasks


@tasks.handler("test_record")
def record(ctx, task, args):
    """Append this task's id to the file `args["log"]` (O_APPEND: one line
    per execution, whichever process runs it)."""
    fd = os.open(args["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%d\n" % task.id)
    finally:
        os.close(fd)
    time.sleep(args.get("sleep", 0))


@tasks.handler("test_fail")
def fail(ctx, task, args):
    if args.get("permanent"):
        raise tasks.Permanent("bad arguments")
    raise RuntimeError("remote end not answering")
