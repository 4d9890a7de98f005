"""The builder: location encoders and the jobs that run them (needs ``hexatlas[build]``).

Importing this package does not import torch; loading an encoder does.
"""

from __future__ import annotations

from builder.encoders import list_encoders, load_encoder
from builder.points import embed_table, encode_file

__all__ = ["embed_table", "encode_file", "list_encoders", "load_encoder"]
