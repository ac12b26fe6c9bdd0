"""The write-ahead log on real files: framing, segments, group commit, torn tails, corruption,
snapshots and their crash points, disk failures and power loss.

Faults go through the WAL's FileLayer seam (tests/walfaults.py); everything else is real files
in tmp_path with real fsync.
"""
from __future__ import annotations

import asyncio
import errno
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reservd import wal as walmod
from reservd.wal import (
    FRAME_HEAD,
    FRAME_HEAD_BYTES,
    SNAPSHOT_HEAD_BYTES,
    DataDirectoryInUse,
    FileLayer,
    Record,
    WalCorruption,
    WalFailed,
    WriteAheadLog,
    dump,
    encode_frame,
    verify,
)
from walfaults import FaultyFiles, PowerLossFiles, at_call


def payload_for(seq: int) -> bytes:
    """Varied lengths (0 to ~60 bytes) so every padding size occurs."""
    return (b"p%d." % seq) * (seq % 7)


def run(coroutine, timeout_seconds: float = 30.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_seconds))


def recover_all(
    directory: Path, **options
) -> tuple[WriteAheadLog, walmod.Snapshot | None, list[Record]]:
    wal = WriteAheadLog(directory, **options)
    snapshot, records = wal.recover()
    return wal, snapshot, list(records)


def recovered(directory: Path) -> tuple[walmod.Snapshot | None, list[Record]]:
    """Recover on the real file layer and release the directory again."""
    wal, snapshot, records = recover_all(directory)
    run(wal.close())
    return snapshot, records


def write_log(directory: Path, count: int, *, commit_every: int = 1, **options) -> WriteAheadLog:
    """Recover ``directory``, append ``count`` records (seq continues), commit every
    ``commit_every`` records, close. Returns the closed log (for its stats)."""

    async def main() -> WriteAheadLog:
        wal, _, _ = recover_all(directory, **options)
        wal.open()
        await wal.start()
        first = wal.last_seq + 1
        for seq in range(first, first + count):
            wal.append(seq, seq % 5, payload_for(seq))
            if (seq - first + 1) % commit_every == 0:
                await wal.commit()
        await wal.commit()
        await wal.close()
        return wal

    return run(main())


def frames(path: Path) -> list[tuple[int, int, int]]:
    """(offset, frame bytes, seq) of each frame of a clean segment."""
    data = path.read_bytes()
    result = []
    offset = 0
    while offset < len(data):
        _, length, seq, _, _ = FRAME_HEAD.unpack_from(data, offset)
        frame_bytes = FRAME_HEAD_BYTES + length + (-length & 7)
        result.append((offset, frame_bytes, seq))
        offset += frame_bytes
    assert offset == len(data)
    return result


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.log"))


def expected_records(first: int, last: int) -> list[Record]:
    return [Record(seq, seq % 5, payload_for(seq)) for seq in range(first, last + 1)]


# -- round trip, segments, group commit ---------------------------------------------------------


def test_round_trip_and_reopen_continues_sequence(tmp_path):
    wal = write_log(tmp_path, 40, commit_every=3)
    assert wal.durable_seq == wal.last_seq == 40
    snapshot, records = recovered(tmp_path)
    assert snapshot is None
    assert records == expected_records(1, 40)

    write_log(tmp_path, 25)
    wal, _, records = recover_all(tmp_path)
    assert records == expected_records(1, 65)
    assert wal.last_seq == wal.durable_seq == 65
    wal.open()
    with pytest.raises(AssertionError):
        wal.append(67, 1, b"skips 66")
    run(wal.close())
    assert len(segments(tmp_path)) == 1


def test_empty_and_large_payloads_and_frame_layout(tmp_path):
    big = bytes(random.Random(1).randbytes(3 << 20))

    async def main():
        wal, _, _ = recover_all(tmp_path)
        wal.open()
        await wal.start()
        wal.append(1, 0, b"")
        wal.append(2, 0xFFFFFFFF, big)
        wal.append(3, 7, b"x" * 9)
        await wal.commit()
        await wal.close()

    run(main())
    data = segments(tmp_path)[0].read_bytes()
    assert data.startswith(encode_frame(1, 0, b""))
    assert all(offset % 8 == 0 for offset, _, _ in frames(segments(tmp_path)[0]))
    assert len(data) % 8 == 0
    _, records = recovered(tmp_path)
    assert records == [Record(1, 0, b""), Record(2, 0xFFFFFFFF, big), Record(3, 7, b"x" * 9)]


