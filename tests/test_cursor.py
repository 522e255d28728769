"""The resume cursor: history then live, no gap, no duplicate."""

from offload.cursor import ChannelCursor, CursorState


def e(n):
    return ((n, 0), b"m%d" % n, b"f%d" % n)


def ids(entries):
    return [entry[0][0] for entry in entries]


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
