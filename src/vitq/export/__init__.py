"""Deployable artifacts of a quantized model.

* :mod:`.packing`: bit packing of 2..8-bit integer codes into a byte stream;
* :mod:`.packed`: the packed integer checkpoint (``vitq export --format packed``):
  :func:`export`, :func:`load_packed` (what ``vitq.load_model`` uses for such a folder) and
  :func:`packed_size_report`.
"""

from .packed import FORMATS, PACKED_FORMAT, export, load_packed, packed_size_report
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["FORMATS", "PACKED_FORMAT", "export", "load_packed", "pack_codes", "packed_nbytes", "packed_size_report",
           "unpack_codes"]