def test_segments_rotate_at_the_size_limit_and_are_named_by_first_seq(tmp_path):
    wal = write_log(tmp_path, 300, commit_every=4, segment_bytes_max=1024)
    paths = segments(tmp_path)
    assert len(paths) > 5
    assert wal.stats.rotations == len(paths) - 1
    expected_first = 1
    for path in paths:
        found = frames(path)
        assert found, path
        assert path.name == f"wal-{found[0][2]:020d}.log"
        assert found[0][2] == expected_first
        expected_first = found[-1][2] + 1
        assert path.stat().st_size <= 1024
    assert expected_first == 301
    _, records = recovered(tmp_path)
    assert records == expected_records(1, 300)


def test_group_commit_shares_one_write_and_fdatasync(tmp_path):
    async def main():
        wal, _, _ = recover_all(tmp_path)
        wal.open()
        await wal.start()
        acked = []

        async def client(client_id: int):
            for i in range(10):
                seq = wal.last_seq + 1
                wal.append(seq, 1, b"client %d op %d" % (client_id, i))
                await wal.commit()
                acked.append(seq)

        await asyncio.gather(*(client(n) for n in range(100)))
        # Everything appended in one loop turn joins one batch and shares one future.
        for seq in range(1001, 1101):
            wal.append(seq, 2, b"burst")
        first, second = wal.commit(), wal.commit()
        assert first is second
        before = wal.stats.fsyncs
        await first
        assert wal.stats.fsyncs == before + 1
        await wal.close()
        return wal, acked

    wal, acked = run(main())
    assert sorted(acked) == list(range(1, 1001))
    assert wal.stats.records == 1100
    assert wal.stats.fsyncs == wal.stats.batches
    assert wal.stats.fsyncs <= 1000 // 10, wal.stats
    _, records = recovered(tmp_path)
    assert [record.seq for record in records] == list(range(1, 1101))


def test_a_lone_request_is_flushed_at_once(tmp_path):
    async def main():
        wal, _, _ = recover_all(tmp_path)
        wal.open()
        await wal.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        wal.append(1, 1, b"alone")
        await wal.commit()
        elapsed = loop.time() - started
        assert (wal.stats.batches, wal.stats.records, wal.durable_seq) == (1, 1, 1)
        # Nothing appended since: commit() is already resolved.
        assert wal.commit().done()
        await wal.close()
        return elapsed

    assert run(main()) < 1.0


class RecordingFiles(FileLayer):
    def __init__(self) -> None:
        self.write_bytes: list[int] = []

    def write(self, fd, data):
        self.write_bytes.append(len(data))
        return super().write(fd, data)


def test_a_backlog_is_split_into_bounded_batches(tmp_path):
    files = RecordingFiles()

    async def main():
        wal, _, _ = recover_all(
            tmp_path, files=files, batch_bytes_max=4096, pending_bytes_max=50_000
        )
        wal.open()
        durable_seen = []
        wal.add_durable_listener(durable_seen.append)
        for seq in range(1, 101):
            wal.append(seq, 1, bytes([seq]) * 1000)
        assert wal.pending_bytes == 100 * (FRAME_HEAD_BYTES + 1000) and wal.backlogged
        future = wal.commit()
        await wal.start()
        await future
        assert wal.durable_seq == 100
        assert wal.pending_bytes == 0 and not wal.backlogged
        await wal.close()
        return wal, durable_seen

    wal, durable_seen = run(main())
    frame_bytes = FRAME_HEAD_BYTES + 1000
    assert max(files.write_bytes) <= 4096
    assert sum(files.write_bytes) == 100 * frame_bytes
    assert wal.stats.batches == len(files.write_bytes) >= 100 * frame_bytes // 4096
    assert durable_seen == sorted(durable_seen) and durable_seen[-1] == 100
    assert len(durable_seen) == wal.stats.batches
    _, records = recovered(tmp_path)
    assert [record.payload[0] for record in records] == list(range(1, 101))


