"""What a node's result must be: the rules its uploads and its ``complete`` are held to.

A result is exactly the images the task expects (``Expected``: how many, of which size), each
a whole PNG of the task's output size within a byte cap, uploaded under the keys of the try the
node holds (dan.nodes.protocol.result_key); or, for interrogate, a caption and no image.
"""

from __future__ import annotations

from dan.domain import TaskResult
from dan.errors import InvalidArgument
from dan.imaging import check_result_png
from dan.nodes.protocol import parse_result_key, result_key
from dan.storage import BlobStore
from dan.tasks.base import Expected, HeldTask

SLACK_BYTES = 1024 * 1024  # a PNG's chunks and text beyond its raw pixels


def upload_problem(held: HeldTask, key: str, data: bytes, *, max_bytes: int) -> str | None:
    """What is wrong with uploading ``data`` as ``key`` for ``held``, or None."""
    expects = held.expects or Expected()
    parsed = parse_result_key(held.id, key)
    if parsed is None or parsed[0] != held.attempt or parsed[1] >= expects.images:
        wanted = [result_key(held.id, held.attempt, i) for i in range(expects.images)]
        return f"result key {key!r} is not one of {wanted}"
    cap = min(expects.width * expects.height * 4 + SLACK_BYTES, max_bytes)
    try:
        check_result_png(data, expects.width, expects.height, cap)
    except InvalidArgument as exc:
        return f"result {key}: {exc.message}"
    return None


def result_problem(held: HeldTask, result: TaskResult, blobs: BlobStore) -> str | None:
    """What is wrong with ``result`` as the outcome of ``held``, or None."""
    expects = held.expects or Expected()
    if expects.caption:
        if not result.caption or result.image_keys:
            return "an interrogate task's result is a caption and no images"
        return None
    wanted = [result_key(held.id, held.attempt, i) for i in range(expects.images)]
    if list(result.image_keys) != wanted or result.caption is not None:
        return f"this task's result is exactly the images {wanted}, got {list(result.image_keys)}"
    if len(result.seeds) not in (0, len(wanted)):
        return "seeds must be empty or give one seed per image"
    for key in wanted:
        try:
            blobs.get(key)
        except KeyError:
            return f"the result image {key} was not uploaded (PUT /api/node/result first)"
    return None
