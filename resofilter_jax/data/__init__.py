"""Data pipeline: read instruction data, convert it to records, encode and batch it."""

from resofilter_jax.data.batching import (
    BatchPlan,
    bucket_lengths,
    collate,
    host_slice,
    pad_to_multiple,
    plan_batches,
)
from resofilter_jax.data.encoding import (
    IGNORE_INDEX,
    IFDPair,
    SFTExample,
    SpecialLayout,
    encode_ifd_pairs,
    encode_sft_examples,
    encode_texts,
    encode_truncated,
    num_scored,
    special_layout,
    truncate_ids,
)
from resofilter_jax.data.formats import FORMATS, detect_format, load_records, to_records
from resofilter_jax.data.packing import (
    Segment,
    collate_packed,
    pack_sequences,
    packed_lengths,
    segment_slots,
)
from resofilter_jax.data.readers import READERS, detect_reader, iter_raw_rows
from resofilter_jax.data.records import (
    DataError,
    ReadReport,
    Record,
    RowError,
    TruncatedInputError,
)
from resofilter_jax.data.templates import TEMPLATES, Template, TemplateError, get_template

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "READERS",
    "TEMPLATES",
    "BatchPlan",
    "DataError",
    "IFDPair",
    "ReadReport",
    "Record",
    "RowError",
    "SFTExample",
    "Segment",
    "SpecialLayout",
    "Template",
    "TemplateError",
    "TruncatedInputError",
    "bucket_lengths",
    "collate",
    "collate_packed",
    "detect_format",
    "detect_reader",
    "encode_ifd_pairs",
    "encode_sft_examples",
    "encode_texts",
    "encode_truncated",
    "get_template",
    "host_slice",
    "iter_raw_rows",
    "load_records",
    "num_scored",
    "pack_sequences",
    "packed_lengths",
    "segment_slots",
    "pad_to_multiple",
    "plan_batches",
    "special_layout",
    "to_records",
    "truncate_ids",
]