def test_a_second_log_on_the_same_directory_is_refused(tmp_path):
    wal, _, _ = recover_all(tmp_path)
    with pytest.raises(DataDirectoryInUse, match="in use"):
        WriteAheadLog(tmp_path).recover()
    run(wal.close())
    recovered(tmp_path)


# -- torn tails and corruption ------------------------------------------------------------------


def _pristine_log(directory: Path, count: int) -> tuple[Path, bytes, list[tuple[int, int, int]]]:
    write_log(directory, count, commit_every=2)
    (path,) = segments(directory)
    return path, path.read_bytes(), frames(path)


@pytest.mark.parametrize("damage", ["truncate", "zero-fill"])
def test_torn_tail_at_every_byte_of_the_last_record_is_trimmed(tmp_path, damage):
    pristine = tmp_path / "pristine"
    path, data, found = _pristine_log(pristine, 6)  # the last record has 41 payload bytes
    last_offset, last_bytes, _ = found[-1]
    assert last_bytes > 40
    for cut in range(last_bytes):
        directory = tmp_path / f"{damage}-{cut}"
        directory.mkdir()
        torn = data[: last_offset + cut]
        if damage == "zero-fill":
            torn += bytes(len(data) - len(torn))
        (directory / path.name).write_bytes(torn)
        # Zeroing only the padding leaves the record whole.
        kept = 6 if torn == data else 5
        kept_bytes = len(data) if kept == 6 else last_offset

        report = verify(directory)
        assert report.ok, report
        assert (report.torn_tail is None) == (len(torn) == kept_bytes), cut
        assert (directory / path.name).read_bytes() == torn  # verify modifies nothing

        wal, _, records = recover_all(directory)
        assert records == expected_records(1, kept), cut
        assert wal.last_seq == kept
        assert (directory / path.name).stat().st_size == kept_bytes
        broken = directory / f"{path.name}.broken-{last_offset}"
        if len(torn) > kept_bytes:
            assert broken.read_bytes() == torn[last_offset:]
        else:
            assert not broken.exists()

        async def append_after_repair():
            wal.open()
            await wal.start()
            wal.append(kept + 1, 3, b"after repair")
            await wal.commit()
            await wal.close()

        run(append_after_repair())
        _, records = recovered(directory)
        assert records == expected_records(1, kept) + [Record(kept + 1, 3, b"after repair")]


def test_flipped_byte_anywhere_in_a_middle_record_stops_recovery(tmp_path):
    pristine = tmp_path / "pristine"
    path, data, found = _pristine_log(pristine, 6)
    middle_offset, middle_bytes, middle_seq = found[2]
    assert middle_seq == 3
    directory = tmp_path / "flipped"
    directory.mkdir()
    target = directory / path.name
    for position in range(middle_offset, middle_offset + middle_bytes):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        target.write_bytes(damaged)
        with pytest.raises(WalCorruption) as caught:
            recover_all(directory)
        error = caught.value
        assert error.path == target and error.offset == middle_offset, (position, error)
        assert f"{target}: offset {middle_offset}:" in str(error)
        assert "not a torn tail" in error.reason
        assert target.read_bytes() == damaged  # nothing trimmed
        report = verify(directory)
        assert not report.ok and str(report.error) == str(error)
        assert "ERROR" in str(report)


def test_flipped_byte_in_the_last_record_is_a_torn_tail(tmp_path):
    path, data, found = _pristine_log(tmp_path, 6)
    last_offset, last_bytes, _ = found[-1]
    damaged = bytearray(data)
    damaged[last_offset + last_bytes - 9] ^= 0x40
    path.write_bytes(damaged)
    _, records = recovered(tmp_path)
    assert records == expected_records(1, 5)
    assert path.stat().st_size == last_offset


def test_bad_tail_of_a_segment_followed_by_a_later_segment_is_corruption(tmp_path):
    write_log(tmp_path, 120, commit_every=3, segment_bytes_max=1024)
    first = segments(tmp_path)[0]
    last_offset, _, _ = frames(first)[-1]
    first.write_bytes(first.read_bytes()[: last_offset + 10])
    with pytest.raises(WalCorruption) as caught:
        recovered(tmp_path)
    assert caught.value.path == first and caught.value.offset == last_offset
    assert str(verify(tmp_path).error) == str(caught.value)


