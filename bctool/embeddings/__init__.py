"""Embeddings files and the rows they hold.

- :mod:`~bctool.embeddings.ids`: a file's ids as one buffer (:class:`RowIds`), repeated ids, and the
  pairing of two files' rows by id (:func:`find_rows`, :func:`pair_rows`);
- :mod:`~bctool.embeddings.rows`: normalisation, rows read on demand (:class:`LazyRows`);
- :mod:`~bctool.embeddings.core`: the :class:`Embeddings` record;
- :mod:`~bctool.embeddings.format`: the file format and its writers;
- :mod:`~bctool.embeddings.read`: reading one file;
- :mod:`~bctool.embeddings.shards`: shard sets, and :func:`load_embeddings` of a file or a set.
"""

from bctool.embeddings.core import Embeddings
from bctool.embeddings.format import (
    DTYPES,
    FLOAT16_MAX,
    FORMAT,
    FORMAT_VERSION,
    EmbeddingsSpec,
    EmbeddingsWriter,
    save_embeddings,
    write_embeddings,
)
from bctool.embeddings.ids import (
    RowIds,
    check_unique_ids,
    concat_ids,
    find_rows,
    has_repeats,
    pair_rows,
    repeated_ids,
)
from bctool.embeddings.read import read_embeddings_file
from bctool.embeddings.rows import (
    ConcatRows,
    LazyRows,
    normalize_rows,
    release_rows,
    storage_dtype,
)
from bctool.embeddings.shards import (
    UNADAPTED_SUFFIX,
    load_embeddings,
    load_shard_set,
    merge_shards,
    ordered_parts,
    shard_set_parts,
)

__all__ = [
    "DTYPES",
    "FLOAT16_MAX",
    "FORMAT",
    "FORMAT_VERSION",
    "UNADAPTED_SUFFIX",
    "ConcatRows",
    "Embeddings",
    "EmbeddingsSpec",
    "EmbeddingsWriter",
    "LazyRows",
    "RowIds",
    "check_unique_ids",
    "concat_ids",
    "find_rows",
    "has_repeats",
    "load_embeddings",
    "load_shard_set",
    "merge_shards",
    "normalize_rows",
    "ordered_parts",
    "pair_rows",
    "read_embeddings_file",
    "release_rows",
    "repeated_ids",
    "save_embeddings",
    "shard_set_parts",
    "storage_dtype",
    "write_embeddings",
]
