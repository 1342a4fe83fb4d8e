"""The embedded DNS resolver's pure core: records from the store, answers from bytes.

`build_records` derives the record table from networks and endpoints; `answer` turns one
query's bytes into reply bytes, a `Forward` decision or None (drop); `ReplyCache` serves
repeated questions from reply bytes. No sockets here: netstackd does the I/O.
"""

from netstack.dns.cache import ReplyCache
from netstack.dns.records import (
    Answer,
    LookupResult,
    NotOurs,
    NxDomain,
    Records,
    RecordsBuilder,
    Refused,
    Scope,
    build_records,
)
from netstack.dns.resolver import Forward, Reply, answer, error_reply, resolve, truncate

__all__ = [
    "Answer",
    "Forward",
    "LookupResult",
    "NotOurs",
    "NxDomain",
    "Records",
    "RecordsBuilder",
    "Refused",
    "Reply",
    "ReplyCache",
    "Scope",
    "answer",
    "build_records",
    "error_reply",
    "resolve",
    "truncate",
]