def test_a_missing_middle_segment_stops_recovery_naming_the_gap(tmp_path):
    write_log(tmp_path, 120, commit_every=3, segment_bytes_max=1024)
    paths = segments(tmp_path)
    assert len(paths) >= 3
    paths[1].unlink()
    with pytest.raises(WalCorruption, match="sequence gap") as caught:
        recovered(tmp_path)
    assert caught.value.path == paths[2] and caught.value.offset == 0
    assert paths[1].name in str(caught.value) or paths[0].name in str(caught.value)
    assert not verify(tmp_path).ok

    # Without a snapshot, the first segment is needed too.
    paths[0].unlink()
    with pytest.raises(WalCorruption, match="missing"):
        recovered(tmp_path)


def test_verify_and_dump_report_without_modifying(tmp_path):
    write_log(tmp_path, 30, commit_every=4, segment_bytes_max=512)
    report = verify(tmp_path)
    assert report.ok and report.records == 30 and report.last_seq == 30 and report.torn_tail is None
    assert report.segments == tuple(path.name for path in segments(tmp_path))

    out = io.StringIO()
    assert dump(tmp_path, out) == 30
    lines = [line for line in out.getvalue().splitlines() if not line.startswith("#")]
    assert len(lines) == 30
    seq, type_, length, crc, segment, offset, payload = lines[9].split("\t")
    assert (int(seq), int(type_), int(length)) == (10, 0, len(payload_for(10)))
    path = tmp_path / segment
    data = path.read_bytes()
    assert int(crc, 16) == FRAME_HEAD.unpack_from(data, int(offset))[0]
    assert bytes.fromhex(payload.rstrip(".")) == payload_for(10)[:32]

    last = segments(tmp_path)[-1]
    last.write_bytes(last.read_bytes() + b"\x07" * 13)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = verify(tmp_path)
    assert report.ok and f"{last}: offset" in report.torn_tail
    out = io.StringIO()
    dump(tmp_path, out)
    assert f"# bad frame in {last.name}" in out.getvalue()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_damage_anywhere_never_yields_wrong_records(tmp_path_factory, data):
    """Any damage (a flipped byte or a cut) gives either a refusal or a prefix of what was
    written, never an altered or invented record; and verify() agrees with recovery."""
    base = tmp_path_factory.getbasetemp() / "damage-pristine"
    if not base.exists():
        write_log(base, 40, commit_every=5, segment_bytes_max=700)
    names = sorted(path.name for path in base.iterdir() if path.name.startswith("wal-"))
    name = data.draw(st.sampled_from(names))
    original = (base / name).read_bytes()
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as scratch:
        directory = Path(scratch)
        for other in names:
            shutil.copyfile(base / other, directory / other)
        damaged = bytearray(original)
        if data.draw(st.booleans()):
            position = data.draw(st.integers(0, len(original) - 1))
            damaged[position] ^= data.draw(st.integers(1, 255))
        else:
            del damaged[data.draw(st.integers(0, len(original) - 1)) :]
        (directory / name).write_bytes(damaged)
        report = verify(directory)
        try:
            _, records = recovered(directory)
        except WalCorruption as error:
            assert str(report.error) == str(error)
            return
        assert report.ok
        assert records == expected_records(1, len(records))
        assert name == names[-1] or len(records) == 40


# -- snapshots -------------------------------------------------------------------------------------


def kv_payload(seq: int) -> bytes:
    return b"k%d=%d" % (seq % 11, seq)


def kv_apply(state: dict, record: Record) -> None:
    key, value = record.payload.split(b"=")
    state[key.decode()] = int(value)


def kv_state_after(seq: int) -> dict:
    state: dict = {}
    for n in range(1, seq + 1):
        kv_apply(state, Record(n, 1, kv_payload(n)))
    return state


def kv_recovered_state(directory: Path) -> tuple[dict, int, int | None]:
    snapshot, records = recovered(directory)
    state = json.loads(snapshot.payload) if snapshot else {}
    last = snapshot.seq if snapshot else 0
    for record in records:
        assert record.seq == last + 1
        kv_apply(state, record)
        last = record.seq
    return state, last, snapshot.seq if snapshot else None


