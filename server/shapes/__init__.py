"""The project's own small text-to-image prior of coloured primitives ("shapes").

It makes the whole product run offline on a CPU, and, because every training image shows a known
primitive of a known size, it makes generation quality measurable (IoU against the true shape).
"""
