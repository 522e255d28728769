"""The resume cursor: history then live, no gap, no duplicate."""

from offload.core.cursor import FIRST_PAGE, ChannelCursor, CursorState, Entry


def e(n):
    return Entry((n, 0), b"m%d" % n, b"f%d" % n)


def ids(entries):
    return [entry.id[0] for entry in entries]


def test_live_messages_buffer_while_syncing_then_join_history_without_duplicates():
    cursor = ChannelCursor(last=(3, 0))
    assert cursor.live(e(6)) == [] and cursor.live(e(7)) == []
    assert cursor.buffered == 2
    # history read after the subscription became active: 4..7 (6, 7 also arrived live)
    out = cursor.history([e(4), e(5), e(6), e(7)], tip=None)
    assert ids(out) == [4, 5, 6, 7]
    assert cursor.state is CursorState.LIVE and cursor.duplicates == 2
    assert ids(cursor.live(e(7))) == [] and ids(cursor.live(e(8))) == [8]


def test_subscribe_from_now_starts_after_the_tip():
    cursor = ChannelCursor()
    cursor.live(e(10))  # published before the tip was read: already history
    cursor.live(e(11))
    out = cursor.history([], tip=(10, 0))
    assert ids(out) == [11] and cursor.last == (11, 0)


def test_empty_channel_from_now_delivers_everything_live():
    cursor = ChannelCursor()
    cursor.live(e(1))
    assert ids(cursor.history([], tip=None)) == [1]


def test_resync_after_outage_fills_the_gap():
    cursor = ChannelCursor()
    cursor.history([], tip=(1, 0))
    assert ids(cursor.live(e(2))) == [2]
    cursor.resync()  # Redis connection lost: 3 and 4 were published meanwhile
    assert cursor.live(e(5)) == []
    assert ids(cursor.history([e(3), e(4), e(5)], tip=None)) == [3, 4, 5]


def test_live_batches_take_the_hot_path_only_when_nothing_is_stale():
    cursor = ChannelCursor()
    cursor.history([], tip=(1, 0))
    assert cursor.live_many([e(2), e(3)]) is None and cursor.last == (3, 0)
    assert ids(cursor.live_many([e(3), e(4)])) == [4]  # 3 was already sent
    cursor.resync()
    assert cursor.live_many([e(5)]) == [] and cursor.buffered == 1


def test_history_pages_stay_syncing_until_the_last_one():
    cursor = ChannelCursor(last=(0, 0))
    cursor.live(e(5))  # arrives while the first page is being read
    assert ids(cursor.history([e(1), e(2)], None, more=True)) == [1, 2]
    assert cursor.state is CursorState.SYNCING and cursor.buffered == 1
    assert ids(cursor.history([e(3), e(4), e(5)], None)) == [3, 4, 5]
    assert cursor.state is CursorState.LIVE and cursor.duplicates == 1


def test_an_overflowing_live_buffer_is_emptied_and_counted_then_history_fills_it_in():
    cursor = ChannelCursor(last=(0, 0), max_buffer_bytes=4)  # two of the 2-byte frames below
    cursor.live(e(3))
    cursor.live(e(4))
    assert cursor.buffered == 2 and cursor.dropped == 0
    cursor.live(e(5))  # over the bound: 3 and 4 are in history, drop them
    assert cursor.buffered == 1 and cursor.dropped == 1
    assert ids(cursor.history([e(1), e(2), e(3), e(4)], None, more=True)) == [1, 2, 3, 4]
    assert ids(cursor.history([e(5)], None)) == [5]
    assert cursor.state is CursorState.LIVE and cursor.buffered == 0


def test_a_resync_starts_a_fresh_sync_with_the_bound_it_is_given():
    """What only a syncing cursor needs (the live buffer, its bound, the overflow count, the page size) lives
    while it syncs: a live cursor keeps four slots (issue 16), and a re-sync after an outage starts afresh."""
    cursor = ChannelCursor(last=(0, 0), max_buffer_bytes=4)
    for n in (3, 4, 5):  # the third overflows the 4-byte bound
        cursor.live(e(n))
    cursor.page_count = 50
    assert (cursor.dropped, cursor.page_count) == (1, 50)
    cursor.history([e(1), e(2), e(3), e(4), e(5)], None)
    assert cursor.state is CursorState.LIVE and cursor.__slots__ == ("_sync", "direct", "duplicates", "last")
    assert (cursor.buffered, cursor.dropped, cursor.page_count) == (0, 0, FIRST_PAGE)
    cursor.resync(max_buffer_bytes=2)  # one 2-byte frame fits
    cursor.live(e(6))
    assert (cursor.buffered, cursor.dropped) == (1, 0)
    cursor.live(e(7))
    assert (cursor.buffered, cursor.dropped) == (1, 1)
    assert ids(cursor.history([e(6), e(7)], None)) == [6, 7]