async def kv_append(wal: WriteAheadLog, count: int) -> None:
    for seq in range(wal.last_seq + 1, wal.last_seq + 1 + count):
        wal.append(seq, 1, kv_payload(seq))
        if seq % 3 == 0:
            await wal.commit()
    await wal.commit()


def kv_snapshot_payload(seq: int) -> bytes:
    return json.dumps(kv_state_after(seq)).encode()


def test_snapshot_then_replay_equals_full_replay_and_old_files_go(tmp_path):
    async def main():
        wal, _, _ = recover_all(tmp_path, segment_bytes_max=400)
        wal.open()
        await wal.start()
        await kv_append(wal, 60)
        segments_before = segments(tmp_path)
        assert len(segments_before) > 3
        path = await wal.snapshot(60, kv_snapshot_payload(60))
        assert path == tmp_path / "snap-00000000000000000060.snap"
        # Every segment but the tail held only records <= 60.
        assert segments(tmp_path) == segments_before[-1:]
        await kv_append(wal, 25)
        await wal.snapshot(70, kv_snapshot_payload(70))
        await kv_append(wal, 10)
        await wal.snapshot(90, kv_snapshot_payload(90))
        await kv_append(wal, 5)
        await wal.close()
        return wal

    wal = run(main())
    assert wal.stats.snapshots == 3
    assert sorted(p.name for p in tmp_path.glob("snap-*")) == [
        "snap-00000000000000000070.snap", "snap-00000000000000000090.snap"
    ]
    state, last, snapshot_seq = kv_recovered_state(tmp_path)
    assert (last, snapshot_seq) == (100, 90)
    assert state == kv_state_after(100)
    # Every remaining segment is still needed or is the tail.
    assert frames(segments(tmp_path)[0])[-1][2] >= 90 or len(segments(tmp_path)) == 1


def test_a_corrupt_newest_snapshot_stops_recovery(tmp_path):
    async def main():
        wal, _, _ = recover_all(tmp_path, segment_bytes_max=400)
        wal.open()
        await wal.start()
        await kv_append(wal, 30)
        await wal.snapshot(20, kv_snapshot_payload(20))
        await wal.snapshot(30, kv_snapshot_payload(30))
        await wal.close()

    run(main())
    newest = tmp_path / "snap-00000000000000000030.snap"
    good = newest.read_bytes()
    # (byte flipped, offset the error must name): payload, header crc field, magic.
    for position, offset in ((len(good) - 3, SNAPSHOT_HEAD_BYTES), (12, SNAPSHOT_HEAD_BYTES),
                             (0, 0)):
        damaged = bytearray(good)
        damaged[position] ^= 0x20
        newest.write_bytes(damaged)
        with pytest.raises(WalCorruption) as caught:
            recovered(tmp_path)
        assert caught.value.path == newest and caught.value.offset == offset
        assert str(newest) in str(caught.value)
        assert str(verify(tmp_path).error) == str(caught.value)
    newest.write_bytes(good[:-5])
    with pytest.raises(WalCorruption, match="payload bytes"):
        recovered(tmp_path)
    newest.write_bytes(good)
    state, last, snapshot_seq = kv_recovered_state(tmp_path)
    assert (state, last, snapshot_seq) == (kv_state_after(30), 30, 30)


SNAPSHOT_CRASH_POINTS = {
    "after the write, before its fsync": ("fsync", "snap-"),
    "after its fsync, before the rename": ("rename", "snap-"),
    "after the rename, before the directory fsync": ("fsync_dir", ""),
    "after the directory fsync, before any deletion": ("unlink", "wal-"),
}


