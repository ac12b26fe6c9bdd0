"""The write-ahead log: opaque records, group commit, snapshots and crash recovery.

What a payload means is the ledger's business; this package only makes records durable and gives
them back in order after a crash. One module per concern, as etcd's ``server/storage/wal``:

    format   frames, snapshot files and file names on disk; reading one frame
    scan     reading a directory and deciding what recovery will do (torn tail or corruption)
    log      WriteAheadLog: appends, group commit, segments, snapshots, recovery applied
    tools    ``reservd wal verify|dump``
    errors   what it raises

Directory layout
    ``wal-<first seq, 20 digits>.log``  segments, each a stream of frames
    ``snap-<seq, 20 digits>.snap``      snapshots (the newest two are kept)
    ``snap-<seq>.snap.tmp``            a snapshot being written; removed at recovery
    ``wal-<seq>.log.broken-<offset>``   a torn tail trimmed at recovery, kept for forensics
    ``LOCK``                           flock held while a WriteAheadLog has the directory
"""
from reservd.wal.errors import (
    DataDirectoryInUse,
    NotADataDirectory,
    WalCorruption,
    WalFailed,
)
from reservd.wal.format import (
    FRAME_ALIGN_BYTES,
    FRAME_HEAD,
    FRAME_HEAD_BYTES,
    LOCK_NAME,
    RECORD_MAGIC,
    RECORD_MAGIC_BYTES,
    RECORD_PAYLOAD_BYTES_MAX,
    SNAPSHOT_HEAD,
    SNAPSHOT_HEAD_BYTES,
    SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
    SNAPSHOTS_KEPT,
    Record,
    Snapshot,
    encode_frame,
    segment_name,
    snapshot_name,
)
from reservd.wal.log import WalStats, WriteAheadLog
from reservd.wal.tools import VerifyReport, dump, read, require_data_directory, verify
from reservd.walfile import OS_FILES, FileLayer

__all__ = [
    "DataDirectoryInUse",
    "FileLayer",
    "FRAME_ALIGN_BYTES",
    "FRAME_HEAD",
    "FRAME_HEAD_BYTES",
    "LOCK_NAME",
    "NotADataDirectory",
    "OS_FILES",
    "RECORD_MAGIC",
    "RECORD_MAGIC_BYTES",
    "RECORD_PAYLOAD_BYTES_MAX",
    "Record",
    "SNAPSHOT_HEAD",
    "SNAPSHOT_HEAD_BYTES",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "SNAPSHOTS_KEPT",
    "Snapshot",
    "VerifyReport",
    "WalCorruption",
    "WalFailed",
    "WalStats",
    "WriteAheadLog",
    "dump",
    "encode_frame",
    "read",
    "require_data_directory",
    "segment_name",
    "snapshot_name",
    "verify",
]