@pytest.mark.parametrize("power_loss", [False, True], ids=["crash", "power-loss"])
@pytest.mark.parametrize("point", [*SNAPSHOT_CRASH_POINTS, "in the middle of the deletions"])
def test_snapshot_crash_points_recover_to_the_full_replay(tmp_path, point, power_loss):
    write_log_kv = 60

    async def prepare():
        wal, _, _ = recover_all(tmp_path, segment_bytes_max=200)
        wal.open()
        await wal.start()
        await kv_append(wal, 30)
        await wal.snapshot(24, kv_snapshot_payload(24))
        await kv_append(wal, write_log_kv - 30)
        await wal.close()

    run(prepare())
    assert len(segments(tmp_path)) > 3
    files = PowerLossFiles(tmp_path)

    async def crash():
        wal, _, _ = recover_all(tmp_path, files=files, segment_bytes_max=200)
        wal.open()
        await wal.start()
        if point in SNAPSHOT_CRASH_POINTS:
            op, prefix = SNAPSHOT_CRASH_POINTS[point]
            files.trigger = at_call(1, op, prefix)
        else:
            files.trigger = at_call(2, "unlink", "wal-")
        with pytest.raises(OSError):
            await wal.snapshot(60, kv_snapshot_payload(60))
        await wal.close()

    run(crash())
    assert files.dead
    if power_loss:
        files.power_loss()
    before = verify(tmp_path)
    assert before.ok, before
    if point == "in the middle of the deletions" and not power_loss:
        # The snapshot is durable and some segments it covers are still there.
        assert before.snapshot_seq == 60 and before.stale_segments
    state, last, snapshot_seq = kv_recovered_state(tmp_path)
    assert verify(tmp_path).stale_segments == ()
    assert last == 60
    assert state == kv_state_after(60)
    # The new snapshot counts only once its rename is durable.
    assert snapshot_seq in (24, 60)
    if power_loss and point in list(SNAPSHOT_CRASH_POINTS)[:3]:
        assert snapshot_seq == 24
    assert not list(tmp_path.glob("*.tmp"))


# -- disk failures -----------------------------------------------------------------------------


async def _client_load(wal: WriteAheadLog, clients: int, operations: int, appended: dict,
                       acked: set, failures: list, rng: random.Random | None = None) -> None:
    """Clients that append (with ``rng``: bursts of 1-3 records and random pauses, so batches
    vary) and commit, recording what they appended, what was acknowledged, and failures."""

    async def client(client_id: int) -> None:
        for i in range(operations):
            mine = []
            for _ in range(rng.randint(1, 3) if rng else 1):
                seq = wal.last_seq + 1
                payload = b"c%d-%d-%d|" % (client_id, i, seq) * (seq % 4 + 1)
                try:
                    wal.append(seq, 1 + seq % 3, payload)
                except WalFailed as error:
                    failures.append(error)
                    return
                appended[seq] = payload
                mine.append(seq)
            try:
                await wal.commit()
            except WalFailed as error:
                failures.append(error)
                return
            acked.update(mine)
            for _ in range(rng.choice((0, 0, 1, 3)) if rng else int(i % 5 == 0)):
                await asyncio.sleep(0)

    await asyncio.gather(*(client(n) for n in range(clients)))


def check_history(appended: dict, acked: set, records: list[Record]) -> list[str]:
    """What recovery returned against what clients saw: every acknowledged record present,
    nothing invented or altered, no holes."""
    problems = []
    seqs = [record.seq for record in records]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"recovered sequence has holes: {seqs[:10]}...")
    altered = [record.seq for record in records if appended.get(record.seq) != record.payload]
    if altered:
        problems.append(f"records invented or altered: {altered[:10]}")
    lost = sorted(seq for seq in acked if seq > len(seqs))
    if lost:
        problems.append(f"{len(lost)} acknowledged records lost, first {lost[:5]}")
    return problems


@pytest.mark.parametrize(
    "op, error_number, nth, name_prefix",
    [
        ("fdatasync", errno.EIO, 4, ""),
        ("write", errno.ENOSPC, 3, ""),
        ("open", errno.ENOSPC, 2, "wal-"),  # creating the next segment
    ],
    ids=["EIO-fdatasync", "ENOSPC-write", "ENOSPC-rotation"],
)
def test_disk_failure_fails_closed_and_loses_no_acknowledged_record(
    tmp_path, op, error_number, nth, name_prefix
):
    files = FaultyFiles()
    files.fail(op, error_number, at_call(nth, name_prefix=name_prefix))
    appended: dict = {}
    acked: set = set()
    failures: list = []

    async def main():
        wal, _, _ = recover_all(tmp_path, files=files, segment_bytes_max=2048)
        wal.open()
        await wal.start()
        await _client_load(wal, 20, 30, appended, acked, failures)
        assert isinstance(wal.failed, WalFailed)
        calls_at_failure = dict(files.calls)
        with pytest.raises(WalFailed):
            wal.append(wal.last_seq + 1, 1, b"after the failure")
        with pytest.raises(WalFailed):
            await wal.commit()
        await asyncio.sleep(0.05)
        await wal.close()
        return wal, calls_at_failure

    wal, calls_at_failure = run(main())
    failure = wal.failed
    assert failure.error.errno == error_number and failure.__cause__ is failure.error
    assert "restart" in str(failure) and errno.errorcode[error_number] in str(failure)
    assert failures and all(isinstance(error, WalFailed) for error in failures)
    assert acked and len(acked) < len(appended)
    # Never retried: no sync or write after the failing call.
    for name in ("fdatasync", "write"):
        assert files.calls.get(name, 0) == calls_at_failure.get(name, 0)
    if op == "fdatasync":
        assert files.calls["fdatasync"] == 4
    _, records = recovered(tmp_path)
    assert check_history(appended, acked, records) == []


# -- power loss ----------------------------------------------------------------------------------


def power_loss_round(
    directory: Path, seed: int, *, tear: bool, ack_before_fsync: bool, op: str | None = None
) -> list[str]:
    """Run concurrent clients on a PowerLossFiles, cut the power at a random call (of ``op``
    if given), recover on the real files and return the history problems (empty when no
    acknowledged write is lost)."""
    rng = random.Random(seed)
    op = op or rng.choice(["fdatasync", "fdatasync", "write", "fsync_dir"])
    nth = rng.randint(1, 3) if op == "fsync_dir" else rng.randint(2, 25)
    files = PowerLossFiles(directory, trigger=at_call(nth, op))
    appended: dict = {}
    acked: set = set()
    failures: list = []

    async def main():
        wal, _, _ = recover_all(directory, files=files, segment_bytes_max=3000,
                                ack_before_fsync=ack_before_fsync)
        wal.open()
        await wal.start()
        await _client_load(wal, 12, 40, appended, acked, failures, rng)
        await wal.close()

    run(main())
    if files.dead:
        assert failures, "the power went out but no client saw a failure"
    files.power_loss(rng if tear else None)
    _, records = recovered(directory)
    return check_history(appended, acked, records)


@pytest.mark.parametrize("tear", [False, True], ids=["drop-unsynced", "torn-sector"])
def test_power_loss_loses_no_acknowledged_record(tmp_path, tear):
    for seed in range(12):
        directory = tmp_path / f"seed-{seed}"
        assert power_loss_round(directory, seed, tear=tear, ack_before_fsync=False) == [], seed


def test_power_loss_check_catches_ack_before_fsync(tmp_path):
    """The same check must fail when futures resolve before the fdatasync (etcd #14370)."""
    for seed in range(6):
        directory = tmp_path / f"seed-{seed}"
        problems = power_loss_round(
            directory, seed, tear=False, ack_before_fsync=True, op="fdatasync"
        )
        assert any("acknowledged records lost" in problem for problem in problems), (seed, problems)
        # The honest log passes the very same round.
        directory = tmp_path / f"honest-{seed}"
        honest = power_loss_round(
            directory, seed, tear=False, ack_before_fsync=False, op="fdatasync"
        )
        assert honest == []


def test_records_recovery_hands_out_survive_a_later_power_loss(tmp_path):
    """After a process crash the last batch may sit in the page cache only; recovery replays
    it, so it must be made durable before the daemon goes on."""
    files = PowerLossFiles(tmp_path, trigger=at_call(5, "fdatasync"))
    appended: dict = {}
    acked: set = set()
    failures: list = []

    async def first_life():
        wal, _, _ = recover_all(tmp_path, files=files)
        wal.open()
        await wal.start()
        await _client_load(wal, 8, 10, appended, acked, failures, random.Random(5))
        await wal.close()

    run(first_life())
    assert files.dead and failures
    files.restart()
    wal, _, handed_out = recover_all(tmp_path, files=files)
    assert len(handed_out) > len(acked)  # the unsynced batch was in the page cache
    assert check_history(appended, acked, handed_out) == []
    wal.open()
    run(wal.close())
    files.power_loss()
    _, records = recovered(tmp_path)
    assert records == handed_out
